"""One logger for every stage: Weights & Biases (online, offline or disabled) plus a local metrics.jsonl.

The local file is the source of truth that always exists: one JSON object per `log*` call, with the
explicit `step` and the same metric names W&B gets (docs/design.md "Metric names"). Histograms, tables and
figures go to W&B as W&B objects; locally they are written as their raw values under the same name,
wrapped in an object with a `_type` marker (the same convention W&B uses in its own summaries):

    {"step": 3, "rl/acc": 0.5, "rl/mean_reward": 0.25}
    {"step": 3, "rl/letter_margin": {"_type": "histogram", "values": [0.1, 2.3]}}
    {"step": 3, "rl/hardest": {"_type": "table", "columns": ["q", "margin"], "rows": [["1+1", -2.0]]}}
    {"step": 3, "attn/heatmap": {"_type": "plotly", "path": "media/attn_heatmap_000003.json"}}

W&B plots every metric family against its own step metric (`define_metric`): `rl/*` and `attn/*`
against `rl/step`, `train/*` against `train/step` and so on, so stages that restart their step count
inside one W&B run still plot correctly. We never pass `step=` to `wandb.log` for the same reason.

Logging must never kill a training run: if W&B cannot start online (no login, no network) the logger
falls back to offline with one warning, and any later W&B error is warned about once while local
logging goes on. A row that cannot be written to metrics.jsonl (a full disk) is never silent either: the
file is cut back to its last whole row, the first failure is warned about at once, and `finish` warns
with how many rows were lost. Wrong arguments (a non-number value, a non-integer step) are programming
errors and raise at once with the name of the metric. On ranks other than 0 the logger does nothing.

Resuming (`truncate_from=S`, what the stages pass on --resume): the record is restored to the checkpoint
first. Rows with step >= S were logged after it; they, and a partial last line a kill or a full disk left,
are moved to metrics.rolled-back-<n>.jsonl (said on the console) before anything new is written, and the
W&B run of the folder resumes under the same id (offline: a new offline-run folder with that id, which
`wandb sync` appends to the same run; dashboards.wandb_run reads the folders as one history).
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
import time
import warnings
import zlib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

MODES = ("online", "offline", "disabled")
METRICS_FILE = "metrics.jsonl"
MEDIA_DIR = "media"

# Families whose x-axis is another family's step (probes run inside the RL loop).
STEP_FAMILY = {"attn": "rl", "probe": "rl", "faith": "rl"}


def step_metric_for(name: str) -> str | None:
    """The W&B step metric a metric plots against: 'rl/acc' -> 'rl/step', 'attn/x', 'probe/x' and 'faith/x' -> 'rl/step'."""
    family, sep, _rest = name.partition("/")
    if not sep or not family:
        return None
    return f"{STEP_FAMILY.get(family, family)}/step"


def _scalar(name: str, value: Any) -> int | float:
    """A plain Python number from int/float/bool/numpy/0-d torch values; TypeError names the metric."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int | float):
        return value
    item = getattr(value, "item", None)
    if callable(item):
        try:
            value = item()
        except (ValueError, RuntimeError) as e:  # numpy/torch arrays with more than one element
            raise TypeError(f"Logger.log: metric {name!r} must be a single number, got an array ({e})") from e
        if isinstance(value, bool | int | float):
            return int(value) if isinstance(value, bool) else value
    raise TypeError(f"Logger.log: metric {name!r} must be a number, got {type(value).__name__}: {value!r:.80}")


def _check_step(step: Any, where: str) -> int:
    if isinstance(step, bool) or not isinstance(step, int):
        item = getattr(step, "item", None)
        step = item() if callable(item) else step
        if isinstance(step, bool) or not isinstance(step, int):
            raise TypeError(f"{where}: step must be an integer, got {type(step).__name__}: {step!r:.80}")
    if step < 0:
        raise ValueError(f"{where}: step must be >= 0, got {step}")
    return step


def _check_name(name: Any, where: str) -> str:
    if not isinstance(name, str) or not name or name == "step":
        raise ValueError(f"{where}: metric name must be a non-empty string other than 'step', got {name!r}")
    return name


def _floats(name: str, values: Any) -> list[float]:
    """Flatten numbers, lists, numpy arrays or torch tensors into a list of floats."""
    tolist = getattr(values, "tolist", None)
    if callable(tolist):
        values = tolist()
    out: list[float] = []

    def walk(v: Any) -> None:
        if isinstance(v, list | tuple):
            for x in v:
                walk(x)
        else:
            out.append(float(_scalar(name, v)))

    walk(values)
    return out


