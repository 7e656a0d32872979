"""The fixed probe set, and the decision rows the probes read.

A ProbeItem is one problem, tokenised once from aquainterp.tasks: its direct decision prompt (the
question and options, then "Answer:"), the generation prompt a reasoning completion continues, the
option spans in each, the letter ids and the gold letter.

A DecisionRow is what one probe forward reads: a token prefix whose last position is where a letter
gets chosen, with the option spans and where the completion starts. By default that prefix is the
prompt plus the policy's own completion, cut right after its answer marker (`completion_row`): the
position where a reasoning model actually picks its letter. `direct_row` is the prompt-only
"Answer:" position, right for models trained to answer in one token and a counterfactual for the rest.

Batches are right-padded: under a causal mask a position never sees the padding after it, so the
real positions compute exactly what they would alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from aquainterp.tasks import LETTERS, MCProblem, answer_step, decision_prompt, letter_token_ids, option_spans


@dataclass(frozen=True)
class ProbeItem:
    index: int  # position in the probe set
    problem: MCProblem
    ids: tuple[int, ...]  # direct decision prompt; its last token is the direct decision position
    spans: tuple[tuple[int, int], ...]  # [start, end) token span of "X) text" for A..E in `ids`
    letter_ids: tuple[int, ...]  # token id of each letter after the answer marker
    gold: int  # index of the correct letter
    prompt: tuple[int, ...] = ()  # generation prompt (the completion style's conversation up to the reply)
    prompt_spans: tuple[tuple[int, int], ...] = ()  # option spans in `prompt`


@dataclass(frozen=True)
class DecisionRow:
    ids: tuple[int, ...]  # the prefix; its last token is the decision position
    letter_ids: tuple[int, ...]
    gold: int
    spans: tuple[tuple[int, int], ...] = ()  # option spans (inside the prompt part)
    completion_start: int | None = None  # index of the first completion token; None: no completion read


def direct_row(item: ProbeItem) -> DecisionRow:
    """The prompt-only decision: right after "Answer:" with no rationale before it."""
    return DecisionRow(item.ids, item.letter_ids, item.gold, item.spans, None)


def completion_row(prompt: Sequence[int], completion: Sequence[int], marker: Sequence[int], letter_ids,
                   gold: int, spans=()) -> DecisionRow | None:
    """prompt + completion cut right after the completion's last answer marker (the next token is the
    letter it writes), or None when the completion writes no marker (tasks.answer_step)."""
    cut = answer_step(list(completion), list(marker))
    if cut is None:
        return None
    return DecisionRow(tuple(prompt) + tuple(completion[:cut]), tuple(letter_ids), gold, tuple(spans),
                       len(prompt))


def last_token_row(prompt: Sequence[int], completion: Sequence[int], stop: int, letter_ids, gold: int,
                   spans=()) -> DecisionRow:
    """prompt + the whole completion (its stop token cut): the fallback read of --probe-decision
    completion_or_last for a completion that never writes the answer marker. The letter logits there are
    the policy's next-token preference among the letters after its last token, not a letter it chose."""
    body = list(completion[:-1]) if completion and completion[-1] == stop else list(completion)
    return DecisionRow(tuple(prompt) + tuple(body), tuple(letter_ids), gold, tuple(spans), len(prompt))


def build_probe_set(tokenizer, problems: Sequence[MCProblem], completion_style: str = "reasoning"
                    ) -> list[ProbeItem]:
    """One ProbeItem per problem; errors name the problem's index and source. `completion_style` is the
    conversation style whose generation prompt the policy's completions continue."""
    if len(problems) == 0:
        raise ValueError("build_probe_set: the probe set needs at least one problem")
    items = []
    for i, problem in enumerate(problems):
        ids, letter_ids = decision_prompt(tokenizer, problem)
        span_ids, spans = option_spans(tokenizer, problem)
        prompt, prompt_spans = option_spans(tokenizer, problem, completion_style)
        where = f"problem {i} ({getattr(problem, 'source', '?')})"
        if list(span_ids) != list(ids):
            raise ValueError(f"build_probe_set: {where}: option_spans and decision_prompt disagree on the ids")
        if len(letter_ids) != 5 or len(spans) != 5:
            raise ValueError(f"build_probe_set: {where}: expected 5 letter ids and 5 spans, "
                             f"got {len(letter_ids)} and {len(spans)}")
        if problem.correct not in LETTERS:
            raise ValueError(f"build_probe_set: {where}: gold letter {problem.correct!r} is not one of A..E")
        items.append(ProbeItem(i, problem, tuple(ids), tuple(tuple(s) for s in spans), tuple(letter_ids),
                               LETTERS.index(problem.correct), tuple(prompt),
                               tuple(tuple(s) for s in prompt_spans)))
    return items


def answer_marker(tokenizer) -> list[int]:
    """The tokens after which a completion writes its letter ("Answer:" and any shared space token)."""
    return letter_token_ids(tokenizer)[0]


def right_pad(sequences: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (ids [B, T] right-padded with pad_id, lengths [B])."""
    lengths = [len(s) for s in sequences]
    if min(lengths) == 0:
        raise ValueError(f"right_pad: sequence {lengths.index(0)} is empty")
    ids = torch.full((len(sequences), max(lengths)), pad_id, dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.as_tensor(list(seq), dtype=torch.long)
    return ids, torch.tensor(lengths)
