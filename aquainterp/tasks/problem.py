"""The one record every multiple-choice source (synthetic, AQuA-RAT) turns into."""

from __future__ import annotations

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
