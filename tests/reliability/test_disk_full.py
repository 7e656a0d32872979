"""Disk full while writing a checkpoint: the run stops with one CheckpointError that says the disk is
full and names the checkpoint, the checkpoints written before stay valid, and nothing half-written is
taken for a checkpoint.

The disk is a real, size-limited tmpfs mounted over the run folder inside a private mount namespace
of the child process (nobody else sees it). Where the machine does not allow mounting (no
CAP_SYS_ADMIN), the safetensors writer of the third checkpoint is wrapped to write half its file and
then raise OSError(ENOSPC), as the kernel would.
"""

import ctypes
import errno
import os
import shutil
from pathlib import Path

import pytest

from aquainterp.checkpoints.native import CheckpointError, available_steps, load_checkpoint
from aquainterp.logger import read_metrics
from reliability.conftest import _FORK, base_config, record, run_stage

CLONE_NEWNS, MS_REC, MS_PRIVATE = 0x00020000, 16384, 1 << 18


def mount_tmpfs(target: Path, size_bytes: int) -> bool:
    """A private tmpfs of size_bytes over target, visible to this process only; False if not allowed."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNS) != 0:
        return False
    if libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None) != 0:
        return False
    return libc.mount(b"tmpfs", str(target).encode(), b"tmpfs", 0, f"size={size_bytes}".encode()) == 0


def fill_disk_at(step: int, monkeypatch=None) -> None:
    """From now on the safetensors writer of `step` writes half its file, then fails with ENOSPC."""
    import aquainterp.checkpoints.native as checkpoint

    real_save_file = checkpoint.save_file

    def save_file(tensors, filename, *args, **kwargs):
        if not Path(filename).parent.name.startswith(f".tmp_step_{step:06d}_"):
            return real_save_file(tensors, filename, *args, **kwargs)
        real_save_file(tensors, filename, *args, **kwargs)
        with open(filename, "r+b") as f:
            f.truncate(os.path.getsize(filename) // 2)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)

    if monkeypatch is None:
        checkpoint.save_file = save_file
    else:
        monkeypatch.setattr(checkpoint, "save_file", save_file)


def child(config, size_bytes: int, copy_to: str, report: str) -> None:
    """Runs in its own process: mount the small disk, train until it is full, copy what is left out."""
    run_dir = Path(config.run_dir)
    run_dir.mkdir(parents=True)
    mode = "tmpfs" if mount_tmpfs(run_dir, size_bytes) else "injected ENOSPC"
    if mode != "tmpfs":
        fill_disk_at(3)
    try:
        run_stage(config)
        outcome = "finished"
    except BaseException as e:
        outcome = f"{type(e).__qualname__}\n{e}"
    shutil.copytree(run_dir, copy_to, symlinks=True)  # the state the full disk was left in, byte for byte
    Path(report).write_text(f"{mode}\n{outcome}")
    os._exit(0)


@pytest.mark.slow
def test_disk_full_stops_cleanly_and_keeps_earlier_checkpoints(tmp_path, tokenizer_dir, base_ckpt):
    one_checkpoint = sum(f.stat().st_size for f in (base_ckpt / "step_000004").rglob("*") if f.is_file())
    config = base_config(tmp_path / "run", tokenizer_dir, max_steps=6, save_every=1)
    after, report = tmp_path / "after", tmp_path / "report"
    proc = _FORK.Process(target=child, args=(config, int(2.6 * one_checkpoint), str(after), str(report)))
    proc.start()
    proc.join(120)
    assert proc.exitcode == 0 and report.exists(), f"child died ({proc.exitcode})"
    mode, kind, message = report.read_text().split("\n", 2)

    assert kind == CheckpointError.__qualname__, f"{kind}: {message}"
    assert "disk full" in message and "no space left on device" in message.lower(), message
    assert str(config.run_dir) in message and "step_000003" in message, message
    steps = available_steps(after / "checkpoints")
    assert steps == [1, 2], steps  # nothing after the failed write; the failed one is not a checkpoint
    for s in steps:
        assert load_checkpoint(after / "checkpoints", s).meta["step"] == s
    assert not [p.name for p in (after / "checkpoints").iterdir() if p.name.startswith(".")]  # space given back
    assert [r["step"] for r in read_metrics(after)] == [1, 2, 3]  # it stopped at the step that could not be saved
    record(f"disk full during checkpoint write ({mode})", True, 0)


def test_enospc_gives_one_clear_error_and_no_temp_folder(tmp_path, monkeypatch):
    """The fallback fault of the test above, on the writer alone (runs everywhere, in a second)."""
    import torch

    import aquainterp.checkpoints.native as checkpoint

    fill_disk_at(7, monkeypatch)
    with pytest.raises(CheckpointError, match=r"step_000007.*disk full \(no space left on device\)") as info:
        checkpoint.save_checkpoint(tmp_path, 7, torch.nn.Linear(3, 3), None, {})
    assert isinstance(info.value.__cause__, OSError) and info.value.__cause__.errno == errno.ENOSPC
    assert available_steps(tmp_path) == [] and not list(tmp_path.iterdir())  # the temp folder is gone
