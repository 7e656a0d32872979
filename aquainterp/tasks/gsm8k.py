"""GSM8K rows (`question`, `answer` with a final "#### n" line), from the hub or a local JSON Lines file.

Calculator annotations: GSM8K writes "16 - 3 - 4 = <<16-3-4=9>>9". nanochat turns each `<<expr=result>>`
into a python tool call (expr) and its output (result). We have no tool use in this project, so we
keep the text and drop the annotation: the solution reads "16 - 3 - 4 = 9", which already states the
result; `calculator_calls` keeps the (expression, result) pairs for anyone who wants them.
The final answer is the number after "####", with thousands separators removed ("1,080" -> "1080").
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aquainterp.tasks.rows import RowError, load_rows, require_fields, source_rows

HUB_ID = "openai/gsm8k"
HUB_CONFIG = "main"
_CALC = re.compile(r"<<([^<>=]*)=([^<>]*)>>")
_FINAL = re.compile(r"^####\s*(-?[\d,]*\.?\d+)\s*$", re.MULTILINE)
_NANOCHAT_ANSWER = re.compile(r"#### (-?[0-9.,]+)")


@dataclass(frozen=True)
class GSM8KProblem:
    question: str
    solution: str                           # worked solution, annotations removed, "####" line removed
    answer: str                             # the final number as a string, no thousands separators
    calculator_calls: tuple[tuple[str, str], ...]
    source: str


def strip_calculator(text: str) -> str:
    """'= <<16-3-4=9>>9' -> '= 9': remove the annotation, keep the visible text."""
    return _CALC.sub("", text)


def parse_row(where: str, row: Any) -> GSM8KProblem:
    """Validate one GSM8K row and split its answer into solution, final number and calculator calls."""
    require_fields(where, row, {"question": str, "answer": str})
    final = _FINAL.findall(row["answer"])
    if len(final) != 1:
        raise RowError(where, "no final answer", f"expected one '#### <number>' line, found {len(final)}")
    body = _FINAL.sub("", row["answer"]).strip()
    calls = tuple((expr, result) for expr, result in _CALC.findall(body))
    return GSM8KProblem(row["question"].strip(), strip_calculator(body), final[0].replace(",", ""),
                        calls, where)


def extract_answer(completion: str) -> str | None:
    """nanochat's GSM8K answer rule (its tasks/gsm8k.py, after OpenAI's grade-school-math): the number after
    the FIRST "#### " (one space) in the text, a run of ASCII digits, dots and commas with an optional
    leading minus, commas removed; None when there is none. "####5", "#### $5" and "#### ٥" are None,
    "#### 10." is "10.", "#### 1,080" is "1080". Compared as a string with the gold number (so "18.0" is
    not "18"), as nanochat does."""
    match = _NANOCHAT_ANSWER.search(completion)
    return None if match is None else match.group(1).strip().replace(",", "")


def load_gsm8k(source: str | Path = HUB_ID, split: str = "test", skip_bad_rows: bool = False) -> list[GSM8KProblem]:
    """All rows of a GSM8K source: a local JSON Lines path (split ignored) or a hub dataset id."""
    rows = source_rows(source, HUB_CONFIG, split, "load_gsm8k: GSM8K file not found")
    return load_rows(source, rows, parse_row, skip_bad_rows)
