"""What a command may delete or overwrite: only what it created, never its own inputs.

Three rules, shared by the demo, the training stages and the commands that write files:

- Ownership markers. A command that creates a directory it may later delete writes `.aquainterp-owner`
  (JSON: owner, what, created) into it. `assert_owned` refuses a directory without the right marker,
  naming it, so `aquainterp demo --out runs` never deletes `runs/base` made by `training.base`, nor a
  user's folder that happens to have a stage's name.
- Run directories. A stage refuses a run directory whose `checkpoints/` already holds something unless
  `--resume` (continue it) or `--overwrite` (delete its checkpoints and metrics first) is given: a second
  run with the same `--run-dir` would otherwise interleave its steps with the old run's ("latest" could be
  the old run's) and append duplicate steps to metrics.jsonl.
- Outputs never over inputs: `check_output` refuses an output path that is, contains or lies inside one
  of the command's inputs (export into a checkpoint folder, `dashboard html -o RUN/metrics.jsonl`).

`inside(base, path)` is the containment test (resolved, symlinks included) that also keeps paths read
from data files and templates inside their run directory.

The one rule for every output flag (`claim_output`, issue 30): a command writes only into paths it
created or that carry its ownership record, and never onto a path it reads.

- A file output (`eval --json`, `dashboard html -o`, ...) may replace an existing file only when the
  ledger in the file's folder (the `.aquainterp-owner` JSON, key "files") says this command wrote it and
  its size and mtime are still what were recorded (an edited file is the user's now).
- A folder output (`export OUT`, `patch --out`, `tok_train --out-dir`, ...) must be new, empty (markers
  aside) or hold only files this command wrote there, unchanged.
- Never, even with `--overwrite`: a path that is, contains or lies in one of the command's inputs; a path
  inside a checkpoint's step folder; a run's record (its metrics.jsonl, its wandb/ folder).
- `--overwrite`, where a command has it, lifts the ownership rule only.
Every output flag is declared with the argparse type `output_path(kind)`, so tests can list them all.

One writer per run folder: `RunLock` (`.aquainterp-lock`: pid, host, start time, command) is taken before
anything is written; a live holder is refused by name, a dead one's lock (same host) is taken over with a
notice.

All refusals raise RunDirError, a UsageError: the command line boundary prints one line and exits 2.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import shutil
import socket
import sys
import time
from pathlib import Path

MARKER = ".aquainterp-owner"
LOCK = ".aquainterp-lock"
HIDDEN = (MARKER, LOCK)  # bookkeeping files: a folder holding only these counts as empty
_STEP_DIR = re.compile(r"^step_\d{6,}$")
_TEMP_DIR = re.compile(r"^\.(tmp|old)_step_\d{6,}_\d+$")
RUN_FILES = ("metrics.jsonl",)  # what a stage appends to: removed with the checkpoints by --overwrite
ASIDE = re.compile(r"^metrics\.rolled-back-\d+\.jsonl$")  # rows a --resume moved aside (aquainterp.logger)


class UsageError(ValueError):
    """A command line that cannot work as given (exit status 2 at the CLI boundary)."""


class RunDirError(UsageError):
    """A directory or file the command refuses to delete, overwrite or reuse."""


# ----------------------------------------------------------------------------------------------
# containment


def inside(base: str | Path, path: str | Path) -> bool:
    """True when `path` (relative paths are taken from `base`) resolves to `base` or below it.
    Symlinks are resolved on both sides, so a link inside the run dir pointing out of it is outside."""
    base = Path(base).resolve()
    p = Path(path)
    p = (p if p.is_absolute() else base / p).resolve()
    return p == base or base in p.parents


def contained_path(base: str | Path, path: str | Path, what: str) -> Path:
    """`path` resolved under `base`, or RunDirError naming both when it escapes (../, absolute, symlink)."""
    if not inside(base, path):
        raise RunDirError(f"{what} {str(path)!r} points outside {base}; refusing to read it")
    p = Path(path)
    return (p if p.is_absolute() else Path(base) / p).resolve()


# ----------------------------------------------------------------------------------------------
# ownership markers


def write_marker(directory: str | Path, owner: str, what: str = "") -> None:
    """Mark `directory` as created by `owner` (the files it recorded there are kept)."""
    files = _ledger(directory).get("files", {})
    _write_ledger(directory, {"owner": owner, "what": what, "created": time.time(), "files": files})


def _ledger(directory: str | Path) -> dict:
    try:
        record = json.loads((Path(directory) / MARKER).read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _write_ledger(directory: str | Path, record: dict) -> None:
    directory = Path(directory)
    tmp = directory / f"{MARKER}.tmp.{os.getpid()}"
    tmp.write_text(json.dumps(record))
    os.replace(tmp, directory / MARKER)


def owner_of(directory: str | Path) -> str | None:
    try:
        record = json.loads((Path(directory) / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return record.get("owner") if isinstance(record, dict) else None


def foreign(paths, owner: str, legacy=None) -> list[Path]:
    """The existing paths among `paths` that `owner` did not create (no marker of its own, and not
    recognised by `legacy(path)` for folders written before markers existed)."""
    out = []
    for p in map(Path, paths):
        if not p.exists() and not p.is_symlink():
            continue
        if p.is_dir() and not p.is_symlink() and (owner_of(p) == owner or (legacy is not None and legacy(p))):
            continue
        out.append(p)
    return out


def remove_owned(directory: str | Path, owner: str, legacy=None) -> None:
    """Delete `directory` only if `owner` created it; RunDirError otherwise."""
    bad = foreign([directory], owner, legacy)
    if bad:
        raise RunDirError(f"{bad[0]} was not created by {owner} (no {MARKER} of its own); refusing to delete it. "
                          "Move it away or choose another output folder")
    if Path(directory).exists():
        shutil.rmtree(directory)


def _fingerprint(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def _files_under(directory: Path) -> list[Path]:
    """Every file (and symlink) below `directory`, bookkeeping files excluded."""
    out = []
    for root, dirs, files in os.walk(directory):
        for name in files + [d for d in dirs if (Path(root) / d).is_symlink()]:
            p = Path(root) / name
            if name not in HIDDEN and not name.startswith(MARKER):
                out.append(p)
    return sorted(out)


def written_by(path: str | Path, owner: str) -> bool:
    """True when the ledger of `path`'s folder says `owner` wrote it and it is unchanged since."""
    path = Path(path)
    if path.is_symlink() or not path.is_file():
        return False
    entry = _ledger(path.parent).get("files", {}).get(path.name)
    return isinstance(entry, dict) and entry.get("by") == owner and entry.get("fp") == _fingerprint(path)


