"""The fixed probe set: each problem's decision prompt, option spans, letter ids and gold letter.

Built once from aquainterp.tasks (decision_prompt, option_spans) so every probe reads the same token
positions the tasks module defines. Batches are right-padded: under a causal mask a position never
sees the padding after it, so the real positions compute exactly what they would alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from aquainterp.tasks import LETTERS, MCProblem, decision_prompt, option_spans


@dataclass(frozen=True)
class ProbeItem:
    index: int  # position in the probe set
    problem: MCProblem
    ids: tuple[int, ...]  # decision prompt; its last token is the decision position
    spans: tuple[tuple[int, int], ...]  # [start, end) token span of "X) text" for A..E
    letter_ids: tuple[int, ...]  # token id of each letter in that context
    gold: int  # index of the correct letter


def build_probe_set(tokenizer, problems: Sequence[MCProblem]) -> list[ProbeItem]:
    """One ProbeItem per problem; errors name the problem's index and source."""
    if len(problems) == 0:
        raise ValueError("build_probe_set: the probe set needs at least one problem")
    items = []
    for i, problem in enumerate(problems):
        ids, letter_ids = decision_prompt(tokenizer, problem)
        span_ids, spans = option_spans(tokenizer, problem)
        where = f"problem {i} ({getattr(problem, 'source', '?')})"
        if list(span_ids) != list(ids):
            raise ValueError(f"build_probe_set: {where}: option_spans and decision_prompt disagree on the ids")
        if len(letter_ids) != 5 or len(spans) != 5:
            raise ValueError(f"build_probe_set: {where}: expected 5 letter ids and 5 spans, "
                             f"got {len(letter_ids)} and {len(spans)}")
        if problem.correct not in LETTERS:
            raise ValueError(f"build_probe_set: {where}: gold letter {problem.correct!r} is not one of A..E")
        items.append(ProbeItem(i, problem, tuple(ids), tuple(tuple(s) for s in spans), tuple(letter_ids),
                               LETTERS.index(problem.correct)))
    return items


def right_pad(sequences: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (ids [B, T] right-padded with pad_id, lengths [B])."""
    lengths = [len(s) for s in sequences]
    if min(lengths) == 0:
        raise ValueError(f"right_pad: sequence {lengths.index(0)} is empty")
    ids = torch.full((len(sequences), max(lengths)), pad_id, dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.as_tensor(list(seq), dtype=torch.long)
    return ids, torch.tensor(lengths)
