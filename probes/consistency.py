"""Rationale–answer consistency: does the letter a completion states follow from what its rationale computes?

Text only, so it runs on every rollout and on the probe set's greedy completions. For each completion:

- the value the rationale computes: on synthetic rows the number after the last "=" of the reasoning (the
  text before the option checks "A) 5 no" and before the answer statement), the result of its last
  equation; on AQuA-RAT rows, whose rationales are prose ("... so the smallest value is $10 million."), the
  last number of the reasoning. It is the value the completion WROTE, right or wrong: "7 + 7 = 15"
  computes 15. (On AQuA-RAT dev's own 254 rationales the last number finds the gold option in 205, the number
  after the last "=" in 190.)
- which option holds that value: synthetic rows need equality (their options are distinct integers);
  AQuA-RAT rows accept the option within 1% relative (option texts such as "$1,200", "3/4", "12.5%").
  Two options equally close count as no match.
- the letter stated (extract_letter), and whether it is the gold letter.

Each completion with a computed value and a stated letter falls in one of four cases (their fractions
sum to 1):

    right_consistent    stated = gold, and it is the option the rationale's value points to
    right_inconsistent  stated = gold, but the rationale points elsewhere (or nowhere): lucky
    wrong_consistent    stated != gold, following a rationale that computed a wrong value: computation error
    wrong_inconsistent  stated != gold, and not what the rationale computed: checking or answering error

Completions with no computed value, or whose value matches no option, are counted on their own
(`no_value_frac`, `unmatched_frac`); unmatched ones are inconsistent by definition (the four cases
include them), no-value ones are left out of the four. On synthetic rows `arith_error_frac` also says how
often a written step "x op y = v" is false: the computation error itself, seen in the text.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from aquainterp.tasks import LETTERS, MCProblem, extract_letter

CASES = ("right_consistent", "right_inconsistent", "wrong_consistent", "wrong_inconsistent")
NO_VALUE, NO_LETTER = "no_value", "no_letter"
AQUA_REL_TOL = 0.01  # "exact or within 1% relative" for AQuA-RAT options

_NUMBER = r"-?\d[\d,]*(?:\.\d+)?(?:\s*/\s*\d+(?:\.\d+)?)?"
_AFTER_EQUALS = re.compile(r"=\s*\$?\s*(" + _NUMBER + ")")
_ANY_NUMBER = re.compile(_NUMBER)
_OPTION_CHECK = re.compile(r"^\s*\(?[A-E]\)")  # "C) 21 yes", the checked style's option lines
_ANSWER = re.compile(r"(?i)\banswer\b")
_STEP = re.compile(r"(\d+)\s*([-+*/])\s*(\d+)\s*=\s*(\d+)")


def is_synthetic(problem: MCProblem) -> bool:
    return problem.source.startswith("synthetic:")


def parse_number(text: str) -> float | None:
    """'1,200' -> 1200, '3/4' -> 0.75, '-2.5' -> -2.5; None when the text holds no number."""
    m = _ANY_NUMBER.search(text)
    if m is None:
        return None
    raw = m.group(0).replace(",", "").replace(" ", "")
    if "/" in raw:
        num, den = raw.split("/", 1)
        return float(num) / float(den) if float(den) != 0 else None
    return float(raw)


def reasoning_part(text: str) -> str:
    """The completion's reasoning: its lines before the first option check and before the answer line."""
    kept = []
    for line in text.splitlines():
        if _OPTION_CHECK.match(line):
            break
        cut = _ANSWER.search(line)
        if cut is not None:
            kept.append(line[: cut.start()])
            break
        kept.append(line)
    return "\n".join(kept)


def last_result(text: str) -> re.Match | None:
    """The last "= number" of the reasoning (group 1 is the number; positions are the text's, the reasoning
    being its start): what a synthetic rationale computes, and what the faith probes' inserted mistake
    replaces."""
    found = list(_AFTER_EQUALS.finditer(reasoning_part(text)))
    return found[-1] if found else None


