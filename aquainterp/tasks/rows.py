"""Row sources shared by the AQuA and GSM8K loaders: a local JSON Lines file or a hub dataset.

Both yield (where, row) pairs, where `where` names the row for error messages ("path:line" for files,
"hub_id:split:index" for hub rows), so one validation function serves both, and bad rows either raise
a RowError naming the place or, with skip_bad_rows, are counted and reported (never dropped silently).
"""

from __future__ import annotations

import json
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


class RowError(ValueError):
    """A malformed data row; `kind` groups errors for the skipped-rows report."""

    def __init__(self, where: str, kind: str, detail: str):
        super().__init__(f"{where}: {kind}: {detail}")
        self.where, self.kind, self.detail = where, kind, detail


def is_local(source: str | Path) -> bool:
    """A source is a local file when it exists on disk; anything else is taken as a hub dataset id."""
    return Path(source).is_file()


def local_rows(path: str | Path) -> Iterator[tuple[str, Any]]:
    """(path:line, parsed object) per non-blank line; unparsable lines come back as RowError values."""
    path = Path(path)
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:  # named by file:line like any other bad row
                yield where, RowError(where, "not UTF-8", f"byte {raw[e.start]:#04x} at column {e.start + 1}")
                continue
            if not line.strip():
                continue
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as e:
                yield where, RowError(where, "invalid JSON", f"{e.msg} at column {e.colno}")


def parquet_rows(path: str | Path) -> Iterator[tuple[str, Any]]:
    """(path:row N, row dict) per row of a local parquet file (the hub's own storage format; pyarrow reads
    it), N counted from 1 like file lines."""
    import pyarrow.parquet as pq

    path = Path(path)
    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow's errors name no file: say which one and why, in one line
        raise ValueError(f"{path}: not a readable parquet file ({type(e).__name__}: {e})") from None
    for index, row in enumerate(table.to_pylist(), start=1):
        yield f"{path}:row {index}", row


def hub_rows(source: str, config: str | None, split: str) -> Iterator[tuple[str, Any]]:
    """(source:split:index, row dict) from `datasets.load_dataset(source, config, split=split)`.

    `source` is a Hub id (`owner/name` or `hf:owner/name`) or a local dataset folder in the Hub's layout;
    a mistyped local path is a FileNotFoundError at once, never 30 s of Hub retries."""
    from aquainterp.cli.args import resolve_data_source
    from aquainterp.cli.rundir import UsageError

    try:
        _kind, source = resolve_data_source(source)
    except UsageError as e:
        raise FileNotFoundError(str(e)) from None
    import datasets  # imported here: loading local files should not pay for it

    dataset = datasets.load_dataset(source, config, split=split)
    for index, row in enumerate(dataset):
        yield f"{source}:{split}:{index}", row


def source_rows(source: str | Path, config: str | None, split: str, missing: str) -> Iterator[tuple[str, Any]]:
    """Rows of a local JSON Lines or parquet file (split ignored) or else of a hub dataset; a .json/.jsonl/
    .parquet path that does not exist is FileNotFoundError("{missing}: {source}"), never a hub lookup."""
    if is_local(source):
        return parquet_rows(source) if Path(source).suffix == ".parquet" else local_rows(source)
    if Path(source).suffix in (".json", ".jsonl", ".parquet"):
        raise FileNotFoundError(f"{missing}: {source}")
    return hub_rows(str(source), config, split)


def load_rows(
    source: str | Path,
    rows: Iterator[tuple[str, Any]],
    parse: Callable[[str, Any], Any],
    skip_bad_rows: bool,
) -> list:
    """Apply `parse(where, row)` to every row; raise the first RowError, or skip, count and warn."""
    out, skipped, first = [], Counter(), {}
    for where, row in rows:
        try:
            if isinstance(row, RowError):
                raise row
            out.append(parse(where, row))
        except RowError as e:
            if not skip_bad_rows:
                raise
            skipped[e.kind] += 1
            first.setdefault(e.kind, str(e))
    if skipped:
        kinds = ", ".join(f"{n} {kind}" for kind, n in sorted(skipped.items()))
        examples = "; ".join(first.values())
        warnings.warn(
            f"{source}: skipped {sum(skipped.values())} bad rows ({kinds}); first of each: {examples}",
            stacklevel=3,
        )
    return out


def require_fields(where: str, row: Any, fields: dict[str, type]) -> None:
    """Check that `row` is an object with each field present and of the given type."""
    if not isinstance(row, dict):
        raise RowError(where, "not an object", f"expected a JSON object, got {type(row).__name__}")
    for name, kind in fields.items():
        if name not in row or row[name] is None:
            raise RowError(where, "missing field", f"field {name!r} is missing")
        if not isinstance(row[name], kind):
            raise RowError(where, "wrong type", f"field {name!r} must be {kind.__name__}, "
                                                f"got {type(row[name]).__name__}")
