"""The command line boundary: argument types with ranges, one-line errors, exit codes.

Every `aquainterp` subcommand and every `python -m training.<stage>` parses with OneLineParser and runs
inside `guarded`:

- numbers are checked while parsing (`number(int, lo=1)`, ...): NaN, infinities and values outside the
  flag's range are refused before anything runs. A bare `type=int` / `type=float` still gets a sanity
  range (|x| < 2**31, finite), so no flag takes 1e300 or nan;
- local paths that do not exist are errors (`existing_path`), never Hub ids; a data source is a local
  file, `hf:NAME`, or a bare `owner/name` Hub id that does not look like a path (`data_source`);
- a usage error prints ONE line, `<prog>: error: <message>`, on stderr and exits 2 (argparse's own
  errors included); a runtime failure prints one line and exits 1; a traceback only with `--debug`
  (or AQUAINTERP_DEBUG=1).
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
import traceback
from pathlib import Path

from aquainterp.cli.rundir import UsageError

INT_SANITY = 2**31  # a bare type=int flag takes |x| < 2**31
FLOAT_SANITY = 1e12  # a bare type=float flag takes finite |x| <= 1e12
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
DATA_SUFFIXES = (".json", ".jsonl", ".parquet", ".csv", ".txt", ".arrow", ".gz", ".zst")


def one_line(text: str) -> str:
    """Collapse a message to one line (multi-line messages keep their lines, joined by ' | ')."""
    return " | ".join(line.strip() for line in str(text).splitlines() if line.strip())


# ----------------------------------------------------------------------------------------------
# number types with ranges


class Number:
    """An argparse `type=` that parses `kind` and checks lo <= x <= hi (strict with lo_open/hi_open).
    The range is public (lo, hi, ...) so tests can tell which values a flag must refuse."""

    def __init__(self, kind=int, lo=None, hi=None, *, lo_open=False, hi_open=False, what: str = ""):
        self.kind, self.lo, self.hi, self.lo_open, self.hi_open, self.what = kind, lo, hi, lo_open, hi_open, what
        self.__name__ = kind.__name__

    def accepts(self, x) -> bool:
        if self.kind is float and not math.isfinite(x):
            return False
        if self.lo is not None and (x <= self.lo if self.lo_open else x < self.lo):
            return False
        return not (self.hi is not None and (x >= self.hi if self.hi_open else x > self.hi))

    def describe(self) -> str:
        fmt = lambda x: f"{x:,}" if isinstance(x, int) else f"{x:g}"
        parts = []
        if self.lo is not None:
            parts.append(f"{'>' if self.lo_open else '>='} {fmt(self.lo)}")
        if self.hi is not None:
            parts.append(f"{'<' if self.hi_open else '<='} {fmt(self.hi)}")
        kind = "an integer" if self.kind is int else "a finite number"
        return f"{kind} {' and '.join(parts)}".strip() + (f" ({self.what})" if self.what else "")

    def __call__(self, text: str):
        try:
            x = self.kind(text)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"expected {self.describe()}, got {text!r}") from None
        if not self.accepts(x):
            raise argparse.ArgumentTypeError(f"must be {self.describe()}, got {text!r}")
        return x

    def __repr__(self) -> str:
        return f"Number({self.describe()})"


def number(kind=int, lo=None, hi=None, **kw) -> Number:
    if hi is None:  # every flag has an upper bound: "huge" is a typo, not a plan
        hi = INT_SANITY - 1 if kind is int else FLOAT_SANITY
    return Number(kind, lo, hi, **kw)


def positive_int(hi: int = INT_SANITY - 1, what: str = "") -> Number:
    return Number(int, 1, hi, what=what)


def count_int(hi: int = INT_SANITY - 1, what: str = "") -> Number:
    """>= 0 (0 usually means off)."""
    return Number(int, 0, hi, what=what)


SEED = Number(int, 0, 2**32 - 1)
PROBABILITY = Number(float, 0.0, 1.0)


# ----------------------------------------------------------------------------------------------
# paths, devices, data sources


def existing_path(kind: str = "any"):
    """argparse type: a Path that exists (kind 'dir' or 'file' also checks which)."""

    def parse(text: str) -> Path:
        p = Path(text)
        if not p.exists():
            raise argparse.ArgumentTypeError(f"{text}: does not exist (no such {'folder' if kind == 'dir' else 'file or folder'})")
        if kind == "dir" and not p.is_dir():
            raise argparse.ArgumentTypeError(f"{text}: is a file, expected a folder")
        if kind == "file" and not p.is_file():
            raise argparse.ArgumentTypeError(f"{text}: is a folder, expected a file")
        return p

    parse.__name__ = "path"
    return parse


def resolve_data_source(source: str) -> tuple[str, str]:
    """('local', path) for an existing file or folder, ('hub', id) for `hf:ID` or a bare `owner/name` that
    does not look like a path; UsageError for anything else (a mistyped local path is never a Hub id)."""
    text = str(source)
    if text.startswith("hf:"):
        hub = text[3:].split(":")[0]
        if not HUB_ID.match(hub):
            raise UsageError(f"{text}: a Hub dataset id is hf:owner/name")
        return "hub", text[3:]
    if Path(text).exists():
        return "local", text
    if HUB_ID.match(text) and not text.startswith(".") and not text.lower().endswith(DATA_SUFFIXES):
        return "hub", text
    raise UsageError(f"{text}: no such file or folder (a Hub dataset is owner/name or hf:owner/name)")


def data_source(text: str) -> str:
    """argparse type for --data style flags (see resolve_data_source)."""
    try:
        resolve_data_source(text)
    except UsageError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def device_name(text: str) -> str:
    """argparse type: auto | cpu | cuda | cuda:N | mps, checked against this machine now."""
    m = re.fullmatch(r"(auto|cpu|mps|cuda)(?::(\d+))?", text)
    if not m or (m.group(2) is not None and m.group(1) != "cuda"):
        raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda, cuda:N or mps, got {text!r}")
    if m.group(1) in ("cuda", "mps"):
        import torch

        if m.group(1) == "cuda":
            if not torch.cuda.is_available():
                raise argparse.ArgumentTypeError(f"{text}: no CUDA device is available on this machine")
            if m.group(2) is not None and int(m.group(2)) >= torch.cuda.device_count():
                raise argparse.ArgumentTypeError(f"{text}: this machine has {torch.cuda.device_count()} CUDA "
                                                 "device(s)")
        elif not torch.backends.mps.is_available():
            raise argparse.ArgumentTypeError(f"{text}: MPS is not available on this machine")
    return text


# ----------------------------------------------------------------------------------------------
# the parser and the boundary


class OneLineParser(argparse.ArgumentParser):
    """argparse with one-line errors (exit 2) and sanity ranges for bare int/float types."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {one_line(message)} (see --help)\n")

    def _get_value(self, action, arg_string):
        if action.type is int:
            action.type = Number(int, -INT_SANITY + 1, INT_SANITY - 1)
        elif action.type is float:
            action.type = Number(float, -FLOAT_SANITY, FLOAT_SANITY)
        return super()._get_value(action, arg_string)


