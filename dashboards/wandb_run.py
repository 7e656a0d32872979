"""Read the history of an offline W&B run (the `run-<id>.wandb` file) without the network.

wandb 0.31 writes runs from its Go core and no longer ships a Python reader, so we read the file
format ourselves and decode each record with wandb's own protobuf classes (`wandb_internal_pb2`).
The container is LevelDB's log format (google/leveldb doc/log_format.md) behind a 7-byte W&B header:

    header := ident ":W&B" (4 bytes) | magic 0xBEE1 (uint16 LE) | version (uint8)
    file   := 32 KiB blocks; a block holds chunks and a zero trailer shorter than a chunk header
    chunk  := crc32 (uint32 LE) | length (uint16 LE) | type (FULL=1, FIRST=2, MIDDLE=3, LAST=4) | data
              (W&B's checksum is zlib.crc32 over the type byte, then the data)

The history rows come back in the shape of metrics.jsonl so the offline HTML report can take either.
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

IDENT = b":W&B"
MAGIC = 0xBEE1
HEADER = struct.Struct("<4sHB")
CHUNK = struct.Struct("<IHB")
BLOCK = 32768
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def find_wandb_file(path: str | Path) -> Path:
    """The .wandb file for a run dir, a wandb/ dir holding one offline run, or the file itself."""
    path = Path(path)
    if path.is_file():
        return path
    found = list(path.glob("run-*.wandb")) or list(path.glob("*/run-*.wandb")) \
        or list(path.glob("wandb/*/run-*.wandb"))
    candidates = sorted({c.resolve() for c in found})  # wandb/latest-run is a link to one of them
    if not candidates:
        raise FileNotFoundError(f"no W&B run file (run-*.wandb) in {path} or its wandb/ folder")
    if len(candidates) > 1:
        names = ", ".join(str(c.parent.name) for c in candidates)
        raise ValueError(f"{path} holds {len(candidates)} W&B runs ({names}); pass one run directory")
    return candidates[0]


def iter_records(path: str | Path) -> Iterator[bytes]:
    """Yield each record's bytes; ValueError names the file and offset on a bad header or checksum."""
    path = find_wandb_file(path)
    data = path.read_bytes()
    if len(data) < HEADER.size:
        raise ValueError(f"{path}: too short to be a W&B run file ({len(data)} bytes)")
    ident, magic, _version = HEADER.unpack_from(data, 0)
    if ident != IDENT or magic != MAGIC:
        raise ValueError(f"{path}: not a W&B run file (header {data[:7]!r})")
    pos, pending = HEADER.size, b""
    while pos + CHUNK.size <= len(data):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < CHUNK.size:  # zero trailer: skip to the next block
            pos += left_in_block
            continue
        crc, length, kind = CHUNK.unpack_from(data, pos)
        if crc == 0 and length == 0 and kind == 0:  # preallocated/zero-filled tail
            break
        start = pos + CHUNK.size
        chunk = data[start:start + length]
        if len(chunk) < length:
            break  # a run still being written: the last record is incomplete
        if zlib.crc32(chunk, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF != crc:
            raise ValueError(f"{path}: checksum mismatch in the record chunk at byte {pos}")
        pos = start + length
        if kind == FULL:
            yield chunk
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        elif kind == LAST:
            yield pending + chunk
            pending = b""
        else:
            raise ValueError(f"{path}: unknown chunk type {kind} at byte {pos}")


def _item_value(item):
    """A HistoryItem's value: W&B stores JSON text in value_json (older) or typed fields (newer)."""
    which = item.WhichOneof("value")
    if which and which != "value_json":
        value = getattr(item, which)
        return json.loads(value) if which == "json" else (None if which == "none" else value)
    return json.loads(item.value_json) if item.value_json else None


def read_history(path: str | Path) -> list[dict]:
    """History rows of an offline W&B run: {"_step": n, name: value, ...}, in logged order."""
    from wandb.proto import wandb_internal_pb2 as pb

    rows = []
    for raw in iter_records(path):
        record = pb.Record()
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") != "history":
            continue
        row: dict = {}
        for item in record.history.item:
            if item.nested_key:  # media objects arrive as one item per field: (name, field)
                *parents, leaf = item.nested_key
                node = row
                for part in parents:
                    node = node.setdefault(part, {})
                node[leaf] = _item_value(item)
            else:
                row[item.key] = _item_value(item)
        if record.history.HasField("step"):
            row.setdefault("_step", record.history.step.num)
        rows.append(row)
    return rows


def history_as_metrics(path: str | Path) -> list[dict]:
    """History rows converted to metrics.jsonl rows: `step` from the family step metric (rl/step, ...).

    W&B stores histograms as binned counts: they come back as {"_type": "histogram", "bins": [...],
    "counts": [...]}. Tables and plotly figures are files in the run's files/ folder: tables come back
    with their columns and rows, figures with the absolute path of their JSON.
    """
    files = find_wandb_file(path).parent / "files"
    rows = []
    for hist in read_history(path):
        step = None
        metrics: dict = {}
        for key, value in hist.items():
            if key.startswith("_"):
                continue
            if key.endswith("/step") and isinstance(value, int | float):
                step = int(value)
                continue
            if isinstance(value, dict):
                kind = value.get("_type")
                if kind == "histogram":
                    metrics[key] = {"_type": "histogram", "bins": value.get("bins"),
                                    "counts": value.get("values")}
                elif kind == "table-file":
                    table = json.loads((files / value["path"]).read_text(encoding="utf-8"))
                    metrics[key] = {"_type": "table", "columns": table["columns"], "rows": table["data"]}
                elif kind == "plotly-file":
                    metrics[key] = {"_type": "plotly", "path": str(files / value["path"])}
                continue
            if isinstance(value, bool | int | float) or value is None:
                metrics[key] = value
        if metrics:
            rows.append({"step": step if step is not None else int(hist.get("_step", 0)), **metrics})
    return rows
