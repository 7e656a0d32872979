"""Metric-name regexes from templates, restricted so that matching is always fast.

A template is a file a user may have received from anyone; `dashboard html` matches its regexes against
every metric name of a run. Python's `re` backtracks, so a pattern like `(x+x+)+y` takes exponential time
and hangs the command. Templates only need simple patterns (`attn/entropy/layer(?P<layer>\\d+)/head(?P<head>\\d+)`),
so `safe_compile` accepts a subset whose worst case is polynomial and small:

- no quantifier inside a quantified group (`(a+)+`, `(a|aa)*`): the source of exponential blow-up;
- no backreferences, conditionals or lookarounds;
- the product of the repeat bounds (an unbounded repeat counts as MAX_NAME) at most MAX_WORK, so at most
  two unbounded repeats in a row;
- names longer than MAX_NAME characters never match (nothing we log comes close).

Violations raise ValueError with the reason; template.py turns it into a TemplateError naming the file.
"""

from __future__ import annotations

import math
import re

try:  # Python 3.11+: the parser lives in re._parser (sre_parse is its deprecated alias)
    from re import _constants as _c
    from re import _parser as _p
except ImportError:  # pragma: no cover
    import sre_constants as _c
    import sre_parse as _p

MAX_NAME = 512
MAX_WORK = 1_000_000
MAX_PATTERN = 1000
_REPEATS = {_c.MAX_REPEAT, _c.MIN_REPEAT, getattr(_c, "POSSESSIVE_REPEAT", _c.MAX_REPEAT)}
_REFUSED = {_c.GROUPREF: "backreferences", _c.GROUPREF_EXISTS: "conditional groups",
            _c.ASSERT: "lookarounds", _c.ASSERT_NOT: "lookarounds"}


def _walk(items, inside_repeat: bool, bounds: list[int], pattern: str) -> bool:
    """Check one parsed sequence; returns whether it contains a repeat or an alternation."""
    has_variable = False
    for op, av in items:
        if op in _REFUSED:
            raise ValueError(f"{pattern!r}: {_REFUSED[op]} are not allowed in template regexes")
        if op in _REPEATS:
            lo, hi, sub = av
            if inside_repeat:
                raise ValueError(f"{pattern!r}: a quantifier inside a quantified group (e.g. (a+)+) can "
                                 "take exponential time; not allowed in template regexes")
            if hi != 1:
                bounds.append(MAX_NAME if hi == _c.MAXREPEAT else min(hi, MAX_NAME))
            _walk(sub, True, bounds, pattern)
            has_variable = True
        elif op == _c.SUBPATTERN:
            has_variable |= _walk(av[-1], inside_repeat, bounds, pattern)
        elif op == _c.BRANCH:
            if inside_repeat:
                raise ValueError(f"{pattern!r}: an alternation inside a quantified group (e.g. (a|aa)*) "
                                 "can take exponential time; not allowed in template regexes")
            for branch in av[1]:
                _walk(branch, inside_repeat, bounds, pattern)
            has_variable = True
        elif op == getattr(_c, "ATOMIC_GROUP", None):
            has_variable |= _walk(av, inside_repeat, bounds, pattern)
    return has_variable


class SafePattern:
    """A compiled template regex: fullmatch/match/search refuse names longer than MAX_NAME (no match)."""

    def __init__(self, compiled: re.Pattern):
        self.compiled = compiled
        self.pattern, self.groupindex, self.groups = compiled.pattern, compiled.groupindex, compiled.groups

    def fullmatch(self, name: str):
        return self.compiled.fullmatch(name) if len(name) <= MAX_NAME else None

    def match(self, name: str):
        return self.compiled.match(name) if len(name) <= MAX_NAME else None

    def search(self, name: str):
        return self.compiled.search(name) if len(name) <= MAX_NAME else None


def safe_compile(pattern: str) -> SafePattern:
    """Compile a template regex after checking it against the restricted syntax (ValueError otherwise)."""
    if not isinstance(pattern, str) or not pattern:
        raise ValueError(f"regex must be a non-empty string, got {pattern!r}")
    if len(pattern) > MAX_PATTERN:
        raise ValueError(f"regex of {len(pattern)} characters; template regexes are at most {MAX_PATTERN}")
    try:
        parsed = _p.parse(pattern)
        compiled = re.compile(pattern)
    except re.error as e:
        raise ValueError(f"{pattern!r} does not compile: {e}") from None
    bounds: list[int] = []
    _walk(list(parsed), False, bounds, pattern)
    if math.prod(bounds) > MAX_WORK:
        raise ValueError(f"{pattern!r}: {len(bounds)} repeats in a row can take polynomial time of degree "
                         f"{len(bounds)}; template regexes allow at most two unbounded repeats")
    return SafePattern(compiled)