def _jsonable(name: str, value: Any) -> Any:
    """Table cells: numbers, strings, booleans and None pass; anything with .item() is unwrapped."""
    if value is None or isinstance(value, str | bool | int | float):
        return value
    item = getattr(value, "item", None)
    if callable(item):
        return item()
    raise TypeError(f"Logger.log_table: a cell of {name!r} must be a number, string, bool or None, "
                    f"got {type(value).__name__}")


class Logger:
    """W&B + metrics.jsonl with the same names and an explicit step. See the module docstring."""

    def __init__(self, run_dir: str | os.PathLike, project: str = "aquainterp", run_name: str | None = None,
                 mode: str = "offline", config: dict | None = None, rank: int = 0, truncate_from: int | None = None):
        if mode not in MODES:
            raise ValueError(f"Logger: mode must be one of {', '.join(MODES)}, got {mode!r}")
        self.run_dir = Path(run_dir)
        self.mode = mode
        self.active = rank == 0
        self.wandb_run = None
        self._warned: set[str] = set()
        self._defined_families: set[str] = set()
        self._file = None
        self.rows_written = 0
        self.rows_lost = 0
        self._first_error: str | None = None
        self.rolled_back: Path | None = None
        if not self.active:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.rolled_back = restore_metrics(self.run_dir / METRICS_FILE, truncate_from)
        path = self.run_dir / METRICS_FILE
        self._file = open(path, "ab", buffering=0)  # noqa: SIM115 (closed in finish); unbuffered: whole rows or none
        self._size = self._file.seek(0, os.SEEK_END)
        if mode != "disabled":
            resume_id = previous_wandb_id(self.run_dir) if truncate_from is not None else None
            self.wandb_run = self._start_wandb(project, run_name, mode, config, resume_id)

    # ----------------------------------------------------------------------------------------- W&B
    def _start_wandb(self, project, run_name, mode, config, resume_id=None):
        """wandb.init in the requested mode; online failing falls back to offline with one warning.
        With `resume_id` (a resumed run), the W&B run of that id continues."""
        try:
            import wandb
        except Exception as e:  # a broken install must not stop training
            self._warn_once("import", f"Logger: wandb could not be imported ({e}); logging to "
                            f"{self.run_dir / METRICS_FILE} only")
            return None
        settings = wandb.Settings(console="off", x_disable_stats=True, save_code=False, silent=True,
                                  init_timeout=30)
        attempts = [mode] if mode == "offline" else ["online", "offline"]
        for attempt in attempts:
            try:
                same = {"id": resume_id, "resume": "allow"} if resume_id else {}
                return wandb.init(project=project, name=run_name, dir=str(self.run_dir), mode=attempt,
                                  config=config, settings=settings, reinit="create_new", **same)
            except Exception as e:
                if attempt == "online":
                    self._warn_once("online", f"Logger: W&B could not start online ({type(e).__name__}: "
                                    f"{e}); falling back to offline mode. Upload later with "
                                    f"`wandb sync {self.run_dir / 'wandb'}/offline-run-*`.")
                    self.mode = "offline"
                else:
                    self._warn_once("offline", f"Logger: W&B could not start offline ({type(e).__name__}: "
                                    f"{e}); logging to {self.run_dir / METRICS_FILE} only")
        return None

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, RuntimeWarning, stacklevel=3)

    def _wandb_log(self, payload: dict) -> None:
        """Send to W&B with the step metrics of every family in the payload; errors warn once."""
        if self.wandb_run is None:
            return
        try:
            for name in list(payload):
                step_name = step_metric_for(name)
                family = name.partition("/")[0]
                if step_name and family not in self._defined_families:
                    self._defined_families.add(family)
                    self.wandb_run.define_metric(step_name)
                    self.wandb_run.define_metric(f"{family}/*", step_metric=step_name)
            self.wandb_run.log(payload)
        except Exception as e:
            self._warn_once("log", f"Logger: W&B logging failed ({type(e).__name__}: {e}); local logging "
                            f"to {self.run_dir / METRICS_FILE} goes on")

    def _with_steps(self, payload: dict, step: int) -> dict:
        for name in list(payload):
            step_name = step_metric_for(name)
            if step_name:
                payload[step_name] = step
        return payload

    # -------------------------------------------------------------------------------------- local
    def _write(self, row: dict) -> None:
        """One whole row or none: a failed or short write is cut back off the file, counted and warned."""
        data = (json.dumps(row) + "\n").encode("utf-8")
        try:
            written = self._file.write(data)
            if written != len(data):
                raise OSError(f"short write ({written} of {len(data)} bytes)")
            self._size += len(data)
            self.rows_written += 1
        except OSError as e:
            self.rows_lost += 1
            try:
                os.truncate(self.run_dir / METRICS_FILE, self._size)  # no partial row stays behind
            except OSError:
                pass
            if self._first_error is None:
                self._first_error = f"{type(e).__name__}: {e}"
                self._warn_once("file", f"Logger: could not write a row to {self.run_dir / METRICS_FILE} "
                                f"({self._first_error}); rows are being lost (counted at finish)")

    # --------------------------------------------------------------------------------- public API
    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        """Scalars: one jsonl row {"step": step, name: value, ...} and one wandb.log call."""
        if not self.active:
            return
        step = _check_step(step, "Logger.log")
        if not isinstance(metrics, Mapping):
            raise TypeError(f"Logger.log: metrics must be a dict of name -> number, got {type(metrics).__name__}")
        row: dict[str, Any] = {"step": step}
        for name, value in metrics.items():
            row[_check_name(name, "Logger.log")] = _scalar(name, value)
        self._write(row)
        if self.wandb_run is not None:
            payload = {k: v for k, v in row.items() if k != "step"}
            self._wandb_log(self._with_steps(payload, step))

    def log_histogram(self, name: str, values: Any, step: int) -> None:
        """A distribution (e.g. per-question letter margins): raw values locally, wandb.Histogram online."""
        if not self.active:
            return
        step = _check_step(step, "Logger.log_histogram")
        name = _check_name(name, "Logger.log_histogram")
        vals = _floats(name, values)
        if not vals:
            raise ValueError(f"Logger.log_histogram: {name!r} got no values")
        self._write({"step": step, name: {"_type": "histogram", "values": vals}})
        if self.wandb_run is not None:
            finite = [v for v in vals if math.isfinite(v)]
            try:
                import wandb

                obj = wandb.Histogram(finite if finite else [0.0])
            except Exception as e:
                self._warn_once("histogram", f"Logger: wandb.Histogram failed for {name!r} ({e})")
                return
            self._wandb_log(self._with_steps({name: obj}, step))

    def log_table(self, name: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], step: int) -> None:
        """A small table (e.g. the hardest questions): rows locally, wandb.Table online."""
        if not self.active:
            return
        step = _check_step(step, "Logger.log_table")
        name = _check_name(name, "Logger.log_table")
        columns = [str(c) for c in columns]
        clean_rows = []
        for i, r in enumerate(rows):
            r = list(r)
            if len(r) != len(columns):
                raise ValueError(f"Logger.log_table: row {i} of {name!r} has {len(r)} cells, "
                                 f"expected {len(columns)} ({columns})")
            clean_rows.append([_jsonable(name, c) for c in r])
        self._write({"step": step, name: {"_type": "table", "columns": columns, "rows": clean_rows}})
        if self.wandb_run is not None:
            try:
                import wandb

                obj = wandb.Table(columns=columns, data=clean_rows)
            except Exception as e:
                self._warn_once("table", f"Logger: wandb.Table failed for {name!r} ({e})")
                return
            self._wandb_log(self._with_steps({name: obj}, step))

    def log_figure(self, name: str, plotly_figure: Any, step: int) -> None:
        """A plotly figure: its JSON in media/ (referenced from the jsonl row), wandb.Plotly online."""
        if not self.active:
            return
        step = _check_step(step, "Logger.log_figure")
        name = _check_name(name, "Logger.log_figure")
        to_json = getattr(plotly_figure, "to_json", None)
        if not callable(to_json):
            raise TypeError(f"Logger.log_figure: {name!r} must be a plotly Figure, got "
                            f"{type(plotly_figure).__name__}")
        rel = Path(MEDIA_DIR) / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', name)}_{step:06d}.json"
        try:
            (self.run_dir / MEDIA_DIR).mkdir(exist_ok=True)
            (self.run_dir / rel).write_text(to_json(), encoding="utf-8")
        except Exception as e:
            self._warn_once("media", f"Logger: could not write {self.run_dir / rel} ({e})")
        self._write({"step": step, name: {"_type": "plotly", "path": rel.as_posix()}})
        if self.wandb_run is not None:
            try:
                import wandb

                obj = wandb.Plotly(plotly_figure)
            except Exception as e:
                self._warn_once("figure", f"Logger: wandb.Plotly failed for {name!r} ({e})")
                return
            self._wandb_log(self._with_steps({name: obj}, step))

    def finish(self) -> None:
        """Close the local file and finish the W&B run (flushes offline data to disk). Idempotent."""
        if self._file is not None:
            self._file.close()
            self._file = None
            if self.rows_lost:
                self._warn_once("lost", f"Logger: {self.rows_lost} of {self.rows_lost + self.rows_written} rows "
                                f"could not be written to {self.run_dir / METRICS_FILE} (first error: "
                                f"{self._first_error})")
        if self.wandb_run is not None:
            run, self.wandb_run = self.wandb_run, None
            try:
                run.finish()
                if self.mode == "offline":
                    self._wait_for_run_file(Path(run.dir).parent / f"run-{run.id}.wandb")
            except Exception as e:
                self._warn_once("finish", f"Logger: wandb finish failed ({e})")

    def _wait_for_run_file(self, path: Path, timeout: float = 30.0) -> None:
        """wandb's finish() can return before its core has written the run file: wait for the exit record.

        Then `wandb sync`, dashboards.wandb_run and the HTML report see the whole run right away.
        """
        from wandb.proto import wandb_internal_pb2 as pb

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                for raw in iter_wandb_records(path):
                    record = pb.Record()
                    record.ParseFromString(raw)
                    if record.WhichOneof("record_type") == "exit":
                        return
            except (FileNotFoundError, ValueError):
                pass  # not created or half written yet
            time.sleep(0.05)
        self._warn_once("exit", f"Logger: {path} has no exit record {timeout:.0f} s after finish(); "
                        "the offline run may be incomplete")

    def __enter__(self) -> Logger:
        return self

    def __exit__(self, *exc) -> None:
        self.finish()


