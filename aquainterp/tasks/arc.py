"""ARC (AI2 Reasoning Challenge) rows as ChoiceProblems, from the hub (`allenai/ai2_arc`, config ARC-Easy or
ARC-Challenge) or a local JSON Lines / parquet file with the hub's columns:

    {"id": str, "question": str, "choices": {"text": [str, ...], "label": ["A", "B", ...]}, "answerKey": "B"}

Labels are kept as the row gives them (some ARC rows use "1".."4"), as nanochat does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from aquainterp.tasks.choice import ChoiceProblem
from aquainterp.tasks.rows import RowError, load_rows, require_fields, source_rows

HUB_ID = "allenai/ai2_arc"
CONFIGS = ("ARC-Easy", "ARC-Challenge")


def parse_row(where: str, row: Any) -> ChoiceProblem:
    require_fields(where, row, {"question": str, "choices": dict, "answerKey": str})
    choices = row["choices"]
    texts, labels = choices.get("text"), choices.get("label")
    if not isinstance(texts, list) or not isinstance(labels, list) or not all(
            isinstance(x, str) for x in [*texts, *labels]):
        raise RowError(where, "bad choices", "choices must be {'text': [str, ...], 'label': [str, ...]}")
    if len(texts) != len(labels) or len(texts) < 2:
        raise RowError(where, "bad choices", f"{len(texts)} choice texts for {len(labels)} labels")
    if len(set(labels)) != len(labels):
        raise RowError(where, "bad choices", f"labels repeat: {labels}")
    key = row["answerKey"].strip()
    if key not in labels:
        raise RowError(where, "answer not a label", f"answerKey {row['answerKey']!r} is not one of {labels}")
    return ChoiceProblem(row["question"].strip(), tuple(texts), tuple(labels), key, where)


def load_arc(source: str | Path = HUB_ID, config: str = "ARC-Easy", split: str = "test",
             skip_bad_rows: bool = False) -> list[ChoiceProblem]:
    """All rows of an ARC source: a local .jsonl/.parquet file (config and split ignored) or a hub id."""
    if config not in CONFIGS and not Path(source).is_file():
        raise ValueError(f"load_arc: config must be one of {CONFIGS}, got {config!r}")
    rows = source_rows(source, config, split, "load_arc: ARC file not found")
    return load_rows(source, rows, parse_row, skip_bad_rows)
