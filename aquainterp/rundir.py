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

All refusals raise RunDirError, a UsageError: the command line boundary prints one line and exits 2.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

MARKER = ".aquainterp-owner"
_STEP_DIR = re.compile(r"^step_\d{6,}$")
_TEMP_DIR = re.compile(r"^\.(tmp|old)_step_\d{6,}_\d+$")
RUN_FILES = ("metrics.jsonl",)  # what a stage appends to: removed with the checkpoints by --overwrite


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
    directory = Path(directory)
    tmp = directory / f"{MARKER}.tmp"
    tmp.write_text(json.dumps({"owner": owner, "what": what, "created": time.time()}))
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


def claim_run_dir(run_dir: str | Path, *, resume: bool, overwrite: bool, flag: str = "--run-dir",
                  is_main: bool = True) -> None:
    """Call before a stage touches anything. A fresh or empty run dir passes; with --resume anything
    passes (the stage continues from the latest checkpoint); with --overwrite the old run's checkpoints
    and metrics are deleted (rank 0 only; other files stay); otherwise RunDirError naming what is there."""
    if resume and overwrite:
        raise RunDirError("--resume and --overwrite contradict each other: give one")
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