def record_written(paths, owner: str) -> None:
    """Note in each file's folder ledger that `owner` wrote it (as it is now). For a folder output, pass
    the folder: every file under it is recorded in its own ledger, by path relative to it."""
    by_folder: dict[Path, dict[str, Path]] = {}
    for p in map(Path, paths):
        if p.is_dir():
            for f in _files_under(p):
                by_folder.setdefault(p, {})[f.relative_to(p).as_posix()] = f
        elif p.is_file():
            by_folder.setdefault(p.parent, {})[p.name] = p
    for folder, files in by_folder.items():
        # a folder output is the command's own (its owner, unless a marker says otherwise); the folder of
        # a file output is not: its ledger only lists the files
        fresh = {"owner": owner, "what": "outputs", "created": time.time()} if folder in map(Path, paths) else {}
        record = _ledger(folder) or fresh
        ledger = record.setdefault("files", {})
        for name, f in files.items():
            ledger[name] = {"by": owner, "fp": _fingerprint(f)}
        _write_ledger(folder, record)


def write_output(path: str | Path, data: str | bytes, owner: str) -> Path:
    """Write a file output atomically (a temp file, then rename) and record it as `owner`'s."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    try:
        tmp.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise OSError(e.errno, f"could not write {path}: {e.strerror or e}") from None
    record_written([path], owner)
    return path


# ----------------------------------------------------------------------------------------------
# run directories of the training stages


def previous_run(run_dir: str | Path) -> list[str]:
    """What a earlier run left in `run_dir`: checkpoint entries and non-empty metrics files."""
    run_dir = Path(run_dir)
    found = []
    ckpt = run_dir / "checkpoints"
    if ckpt.is_dir():
        entries = sorted(p.name for p in ckpt.iterdir())
        if entries:
            found.append(f"{ckpt}/ ({', '.join(entries[:3])}{' ...' if len(entries) > 3 else ''})")
    elif ckpt.exists():
        found.append(f"{ckpt} (not a folder)")
    for name in RUN_FILES:
        f = run_dir / name
        if f.is_file() and f.stat().st_size > 0:
            found.append(str(f))
    return found


RUN_ENTRIES = ("checkpoints", "metrics.jsonl", "wandb", "media", "summary.json")  # what a stage writes


def claim_run_dir(run_dir: str | Path, *, resume: bool, overwrite: bool, flag: str = "--run-dir",
                  is_main: bool = True, command: str = "a training stage", inputs=()) -> RunLock | None:
    """Call before a stage touches anything; returns the run folder's RunLock (rank 0; None elsewhere),
    which the stage releases when it ends.

    Never: a run folder that is, holds or lies in an input, lies in a checkpoint or a run's W&B record,
    or cannot be created. Then, under the lock: a fresh or empty run dir passes; one holding files a stage
    does not write (a user's folder) is refused unless --overwrite; with --resume an earlier run passes
    (the stage continues from the latest checkpoint); with --overwrite the old run's checkpoints and
    metrics are deleted (rank 0 only; other files stay); otherwise RunDirError naming what is there."""
    if resume and overwrite:
        raise RunDirError("--resume and --overwrite contradict each other: give one")
    check_output(run_dir, [i for i in inputs if i is not None and Path(i).exists()], flag)
    why = protected(run_dir, run_folder_ok=True)
    if why:
        raise RunDirError(f"{flag} {run_dir} {why}; choose another {flag}")
    check_can_create(run_dir, flag)
    lock = RunLock(run_dir, command).acquire() if is_main else None
    try:
        _claim_locked(Path(run_dir), resume, overwrite, flag, is_main)
    except BaseException:
        if lock is not None:
            lock.release()
            lock._undo_dir()
        raise
    return lock


def _claim_locked(run_dir: Path, resume: bool, overwrite: bool, flag: str, is_main: bool) -> None:
    others = sorted(p.name for p in run_dir.iterdir() if p.name not in RUN_ENTRIES and p.name not in HIDDEN
                    and not p.name.startswith(MARKER) and not ASIDE.match(p.name)) if run_dir.is_dir() else []
    if others and not overwrite:
        raise RunDirError(f"{flag} {run_dir} holds files that are not a run's ({', '.join(others[:3])}"
                          f"{' ...' if len(others) > 3 else ''}); choose a new or empty folder "
                          "(--overwrite writes the run there anyway)")
    found = previous_run(run_dir)
    if not found or resume:
        return
    if not overwrite:
        raise RunDirError(f"{flag} {run_dir} holds a previous run ({'; '.join(found)}); "
                          "pass --resume to continue it, --overwrite to replace it, or choose another " + flag)
    if not is_main:
        return
    ckpt = Path(run_dir) / "checkpoints"
    if ckpt.is_dir():
        for p in ckpt.iterdir():  # only what a stage writes there; anything else is the user's
            if p.is_dir() and (_STEP_DIR.match(p.name) or _TEMP_DIR.match(p.name)):
                shutil.rmtree(p)
    for name in RUN_FILES:
        (Path(run_dir) / name).unlink(missing_ok=True)
    for p in Path(run_dir).iterdir():
        if ASIDE.match(p.name):
            p.unlink()


# ----------------------------------------------------------------------------------------------
# outputs never over inputs


def check_output(output: str | Path, inputs, flag: str) -> None:
    """RunDirError when `output` is one of `inputs`, lies inside one of them (when it is a folder), or
    contains one (writing a folder there would mix or replace it). Paths are compared resolved."""
    out = Path(output).resolve()
    for given in inputs:
        if given is None:
            continue
        src = Path(given).resolve()
        if out == src:
            raise RunDirError(f"{flag} {output} is this command's input {given}; refusing to overwrite it")
        if src in out.parents and src.is_dir():
            raise RunDirError(f"{flag} {output} lies inside the input {given}; refusing to write there")
        if out in src.parents:
            raise RunDirError(f"{flag} {output} contains the input {given}; refusing to write over it")


def check_can_create(path: str | Path, flag: str, folder: bool = True) -> None:
    """RunDirError now, not after hours of work, when `path` cannot be created or written: it (or a
    parent) is a file where a folder is needed, or the nearest existing folder is not writable."""
    p = Path(path)
    if p.exists():
        if folder and not p.is_dir():
            raise RunDirError(f"{flag} {path} is a file, not a folder")
        if not folder and p.is_dir():
            raise RunDirError(f"{flag} {path} is a folder, not a file")
        if not os.access(p if p.is_dir() else p.parent, os.W_OK):
            raise RunDirError(f"{flag} {path}: not writable")
        return
    parent = p.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise RunDirError(f"{flag} {path}: {parent} is a file, so the path cannot be created")
    if not os.access(parent, os.W_OK):
        raise RunDirError(f"{flag} {path}: the folder {parent} is not writable")


# ----------------------------------------------------------------------------------------------
# the one rule for output flags


OUTPUT_KINDS = ("file", "dir", "file|dir", "run", "root")


def output_path(kind: str, cast=str):
    """argparse type of every output flag: the path (as `cast` makes it: str or Path), tagged with `output_kind` so the parsers
    can be searched for outputs (tests/reliability/test_outputs.py checks each one against claim_output).
    kind: file, dir, file|dir (the command decides), run (a stage's run folder), root (the demo's folder
    of stage folders)."""
    if kind not in OUTPUT_KINDS:
        raise ValueError(f"output_path: kind must be one of {OUTPUT_KINDS}, got {kind!r}")

    def parse(text: str):
        return cast(text)

    parse.__name__ = "path"
    parse.output_kind = kind
    return parse


def protected(path: str | Path, run_folder_ok: bool = False) -> str | None:
    """Why `path` is never an output, whatever the flags: it lies in a checkpoint's step folder, is a
    run's metrics file, lies in a run's wandb/ folder, holds checkpoints, or (unless `run_folder_ok`, for
    the stages) is a training run's folder. None when it is none of these."""
    here = Path(os.path.realpath(path))  # links resolved, in the part that exists too
    for q in [here, *here.parents]:
        if _STEP_DIR.match(q.name) and (q / "meta.json").is_file():
            return f"lies in the checkpoint {q}"
        if q.name == "wandb" and q.is_dir() and _looks_like_run(q.parent):
            return f"lies in the W&B record of the run {q.parent}"
    if (here.name in RUN_FILES or ASIDE.match(here.name)) and _looks_like_run(here.parent):
        return f"is the metrics record of the run {here.parent}"
    if here.is_dir() and any(_STEP_DIR.match(c.name) and (c / "meta.json").is_file() for c in here.iterdir()):
        return "holds checkpoints"
    if not run_folder_ok and here.is_dir() and (here / "checkpoints").is_dir():
        return "is a training run's folder (it holds checkpoints/)"
    return None


def _looks_like_run(folder: Path) -> bool:
    return (folder / "checkpoints").is_dir() or (folder / "wandb").is_dir() or (folder / "metrics.jsonl").is_file()


def foreign_files(directory: str | Path, owner: str) -> list[Path]:
    """Files under `directory` that its ledger does not record as written by `owner` and unchanged."""
    directory = Path(directory)
    ledger = _ledger(directory).get("files", {})
    out = []
    for f in _files_under(directory):
        entry = ledger.get(f.relative_to(directory).as_posix())
        if f.is_symlink() or not (isinstance(entry, dict) and entry.get("by") == owner
                                  and entry.get("fp") == _fingerprint(f)):
            out.append(f)
    return out


def _names(paths: list[Path], base: Path) -> str:
    shown = ", ".join(p.relative_to(base).as_posix() if base in p.parents else str(p) for p in paths[:3])
    return shown + (f" and {len(paths) - 3} more" if len(paths) > 3 else "")


def claim_output(path: str | Path, flag: str, *, owner: str, kind: str, inputs=(),
                 overwrite: bool | None = False) -> Path:
    """The one check every output flag goes through, before any work (module docstring): RunDirError
    naming the flag and the path, or the path. `overwrite=None`: the command has no --overwrite."""
    if path is None:
        raise RunDirError(f"{flag}: no path given")
    p = Path(path)
    check_output(p, inputs, flag)
    why = protected(p)
    if why:
        raise RunDirError(f"{flag} {path} {why}; no command writes there. Choose another path")
    check_can_create(p, flag, folder=kind == "dir")
    if overwrite:
        return p
    hint = "pass --overwrite to replace it, or choose another path" if overwrite is not None else \
        "move it away or choose another path"
    if kind == "file" and p.exists() and not written_by(p, owner):
        raise RunDirError(f"{flag} {path} exists and was not written by {owner} (or was changed since); {hint}")
    if kind == "dir" and p.is_dir():
        bad = foreign_files(p, owner)
        if bad:
            raise RunDirError(f"{flag} {path} holds files {owner} did not write ({_names(bad, p)}); "
                              + hint.replace("replace it", "write there anyway").replace("another path",
                                                                                        "a new or empty folder"))
    return p


# ----------------------------------------------------------------------------------------------
# one writer per run folder


def _alive(pid: int) -> bool:
    if pid <= 0:  # an unreadable lock (kill(-1, 0) would ask about every process)
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """`.aquainterp-lock` in a run folder: pid, host, start time and command of the one process writing it.

    Taken with O_EXCL before anything else is written there. Held by a live process (or one on another
    host, which cannot be checked): RunDirError naming it. Held by a dead process on this host: taken over
    with a one-line notice on stderr. Taken again by the process holding it: counted, released when the
    count is back to zero (the demo runs stages in one process). Released at exit at the latest."""

    _held: dict[tuple, list] = {}  # (pid, lock path) -> [count, lock]; the pid keeps forked children out

    def __init__(self, directory: str | Path, command: str):
        self.directory = Path(directory)
        self.command = command
        self.path = self.directory / LOCK
        self.created_dir = False

    def acquire(self) -> RunLock:
        key = (os.getpid(), self.path.absolute())
        if key in RunLock._held:
            RunLock._held[key][0] += 1
            return self
        if not self.directory.exists():
            self.directory.mkdir(parents=True)
            self.created_dir = True
        record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
                  "command": self.command}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                other = self._holder()
                if other is None:
                    continue  # released (or half written) between our tries: try again
                if other.get("host") != record["host"] or _alive(int(other.get("pid", -1))):
                    self._undo_dir()
                    raise RunDirError(f"{self.directory} is being written by {self._describe(other)}; "
                                      f"one writer per run folder: wait for it or stop it (lock file {self.path})") from None
                print(f"note: taking over the stale lock of {self._describe(other)} on {self.directory}: "
                      "that process is gone", file=sys.stderr)
                try:
                    os.unlink(self.path)
                except FileNotFoundError:
                    pass
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(record, f)
            RunLock._held[key] = [1, self]
            atexit.register(self._release_now)
            return self
        raise RunDirError(f"{self.directory}: could not take the lock {self.path}; another process keeps "
                          "taking it")

    def _holder(self) -> dict | None:
        try:
            other = json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            if time.time() - self.path.stat().st_mtime < 5:  # being written right now
                time.sleep(0.2)
                return None
            return {"pid": -1, "host": socket.gethostname(), "command": "unreadable lock"}
        return other if isinstance(other, dict) else {"pid": -1, "host": socket.gethostname()}

    @staticmethod
    def _describe(other: dict) -> str:
        started = other.get("started")
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if isinstance(started, int | float) \
            else "an unknown time"
        return f"pid {other.get('pid')} on {other.get('host')} ({other.get('command', '?')}, started {when})"

    def _undo_dir(self) -> None:
        if self.created_dir:
            try:
                self.directory.rmdir()
            except OSError:
                pass

    def release(self) -> None:
        key = (os.getpid(), self.path.absolute())
        held = RunLock._held.get(key)
        if held is None:
            return
        held[0] -= 1
        if held[0] <= 0:
            self._release_now()

    def _release_now(self) -> None:
        key = (os.getpid(), self.path.absolute())
        if RunLock._held.pop(key, None) is None:
            return
        try:
            if json.loads(self.path.read_text()).get("pid") == os.getpid():
                self.path.unlink()
        except (OSError, ValueError):
            pass
        self._undo_dir()  # a folder made only for the lock (the run failed before writing) goes too

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
