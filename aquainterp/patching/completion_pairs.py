"""Patching pairs at the decision the model makes: its own greedy completion, cut at its answer marker.

A reasoning model does not pick its letter right after the question; it writes a rationale, then
"Answer:", then the letter. `completion_pairs` patches that decision:

- clean: the problem's generation prompt (the "reasoning" conversation up to the assistant's turn) +
  the model's own greedy completion, teacher-forced and cut right after its LAST answer marker
  (tasks.answer_step; the marker is tasks.letter_token_ids(tokenizer)[0]), so the next token is the
  letter it writes;
- corrupted: the corrupted problem's generation prompt (gold option moved by `permute`, or the same
  prompt with the question and options blurred by `noise`) + the SAME completion tokens;
- metric (aquainterp.patching.patcher.Patcher): clean gold letter minus corrupted gold letter (noise: the noisy
  run's best other letter) at that answer step.

A completion that never writes the marker has no answer step: its problem is skipped and counted
(`CompletionPairs.no_marker`), never guessed. The decision position then sits after the reasoning, so a
sweep shows how the question, the options and the model's own rationale feed the letter.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

from aquainterp.patching.pairs import PatchPair
from aquainterp.tasks import LETTERS, answer_step, letter_token_ids
from aquainterp.tasks.chat import generation_prompt, question_span
from aquainterp.tasks.problem import moved_gold

COMPLETION_CORRUPTIONS = ("permute", "noise")
GENERATION_STYLE = "reasoning"  # "reasoning" and "checked" share this generation prompt


@dataclass
class CompletionPairs:
    """Pairs built at the completion decision, and what was left out (problem sources)."""

    pairs: list[PatchPair]
    unalignable: list[str] = field(default_factory=list)  # no same-length corruption of the prompt
    no_marker: list[str] = field(default_factory=list)  # the completion never wrote the answer marker
    completions: dict[str, list[int]] = field(default_factory=dict)  # every completion, by problem source

    @property
    def skipped(self) -> list[str]:
        return self.unalignable + self.no_marker


def corrupted_prompts(tokenizer, problem, corruption: str, rng: random.Random):
    """(corrupted problem, its generation prompt) with the clean prompt's token count and letter tokens,
    or None: permute tries the other letters in a seeded order; noise is the clean prompt itself."""
    ids = generation_prompt(tokenizer, problem, GENERATION_STYLE)
    if corruption == "noise":
        return problem, ids
    for corrupted in moved_gold(problem, rng):
        c_ids = generation_prompt(tokenizer, corrupted, GENERATION_STYLE)
        if len(c_ids) == len(ids):
            return corrupted, c_ids
    return None


def greedy_completions(model, tokenizer, prompts: Sequence[list[int]], max_new_tokens: int,
                       batch_size: int = 32, progress: bool = False) -> list[list[int]]:
    """The model's greedy completion of each prompt (stop token included if hit), decoded in batches
    with aquainterp.model.engine.Engine.generate_batch."""
    from tqdm.auto import tqdm

    from aquainterp.model.engine import Engine

    stop = [tokenizer.encode_special("<|assistant_end|>")]
    engine, out = Engine(model), []
    for start in tqdm(range(0, len(prompts), batch_size), desc="greedy completions", disable=not progress):
        gens = engine.generate_batch([list(p) for p in prompts[start: start + batch_size]],
                                     max_new_tokens=max_new_tokens, temperature=0.0, stop_tokens=stop)
        out += [list(g.completions[0]) for g in gens]
    return out


def completion_pairs(tokenizer, problems, corruption: str, completions, *, seed: int = 0,
                     skip_unalignable: bool = False) -> CompletionPairs:
    """Pairs at the completion decision from given completions: `completions` is a list (one per
    problem, the tokens the model wrote after the clean generation prompt) or a callable mapping the
    clean generation prompts to that list (e.g. greedy_completions bound to a model).

    permute: the gold option swaps with another so that the corrupted prompt keeps the clean token count
    (a problem with no such swap raises ValueError naming it, or with skip_unalignable is skipped and
    listed in `unalignable`); noise: the same prompt, the embeddings of the question and options are blurred at
    run time.
    Problems whose completion has no answer marker are listed in `no_marker`."""
    if corruption not in COMPLETION_CORRUPTIONS:
        why = (" ('numbers' changes the question, so the model's own completion would no longer fit it)"
               if corruption == "numbers" else "")
        raise ValueError(f"completion decision: corruption must be one of {COMPLETION_CORRUPTIONS}, "
                         f"got {corruption!r}{why}")
    marker, letter_ids = letter_token_ids(tokenizer)
    rng = random.Random(seed)
    found, result = [], CompletionPairs([])
    for problem in problems:
        got = corrupted_prompts(tokenizer, problem, corruption, rng)
        if got is None:
            if not skip_unalignable:
                raise ValueError(f"pair {problem.source}: no permute corruption found that keeps the clean "
                                 "generation prompt's token count; pass skip_unalignable (--skip-unalignable) "
                                 "to drop it")
            result.unalignable.append(problem.source)
            continue
        found.append((problem, generation_prompt(tokenizer, problem, GENERATION_STYLE), *got))
    prompts = [clean for _, clean, _, _ in found]
    written = completions(prompts) if callable(completions) else completions
    if len(written) != len(found):
        raise ValueError(f"completion decision: {len(written)} completions for {len(found)} pairable problems")
    for (problem, clean, corrupted, c_ids), completion in zip(found, written):
        completion = list(completion)
        result.completions[problem.source] = completion
        cut = answer_step(completion, marker)
        if cut is None:
            result.no_marker.append(problem.source)
            continue
        said = completion[:cut]
        stated = completion[cut] if cut < len(completion) else None
        gold = letter_ids[LETTERS.index(problem.correct)]
        if corruption == "noise":
            pair = PatchPair(problem.source, tuple(clean + said), tuple(clean + said), gold, None,
                             tuple(letter_ids), noise_span=question_span(tokenizer, problem, clean, GENERATION_STYLE, with_options=True),
                             completion_start=len(clean), stated_letter_id=stated)
        else:
            pair = PatchPair(problem.source, tuple(clean + said), tuple(c_ids + said), gold,
                             letter_ids[LETTERS.index(corrupted.correct)], tuple(letter_ids),
                             completion_start=len(clean), stated_letter_id=stated)
        result.pairs.append(pair)
    return result
