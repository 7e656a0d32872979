"""MMLU rows as ChoiceProblems, from the hub (`cais/mmlu`, config "all") or a local JSON Lines / parquet file
with the hub's columns:

    {"question": str, "subject": str, "choices": [str, str, str, str], "answer": 0..3}

The answer index becomes the letter A-D, as nanochat does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from aquainterp.tasks.choice import ChoiceProblem
from aquainterp.tasks.rows import RowError, load_rows, require_fields, source_rows

HUB_ID = "cais/mmlu"
HUB_CONFIG = "all"
LETTERS = ("A", "B", "C", "D")


def parse_row(where: str, row: Any) -> ChoiceProblem:
    require_fields(where, row, {"question": str, "choices": list, "answer": int})
    choices = row["choices"]
    if len(choices) != len(LETTERS) or not all(isinstance(c, str) for c in choices):
        raise RowError(where, "not four choices", f"MMLU rows have 4 string choices, got {len(choices)}")
    answer = row["answer"]
    if isinstance(answer, bool) or not 0 <= answer < len(LETTERS):
        raise RowError(where, "answer out of range", f"answer must be an index 0..3, got {answer!r}")
    subject = row.get("subject") if isinstance(row.get("subject"), str) else ""
    return ChoiceProblem(row["question"].strip(), tuple(choices), LETTERS, LETTERS[answer], where, subject)


def load_mmlu(source: str | Path = HUB_ID, config: str = HUB_CONFIG, split: str = "test",
              skip_bad_rows: bool = False) -> list[ChoiceProblem]:
    """All rows of an MMLU source: a local .jsonl/.parquet file (config and split ignored) or a hub id."""
    rows = source_rows(source, config, split, "load_mmlu: MMLU file not found")
    return load_rows(source, rows, parse_row, skip_bad_rows)