ASIDE_NAME = "metrics.rolled-back-{}.jsonl"


def restore_metrics(path: Path, truncate_from: int | None) -> Path | None:
    """Before appending to `path`: move its rows with step >= truncate_from (None: none) and a partial
    last line to the next free metrics.rolled-back-<n>.jsonl beside it, say so on stdout, and return that
    file (None when nothing moved). The kept rows are rewritten through a temp file and a rename."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    keep, aside, moved_steps, partial = [], [], [], 0
    for line in data.splitlines(keepends=True):
        if not line.endswith(b"\n"):
            aside.append(line + b"\n")
            partial = len(line)
            continue
        step = None
        if truncate_from is not None:
            try:
                row = json.loads(line)
                step = row.get("step") if isinstance(row, dict) else None
            except ValueError:
                step = None
        if isinstance(step, int) and step >= truncate_from:
            aside.append(line)
            moved_steps.append(step)
        else:
            keep.append(line)
    if not aside:
        return None
    n = 1
    while (path.parent / ASIDE_NAME.format(n)).exists():
        n += 1
    target = path.parent / ASIDE_NAME.format(n)
    target.write_bytes(b"".join(aside))
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    tmp.write_bytes(b"".join(keep))
    os.replace(tmp, path)
    said = []
    if moved_steps:
        said.append(f"{len(moved_steps)} rows logged after the checkpoint (steps {min(moved_steps)}-{max(moved_steps)})")
    if partial:
        said.append(f"a partial last line ({partial} bytes, cut off mid-write)")
    print(f"Logger: moved {' and '.join(said)} of {path} to {target}", flush=True)
    return target


def previous_wandb_id(run_dir: Path) -> str | None:
    """The id of the latest W&B run in run_dir/wandb (offline-run-<time>-<id> or run-<time>-<id>)."""
    found = []
    for p in (run_dir / "wandb").glob("*run-*-*"):
        m = re.fullmatch(r"(?:offline-)?run-(\d{8}_\d{6})-([a-z0-9]+)", p.name)
        if m and p.is_dir():
            found.append((m.group(1), m.group(2)))
    return max(found)[1] if found else None


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """All rows of a metrics.jsonl (a run dir or the file itself); errors name the file and line."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no metrics file at {path} (the Logger writes run_dir/{METRICS_FILE})")
    rows = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not UTF-8 (byte {raw[e.start]:#04x} at column {e.start + 1})") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from e
            except RecursionError:
                raise ValueError(f"{path}:{lineno}: JSON nested too deeply to be a metrics row") from None
            if not isinstance(row, dict) or not isinstance(row.get("step"), int):
                raise ValueError(f"{path}:{lineno}: each line must be an object with an integer 'step'")
            rows.append(row)
    return rows


# ------------------------------------------------------------------ reading an offline W&B run file
# wandb 0.31 writes runs from its Go core and no longer ships a Python reader, so we read the file
# ourselves (records are wandb's own protobufs, decoded by dashboards.wandb_run). The container is
# LevelDB's log format (google/leveldb doc/log_format.md) behind a 7-byte W&B header:
#   header := ident ":W&B" (4 bytes) | magic 0xBEE1 (uint16 LE) | version (uint8)
#   file   := 32 KiB blocks; a block holds chunks and a zero trailer shorter than a chunk header
#   chunk  := crc32 (uint32 LE) | length (uint16 LE) | type (FULL=1, FIRST=2, MIDDLE=3, LAST=4) | data
#             (W&B's checksum is zlib.crc32 over the type byte, then the data)
WANDB_IDENT = b":W&B"
WANDB_MAGIC = 0xBEE1
WANDB_HEADER = struct.Struct("<4sHB")
_CHUNK = struct.Struct("<IHB")
_BLOCK = 32768
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def find_wandb_files(path: str | Path) -> list[Path]:
    """The .wandb file(s) of one W&B run, oldest first: a run dir, its wandb/ folder, or the file itself.
    A resumed run has one folder per segment, all with its id; runs with different ids are refused."""
    path = Path(path)
    if path.is_file():
        return [path]
    found = list(path.glob("run-*.wandb")) or list(path.glob("*/run-*.wandb")) \
        or list(path.glob("wandb/*/run-*.wandb"))
    candidates = sorted({c.resolve() for c in found})  # wandb/latest-run is a link to one of them
    if not candidates:
        raise FileNotFoundError(f"no W&B run file (run-*.wandb) in {path} or its wandb/ folder")
    ids = sorted({c.stem.removeprefix("run-") for c in candidates})
    if len(ids) > 1:
        names = ", ".join(str(c.parent.name) for c in candidates)
        raise ValueError(f"{path} holds {len(ids)} W&B runs ({names}); pass one run directory")

    def started(c: Path) -> str:  # folder names: [offline-]run-<YYYYmmdd_HHMMSS>-<id>
        m = re.search(r"run-(\d{8}_\d{6})-", c.parent.name)
        return m.group(1) if m else c.parent.name

    return sorted(candidates, key=lambda c: (started(c), c.parent.name))


def find_wandb_file(path: str | Path) -> Path:
    """The .wandb file for a run dir, a wandb/ dir holding one offline run, or the file itself (a resumed
    run: its latest segment; find_wandb_files gives them all)."""
    return find_wandb_files(path)[-1]


def iter_wandb_records(path: str | Path) -> Iterator[bytes]:
    """Yield each record's bytes; ValueError names the file and offset on a bad header or checksum."""
    path = find_wandb_file(path)
    data = path.read_bytes()
    if len(data) < WANDB_HEADER.size:
        raise ValueError(f"{path}: too short to be a W&B run file ({len(data)} bytes)")
    ident, magic, _version = WANDB_HEADER.unpack_from(data, 0)
    if ident != WANDB_IDENT or magic != WANDB_MAGIC:
        raise ValueError(f"{path}: not a W&B run file (header {data[:7]!r})")
    pos, pending = WANDB_HEADER.size, b""
    while pos + _CHUNK.size <= len(data):
        left_in_block = _BLOCK - pos % _BLOCK
        if left_in_block < _CHUNK.size:  # zero trailer: skip to the next block
            pos += left_in_block
            continue
        crc, length, kind = _CHUNK.unpack_from(data, pos)
        if crc == 0 and length == 0 and kind == 0:  # preallocated/zero-filled tail
            break
        start = pos + _CHUNK.size
        chunk = data[start:start + length]
        if len(chunk) < length:
            break  # a run still being written: the last record is incomplete
        if zlib.crc32(chunk, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF != crc:
            raise ValueError(f"{path}: checksum mismatch in the record chunk at byte {pos}")
        pos = start + length
        if kind == _FULL:
            yield chunk
        elif kind == _FIRST:
            pending = chunk
        elif kind == _MIDDLE:
            pending += chunk
        elif kind == _LAST:
            yield pending + chunk
            pending = b""
        else:
            raise ValueError(f"{path}: unknown chunk type {kind} at byte {pos}")