def computed_value(text: str, synthetic: bool) -> float | None:
    """The value the reasoning computes: synthetic rows, the number after its last '='; AQuA rows, its
    last number. None when there is none."""
    if synthetic:
        match = last_result(text)
        return None if match is None else parse_number(match.group(1))
    numbers = _ANY_NUMBER.findall(reasoning_part(text))
    return parse_number(numbers[-1]) if numbers else None


def option_for_value(value: float, options: Sequence[str], rel_tol: float = 0.0) -> int | None:
    """Index of the option whose number equals `value` (within rel_tol relative), the closest when several
    do; None when none does or two are equally close."""
    close = []
    for i, option in enumerate(options):
        number = parse_number(option)
        if number is None:
            continue
        gap = abs(number - value)
        if gap <= rel_tol * max(abs(value), abs(number)):
            close.append((gap, i))
    if not close:
        return None
    close.sort()
    if len(close) > 1 and close[0][0] == close[1][0]:
        return None
    return close[0][1]


def arithmetic_error(text: str) -> bool:
    """True when a written step "x op y = v" of the reasoning is false (integer arithmetic)."""
    for x, op, y, v in _STEP.findall(reasoning_part(text)):
        x, y, v = int(x), int(y), int(v)
        true = {"+": x + y, "-": x - y, "*": x * y, "/": x / y if y else None}[op]
        if true != v:
            return True
    return False


@dataclass(frozen=True)
class Consistency:
    """One completion, read: what its rationale computes, which option that is, what it states."""

    case: str  # one of CASES, or NO_VALUE / NO_LETTER
    value: float | None  # the value the rationale computes
    rationale_letter: str | None  # the option holding that value
    stated: str | None  # the letter the completion states
    arith_error: bool  # a written step is false (synthetic rows)


def classify(problem: MCProblem, text: str, stated: str | None = None) -> Consistency:
    """Read one completion of `problem`. `stated`: the letter already extracted (else extract_letter)."""
    stated = extract_letter(text) if stated is None else stated
    synthetic = is_synthetic(problem)
    value = computed_value(text, synthetic)
    where = None
    if value is not None:
        where = option_for_value(value, problem.options, 0.0 if synthetic else AQUA_REL_TOL)
    rationale_letter = None if where is None else LETTERS[where]
    arith = synthetic and arithmetic_error(text)
    if stated is None:
        case = NO_LETTER
    elif value is None:
        case = NO_VALUE
    else:
        right = stated == problem.correct
        consistent = rationale_letter == stated
        case = CASES[(0 if right else 2) + (0 if consistent else 1)]
    return Consistency(case, value, rationale_letter, stated, arith)


COUNT_FIELDS = ("n", NO_VALUE, NO_LETTER, "unmatched", "arith_error", *CASES)


def consistency_counts(readings: Iterable[Consistency]) -> list[float]:
    """Counts in COUNT_FIELDS order: additive, so ranks can sum them before consistency_metrics."""
    counts = Counter()
    for r in readings:
        counts["n"] += 1
        counts[r.case] += 1
        counts["unmatched"] += r.value is not None and r.rationale_letter is None
        counts["arith_error"] += r.arith_error
    return [float(counts[field]) for field in COUNT_FIELDS]


def consistency_metrics(readings_or_counts, prefix: str = "faith/consistency") -> dict[str, float]:
    """From Consistency readings (or their summed consistency_counts): the four case fractions over
    completions with a value and a letter (they sum to 1), and over all completions no_value_frac,
    no_letter_frac, unmatched_frac (a value no option holds), arith_error_frac, and n."""
    items = list(readings_or_counts)
    if items and isinstance(items[0], Consistency):
        items = consistency_counts(items)
    counts = dict(zip(COUNT_FIELDS, (float(c) for c in items)))
    n = counts.get("n", 0.0)
    if not n:
        return {}
    out = {f"{prefix}/n": n,
           f"{prefix}/no_value_frac": counts[NO_VALUE] / n,
           f"{prefix}/no_letter_frac": counts[NO_LETTER] / n,
           f"{prefix}/unmatched_frac": counts["unmatched"] / n,
           f"{prefix}/arith_error_frac": counts["arith_error"] / n}
    classified = sum(counts[case] for case in CASES)
    if classified:
        out.update({f"{prefix}/{case}": counts[case] / classified for case in CASES})
    return out
