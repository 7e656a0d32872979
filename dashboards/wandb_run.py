"""Read the history of an offline W&B run (the `run-<id>.wandb` file) without the network.

The records come from aquainterp.logger.iter_wandb_records (the file format is described there) and
are decoded with wandb's own protobuf classes (`wandb_internal_pb2`). History rows come back in the
shape of metrics.jsonl, so the offline HTML report can take either source.
"""

from __future__ import annotations

import json
from pathlib import Path

from aquainterp.cli.rundir import contained_path
from aquainterp.logger import find_wandb_files, iter_wandb_records


def _item_value(item):
    """A HistoryItem's value: W&B stores JSON text in value_json (older) or typed fields (newer)."""
    which = item.WhichOneof("value")
    if which and which != "value_json":
        value = getattr(item, which)
        return json.loads(value) if which == "json" else (None if which == "none" else value)
    return json.loads(item.value_json) if item.value_json else None


def read_history(path: str | Path) -> list[dict]:
    """History rows of an offline W&B run (its latest segment): {"_step": n, name: value, ...}, in logged order."""
    from wandb.proto import wandb_internal_pb2 as pb

    rows = []
    for raw in iter_wandb_records(path):
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
    segments = [_segment_metrics(f) for f in find_wandb_files(path)]
    rows: list[dict] = []
    for i, segment in enumerate(segments):
        # a resumed run: a segment ends where the next one restarted (rows logged after the checkpoint
        # the next segment resumed from were rolled back, as in metrics.jsonl)
        later = [r["step"] for r in segments[i + 1]] if i + 1 < len(segments) else []
        cut = min(later) if later else None
        rows.extend(r for r in segment if cut is None or r["step"] < cut)
    return rows


def _segment_metrics(wandb_file: Path) -> list[dict]:
    files = wandb_file.parent / "files"
    rows = []
    for hist in read_history(wandb_file):
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
                    # a path from the run's own history: it may only name a file of this run
                    table_path = contained_path(files, str(value.get("path", "")), f"{key}: table file")
                    table = json.loads(table_path.read_text(encoding="utf-8"))
                    metrics[key] = {"_type": "table", "columns": table["columns"], "rows": table["data"]}
                elif kind == "plotly-file":  # html.image_figure checks that it stays inside the run
                    metrics[key] = {"_type": "plotly", "path": str(files / str(value.get("path", "")))}
                continue
            if isinstance(value, bool | int | float) or value is None:
                metrics[key] = value
        if metrics:
            rows.append({"step": step if step is not None else int(hist.get("_step", 0)), **metrics})
    return rows
