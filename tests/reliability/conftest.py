"""Shared pieces of the fault-injection suite: one tiny tokenizer and one tiny base model per session,
the stage command lines, and helpers to kill a real training process and compare final weights.

Every fault here is real where the machine allows it: processes die by SIGKILL, the disk fills up in a
size-limited tmpfs, W&B's service process is killed. Runs are tiny (depth 1, 512-token vocabulary, a
handful of steps) and single-threaded, so CPU results are bit-exact and comparable with torch.equal.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time
from pathlib import Path

import pytest
import torch

from aquainterp.checkpoints.native import available_steps, load_checkpoint

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ["TQDM_DISABLE"] = "1"  # forked children inherit it; their bars would only clutter the log



@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """A 512-token BPE trained once per session on the synthetic task's text."""
    from training.tok_train import TokTrainConfig
    from training.tok_train import run as run_tok

    out = tmp_path_factory.mktemp("rel_tok")
    run_tok(TokTrainConfig(data="synthetic", out_dir=str(out), vocab_size=512, max_chars=200_000, eval_docs=20))
    return out


def base_config(run_dir: Path, tokenizer_dir: Path, **kw):
    """A tiny base run: depth 1, 128-token rows, 2 rows a step, a checkpoint every step."""
    from training.base import BaseConfig

    cfg = dict(run_dir=str(run_dir), tokenizer_dir=str(tokenizer_dir), depth=1, aspect_ratio=64, head_dim=32,
               seq_len=128, device_batch_size=2, total_batch_tokens=256, max_steps=8, eval_every=0, save_every=1,
               val_docs=4, device="cpu", compile="off", bf16="off")
    cfg.update(kw)
    return BaseConfig(**cfg)


def sft_config(run_dir: Path, init_from: Path, **kw):
    from training.sft import SFTConfig

    cfg = dict(init_from=str(init_from), run_dir=str(run_dir), synthetic=64, device_batch_size=4,
               examples_per_step=4, max_steps=6, eval_every=0, eval_synthetic=4, save_every=1, device="cpu",
               compile="off", bf16="off")
    cfg.update(kw)
    return SFTConfig(**cfg)


def rl_config(out: Path, checkpoint: Path, **kw):
    from training.rl import RLConfig

    cfg = dict(checkpoint=str(checkpoint), out=str(out), task="synthetic", max_steps=5, examples_per_step=2,
               num_samples=2, max_new_tokens=8, eval_examples=2, eval_every=0, table_every=0, device_batch_size=4,
               save_every=1, device="cpu", bf16="off", progress=False)
    cfg.update(kw)
    return RLConfig(**cfg)


def run_stage(config):
    """Run a stage in this process, by its config type (the same `run(config)` the CLIs call)."""
    from training.base import BaseConfig
    from training.base import run as run_base
    from training.rl import RLConfig
    from training.rl import run as run_rl
    from training.sft import SFTConfig
    from training.sft import run as run_sft

    runner = {BaseConfig: run_base, SFTConfig: run_sft, RLConfig: run_rl}[type(config)]
    return runner(config)


@pytest.fixture(scope="session")
def base_ckpt(tmp_path_factory, tokenizer_dir) -> Path:
    """A tiny trained base model's checkpoint folder: the starting point of SFT and RL runs."""
    run_dir = tmp_path_factory.mktemp("rel_base")
    torch.set_num_threads(1)
    run_stage(base_config(run_dir, tokenizer_dir, max_steps=4, save_every=4))
    return run_dir / "checkpoints"


# ------------------------------------------------------------------------------------------------
# Real processes: a child process runs the stage and the test SIGKILLs it. Children come from a
# multiprocessing fork server that imported torch and the stages once (a fresh interpreter needs ~20 s
# of imports on a busy machine). Not plain fork: this process has run the Rust tokenizer's thread pool,
# and a forked copy of it deadlocks on its first parallel call.

_FORK = mp.get_context("forkserver")
_FORK.set_forkserver_preload(["torch", "training.base", "training.sft", "training.rl", "reliability.conftest"])


def _child(config, pause_step: int | None, marker: str | None, error_file: str) -> None:
    torch.set_num_threads(1)
    if pause_step is not None:
        pause_checkpoint_write(pause_step, Path(marker))
    try:
        run_stage(config)
    except BaseException as e:  # the parent reads it; the child must not run pytest's teardown
        Path(error_file).write_text(f"{type(e).__name__}: {e}")
        os._exit(1)
    os._exit(0)


def start_child(config, tmp: Path, pause_step: int | None = None) -> tuple:
    """Fork a process running the stage; with pause_step, its writer stops half-way through that step."""
    marker, error_file = tmp / f"paused_{time.monotonic_ns()}", tmp / f"error_{time.monotonic_ns()}"
    proc = _FORK.Process(target=_child, args=(config, pause_step, str(marker), str(error_file)))
    proc.start()
    return proc, marker, error_file


def pause_checkpoint_write(step: int, marker: Path) -> None:
    """In this process only: checkpoint writes of `step` stop after model.safetensors is in the temp
    folder (before the optimizer file, meta.json and the rename), write `marker` and sleep."""
    import aquainterp.checkpoints.native as checkpoint

    real_save_file = checkpoint.save_file

    def save_then_pause(tensors, filename, *args, **kwargs):
        real_save_file(tensors, filename, *args, **kwargs)
        if Path(filename).parent.name.startswith(f".tmp_step_{step:06d}_"):
            marker.write_text(str(filename))
            while True:
                time.sleep(1)

    checkpoint.save_file = save_then_pause


