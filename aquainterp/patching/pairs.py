"""Clean/corrupted prompt pairs for activation patching (aquainterp.patching.patcher sweeps them).

A pair is one problem twice, tokenised up to and including the decision position: the clean prompt,
where the model should say the gold letter, and a corrupted twin of the same length that moves the
answer to another letter (options permuted, or numbers changed) or is the same prompt whose question
embeddings the Patcher blurs at run time (noise). Same length, so every position lines up and a patch
is one activation written at one (layer, position). aquainterp.patching.completion_pairs builds the same pairs
at the decision the model makes in its own completion.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from aquainterp.tasks import LETTERS, STYLES, decision_prompt, reasoning_decision_prompt
from aquainterp.tasks.chat import question_span
from aquainterp.tasks.problem import moved_gold
from aquainterp.tasks.synthetic import counterfactuals, rationale_chain

CORRUPTIONS = ("permute", "numbers", "noise")


@dataclass(frozen=True)
class PatchPair:
    """One clean/corrupted pair, tokenised up to and including the decision position.

    `corrupted_letter_id` is None for noise corruption, where the gold letter does not move: the
    foil is then the letter the noisy run likes best after the gold one. `noise_span` is the
    [start, end) token range whose embeddings the noise corruption blurs.
    """

    name: str
    clean_ids: tuple[int, ...]
    corrupted_ids: tuple[int, ...]
    clean_letter_id: int
    corrupted_letter_id: int | None
    letter_ids: tuple[int, ...]
    noise_span: tuple[int, int] | None = None
    completion_start: int | None = None  # first token of the model's own completion (completion decision)
    stated_letter_id: int | None = None  # the token the completion writes after its marker (None: not a letter)

    def __post_init__(self):
        if len(self.clean_ids) != len(self.corrupted_ids):
            raise ValueError(
                f"pair {self.name}: clean prompt has {len(self.clean_ids)} tokens, corrupted has "
                f"{len(self.corrupted_ids)}; patching by position needs equal lengths"
            )
        if not self.clean_ids:
            raise ValueError(f"pair {self.name}: empty prompt")
        if len(self.letter_ids) != len(LETTERS) or self.clean_letter_id not in self.letter_ids:
            raise ValueError(f"pair {self.name}: letter_ids {self.letter_ids} must be the five letter "
                             f"tokens and include the clean gold letter {self.clean_letter_id}")
        if self.corrupted_letter_id is None and self.noise_span is None:
            raise ValueError(f"pair {self.name}: no corrupted letter and no noise span; nothing is corrupted")
        if self.corrupted_letter_id == self.clean_letter_id:
            raise ValueError(f"pair {self.name}: the corrupted gold letter equals the clean one")
        if self.noise_span is not None:
            start, end = self.noise_span
            if not 0 <= start < end <= len(self.clean_ids):
                raise ValueError(f"pair {self.name}: noise span {self.noise_span} is not inside the "
                                 f"{len(self.clean_ids)}-token prompt")


def make_pairs(tokenizer, problems, corruption: str, *, seed: int = 0, skip_unalignable: bool = False,
               style: str = "direct") -> tuple[list[PatchPair], list[str]]:
    """Clean/corrupted pairs from multiple-choice problems; returns (pairs, names of skipped problems).

    permute: the gold option swaps places with another option, tried in a seeded order until the
    two prompts tokenise to the same length. numbers: one number of a synthetic question changes
    (same digit count, options untouched) so that the rationale's arithmetic lands on another option. noise: the same prompt; the question's embeddings
    are blurred at run time. A problem with no same-length corruption raises ValueError naming it,
    or is skipped and listed when `skip_unalignable` is set. style "direct" cuts the prompt at
    "Answer:" right after the question; "reasoning" after the worked rationale; "checked" after the
    rationale and the option checks. Checked prompts only take noise, on the question and the options:
    their checks stop at the gold option, so moving the gold changes the length, and the model's answer
    after its own checks hardly moves when only the question is blurred.
    """
    if corruption not in CORRUPTIONS:
        raise ValueError(f"make_pairs: corruption must be one of {CORRUPTIONS}, got {corruption!r}")
    if style not in STYLES:
        raise ValueError(f"make_pairs: style must be one of {STYLES}, got {style!r}")
    if style == "reasoning" and corruption == "numbers":
        raise ValueError("make_pairs: corruption 'numbers' changes the question, so the clean rationale would "
                         "no longer fit it; use style 'direct'")
    if style == "checked" and corruption != "noise":
        raise ValueError(f"make_pairs: corruption {corruption!r} moves the gold option, and the checked answer "
                         "checks the options up to the gold one, so clean and corrupted prompts never have the "
                         "same length; use corruption 'noise' with style 'checked'")
    if style == "direct":
        prompt = decision_prompt
    else:
        prompt = lambda tokenizer, problem: reasoning_decision_prompt(tokenizer, problem, style)
    rng = random.Random(seed)
    pairs, skipped = [], []
    for problem in problems:
        ids, letter_ids = prompt(tokenizer, problem)
        gold_id = letter_ids[LETTERS.index(problem.correct)]
        if corruption == "noise":
            pairs.append(PatchPair(problem.source, tuple(ids), tuple(ids), gold_id, None, tuple(letter_ids),
                                   question_span(tokenizer, problem, ids, with_options=style == "checked")))
            continue
        if corruption == "permute":
            candidates = moved_gold(problem, rng)
        else:
            if rationale_chain(problem) is None:
                raise ValueError(f"pair {problem.source}: corruption 'numbers' needs a rationale of "
                                 "'x op y = v' lines over the question's numbers (the synthetic task)")
            candidates = counterfactuals(problem, rng)
        found = None
        for corrupted in candidates:
            c_ids, c_letter_ids = prompt(tokenizer, corrupted)
            if len(c_ids) == len(ids) and list(c_letter_ids) == list(letter_ids):
                found = PatchPair(problem.source, tuple(ids), tuple(c_ids), gold_id,
                                  letter_ids[LETTERS.index(corrupted.correct)], tuple(letter_ids))
                break
        if found is not None:
            pairs.append(found)
        elif skip_unalignable:
            skipped.append(problem.source)
        else:
            raise ValueError(f"pair {problem.source}: no {corruption} corruption found that keeps the "
                             f"clean prompt's {len(ids)} tokens (and another gold letter); pass skip_unalignable (--skip-unalignable) to drop it")
    return pairs, skipped
