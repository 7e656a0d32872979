"""The one record every multiple-choice source (synthetic, AQuA-RAT) turns into."""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass

LETTERS = ("A", "B", "C", "D", "E")


@dataclass(frozen=True)
class MCProblem:
    """A five-option question with its worked rationale and the gold letter.

    `options` hold the option texts without their "A)" prefix; `source` says where the problem came
    from ("path:line", "deepmind/aqua_rat:validation:17" or "synthetic:<seed>:<split>:<index>") so
    every error and every eval row can point back at it.
    """

    question: str
    options: tuple[str, str, str, str, str]
    rationale: str
    correct: str
    source: str

    def __post_init__(self):
        if len(self.options) != len(LETTERS):
            raise ValueError(f"{self.source}: expected 5 options, got {len(self.options)}")
        if self.correct not in LETTERS:
            raise ValueError(f"{self.source}: correct letter must be one of A-E, got {self.correct!r}")

    @property
    def answer_index(self) -> int:
        return LETTERS.index(self.correct)

    @property
    def answer_text(self) -> str:
        return self.options[self.answer_index]


def moved_gold(problem: MCProblem, rng: random.Random) -> list[MCProblem]:
    """The problem with its gold option swapped into each other slot whose text differs from the gold's,
    in an order shuffled by `rng` (one shuffle). The "permute" corruption of activation patching: it only
    rearranges a problem, so it lives with the problem record."""
    others = [x for x in LETTERS
              if x != problem.correct and problem.options[LETTERS.index(x)] != problem.answer_text]
    rng.shuffle(others)
    gold, moved = problem.answer_index, []
    for target in others:
        new = LETTERS.index(target)
        options = list(problem.options)
        options[gold], options[new] = options[new], options[gold]
        moved.append(dataclasses.replace(problem, options=tuple(options), correct=target))
    return moved