def kill_when(proc, error_file: Path, ready, timeout: float = 90) -> None:
    """SIGKILL `proc` as soon as ready() is true; fail if it ended first or never got there."""
    deadline = time.time() + timeout
    while not ready():
        if not proc.is_alive():
            err = error_file.read_text() if error_file.exists() else ""
            raise AssertionError(f"process ended ({proc.exitcode}) before the kill point: {err}")
        if time.time() > deadline:
            proc.kill()
            raise AssertionError("kill point not reached in time")
        time.sleep(0.002)
    proc.kill()  # SIGKILL
    proc.join(30)
    assert proc.exitcode == -signal.SIGKILL, proc.exitcode


def finish_child(proc, error_file: Path, timeout: float = 120) -> None:
    proc.join(timeout)
    if proc.is_alive():
        proc.kill()
        raise AssertionError("child run did not finish in time")
    err = error_file.read_text() if error_file.exists() else ""
    assert proc.exitcode == 0, f"child run failed ({proc.exitcode}): {err}"


def every_checkpoint_loads(ckpt_dir: Path) -> list[int]:
    """Load each complete checkpoint with size + sha256 checks; return their steps."""
    steps = available_steps(ckpt_dir)
    for s in steps:
        ckpt = load_checkpoint(ckpt_dir, s)
        assert ckpt.meta["step"] == s
    return steps


def weights(ckpt_dir: Path, step: int | None = None) -> dict[str, torch.Tensor]:
    ckpt = load_checkpoint(ckpt_dir, step)
    return {**ckpt.model_state, **{f"optim/{k}": v for k, v in _optim_tensors(ckpt).items()}}


def _optim_tensors(ckpt) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(ckpt.path / "optim.safetensors"))


def assert_bit_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        # exact on any CPU: resumed and straight runs do the same ops on the same shapes in the same order
        assert torch.equal(a[k], b[k]), f"{k}: max diff {(a[k].double() - b[k].double()).abs().max().item()}"


# ------------------------------------------------------------------------------------------------
# The fault table: each test records (fault, survived, data lost) and the session prints the tally.

_TALLY: dict[str, list[int]] = {}


def record(fault: str, survived: bool, data_lost: int = 0) -> None:
    row = _TALLY.setdefault(fault, [0, 0, 0])
    row[0] += 1
    row[1] += int(survived)
    row[2] += data_lost


def pytest_terminal_summary(terminalreporter):
    _print_case_table(terminalreporter)
    if not _TALLY:
        return
    tr = terminalreporter
    tr.section("reliability: fault table")
    tr.write_line(f"{'fault':58s} {'tried':>5s} {'survived':>8s} {'data lost':>9s}")
    for fault, (tried, survived, lost) in _TALLY.items():
        tr.write_line(f"{fault:58s} {tried:5d} {survived:8d} {lost:9d}")


# ------------------------------------------------------------------------------------------------
# The user-error table (issue 19): each case a hostile or careless user tries, the command, what must
# happen and what did. Tests record a row and assert it; the session prints every row.

_CASES: list[tuple[str, str, str, str, bool]] = []


def record_case(case: str, command: str, expected: str, outcome: str, holds: bool) -> None:
    _CASES.append((case, command, expected, outcome, bool(holds)))
    assert holds, f"{case}: {command}: expected {expected}, got {outcome}"


def call_cli(main, argv: list[str], capsys) -> tuple[int, str, str]:
    """Run a command's main(argv) in this process: (exit status, stdout, stderr)."""
    capsys.readouterr()
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    out, err = capsys.readouterr()
    return int(code or 0), out, err


def one_line_error(code: int, err: str, want_code: int) -> tuple[bool, str]:
    """(holds, outcome text) for 'exit want_code with exactly one stderr line and no traceback'."""
    lines = [ln for ln in err.splitlines() if ln.strip()]
    holds = code == want_code and len(lines) == 1 and "Traceback" not in err
    shown = lines[0] if lines else "(no message)"
    return holds, f"exit {code}, {len(lines)} line(s): {shown[:110]}"


def snapshot(root: Path) -> dict[str, str]:
    """Every file under root with its size and sha256 prefix (for 'nothing was touched')."""
    import hashlib

    out = {}
    for p in sorted(Path(root).rglob("*")):
        if p.is_file() and not p.is_symlink():
            out[str(p.relative_to(root))] = f"{p.stat().st_size}:{hashlib.sha256(p.read_bytes()).hexdigest()[:16]}"
        elif p.is_dir():
            out[str(p.relative_to(root)) + "/"] = "dir"
    return out


def _print_case_table(tr) -> None:
    if not _CASES:
        return
    tr.section("reliability: user errors and data safety (issue 19)")
    tr.write_line(f"{'case':44s} {'command':48s} {'expected':28s} {'holds':5s} outcome")
    for case, command, expected, outcome, holds in _CASES:
        tr.write_line(f"{case[:44]:44s} {command[:48]:48s} {expected[:28]:28s} {'yes' if holds else 'NO':5s} "
                      f"{outcome[:120]}")
    tr.write_line(f"{sum(c[4] for c in _CASES)}/{len(_CASES)} cases hold")
