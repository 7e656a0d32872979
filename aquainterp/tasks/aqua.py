"""AQuA-RAT rows as MCProblems, from the hub (`deepmind/aqua_rat`, config "raw") or a local JSON Lines file.

Both sources go through `parse_row`, the one validator: a row needs `question`, `options` (five strings
"A)21" or "A) 21", in order A..E), `rationale` and `correct` (A-E). The option prefix is stripped, so
"A) 21" becomes the option text "21". Hub split names are the hub's ("train", "validation", "test");
the official dev.json file is the "validation" split.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from aquainterp.tasks.problem import LETTERS, MCProblem
from aquainterp.tasks.rows import RowError, load_rows, require_fields, source_rows

HUB_ID = "deepmind/aqua_rat"
HUB_CONFIG = "raw"
_OPTION = re.compile(r"\s*\(?([A-Ea-e])\)\s*(.*)", re.DOTALL)


def parse_option(where: str, index: int, option: str) -> str:
    """"A)21" / "A) 21" / "(A) 21" -> "21"; the letter must be the index-th of A..E."""
    m = _OPTION.fullmatch(option)
    if not m or m.group(1).upper() != LETTERS[index]:
        raise RowError(where, "bad option", f"option {index + 1} should start with '{LETTERS[index]})', "
                                            f"got {option[:30]!r}")
    return m.group(2).strip()


def parse_row(where: str, row: Any) -> MCProblem:
    """Validate one AQuA-RAT row (hub or file) and turn it into an MCProblem; RowError names `where`."""
    require_fields(where, row, {"question": str, "options": list, "rationale": str, "correct": str})
    options = row["options"]
    if len(options) != len(LETTERS):
        raise RowError(where, "not five options", f"expected 5 options, got {len(options)}")
    if not all(isinstance(o, str) for o in options):
        raise RowError(where, "wrong type", "every option must be a string")
    correct = row["correct"].strip()
    if correct not in LETTERS:
        raise RowError(where, "letter outside A-E", f"correct must be one of A-E, got {row['correct']!r}")
    texts = tuple(parse_option(where, i, o) for i, o in enumerate(options))
    return MCProblem(row["question"].strip(), texts, row["rationale"].strip(), correct, where)


def load_aqua(source: str | Path = HUB_ID, split: str = "validation", skip_bad_rows: bool = False) -> list[MCProblem]:
    """All rows of an AQuA-RAT source: a local JSON Lines path (split ignored) or a hub dataset id.

    Bad rows raise a RowError naming file and line (hub: id, split and index); with skip_bad_rows they
    are skipped, counted by kind and reported in one warning.
    """
    rows = source_rows(source, HUB_CONFIG, split, "load_aqua: AQuA file not found")
    return load_rows(source, rows, parse_row, skip_bad_rows)
