"""Which task a data row belongs to, from its fields: so a GSM8K file given to `--task aqua` fails with
"looks like GSM8K ... use --task gsm8k", not with the first missing field."""

from __future__ import annotations

from typing import Any

# task -> the fields that identify its rows (every one must be present)
NAMES = {"aqua": "AQuA-RAT", "gsm8k": "GSM8K", "arc": "ARC", "mmlu": "MMLU", "synthetic": "synthetic"}
SIGNATURES = {
    "aqua": ("question", "options", "rationale", "correct"),
    "gsm8k": ("question", "answer"),
    "arc": ("question", "choices", "answerKey"),
    "mmlu": ("question", "choices", "answer"),
}


def guess_task(row: Any) -> str | None:
    """The task whose fields `row` has (the most specific match), or None."""
    if not isinstance(row, dict):
        return None
    matches = [task for task, fields in SIGNATURES.items() if all(f in row for f in fields)]
    if "mmlu" in matches and "gsm8k" in matches:  # both have question + answer: choices decides
        matches.remove("gsm8k")
    if "gsm8k" in matches and not isinstance(row.get("answer"), str):
        matches.remove("gsm8k")
    return max(matches, key=lambda t: len(SIGNATURES[t])) if matches else None


def wrong_task_message(task: str, source, row: Any) -> str | None:
    """A one-line explanation when `row` (the first row of `source`) is another task's, else None."""
    guessed = guess_task(row)
    if guessed is None or guessed == task:
        return None
    fields = ", ".join(sorted(row)) if isinstance(row, dict) else ""
    return (f"{source} holds {NAMES[guessed]} rows (fields: {fields}), not {NAMES.get(task, task)} rows; "
            f"run with --task {guessed}")