def pop_debug(argv: list[str]) -> tuple[list[str], bool]:
    """Remove --debug from argv (before a bare '--'); AQUAINTERP_DEBUG=1 turns it on too."""
    debug = os.environ.get("AQUAINTERP_DEBUG", "") not in ("", "0")
    out, rest = [], False
    for arg in argv:
        if not rest and arg == "--debug":
            debug = True
            continue
        rest = rest or arg == "--"
        out.append(arg)
    return out, debug


def describe_error(e: BaseException) -> str:
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        return f"{e.filename}: {e.strerror}"
    if isinstance(e, UnicodeDecodeError):
        return f"not UTF-8 text ({e.reason} at byte {e.start})"
    text = one_line(str(e))
    if not text:
        return type(e).__name__
    if isinstance(e, (ValueError, RuntimeError)) or type(e).__module__.startswith(("aquainterp", "training")):
        return text
    return f"{type(e).__name__}: {text}"


def guarded(prog: str, body, debug: bool = False) -> int:
    """Run body() at a command boundary: its return value as exit status; UsageError -> one line, 2;
    any other exception -> one line, 1 (with debug: the traceback, then 1). SystemExit passes through."""
    try:
        return int(body() or 0)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except UsageError as e:
        if debug:
            traceback.print_exc()
        print(f"{prog}: error: {describe_error(e)}", file=sys.stderr)
        return 2
    except Exception as e:
        if debug:
            traceback.print_exc()
        print(f"{prog}: error: {describe_error(e)}", file=sys.stderr)
        return 1
