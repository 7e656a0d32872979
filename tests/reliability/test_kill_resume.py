"""SIGKILL at random points of base, SFT and RL runs, several seeds each: every checkpoint left on disk
loads (size + sha256 checked) and equals the uninterrupted run's checkpoint of that step, a write cut
half-way never counts as a checkpoint, and resuming gives bit-identical final weights and optimizer
state (torch.equal on every tensor)."""

import random
import time
from pathlib import Path

import pytest

from aquainterp.checkpoints.native import available_steps, latest_step, load_checkpoint
from aquainterp.logger import read_metrics
from reliability.conftest import (
    assert_bit_identical,
    base_config,
    finish_child,
    kill_when,
    record,
    rl_config,
    run_stage,
    sft_config,
    start_child,
    weights,
)

SEEDS = [0, 1, 2]


def stage_config(stage: str, run_dir: Path, tokenizer_dir: Path, base_ckpt: Path):
    if stage == "base":
        return base_config(run_dir, tokenizer_dir, max_steps=6)
    if stage == "sft":
        return sft_config(run_dir, base_ckpt, max_steps=6)
    return rl_config(run_dir, base_ckpt, max_steps=6)


@pytest.fixture(scope="module")
def references(tmp_path_factory, tokenizer_dir, base_ckpt):
    """Uninterrupted runs of each stage, a checkpoint at every step; built on first use."""
    cache = {}

    def get(stage: str) -> Path:
        if stage not in cache:
            run_dir = tmp_path_factory.mktemp(f"ref_{stage}")
            run_stage(stage_config(stage, run_dir, tokenizer_dir, base_ckpt))
            cache[stage] = run_dir / "checkpoints"
        return cache[stage]

    return get


def check_survivors(ckpt_dir: Path, ref_dir: Path) -> list[int]:
    """Every complete checkpoint loads and equals the reference at its step; returns the steps."""
    steps = available_steps(ckpt_dir)
    for s in steps:
        assert load_checkpoint(ckpt_dir, s).meta["step"] == s
        assert_bit_identical(weights(ref_dir, s), weights(ckpt_dir, s))
    return steps


@pytest.mark.slow
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("stage", ["base", "sft", "rl"])
def test_sigkill_anywhere_then_resume_is_bit_identical(stage, seed, tmp_path, tokenizer_dir, base_ckpt, references):
    ref = references(stage)
    rng = random.Random(f"{stage}/{seed}")
    cfg = stage_config(stage, tmp_path / "victim", tokenizer_dir, base_ckpt)
    ckpt = tmp_path / "victim" / "checkpoints"
    n = 6

    # 1. a kill at a random moment: some time after checkpoint k exists, inside a step or a write
    k, delay = rng.randint(1, n - 3), rng.uniform(0.0, 0.05)  # steps take ~0.05-0.3 s here: inside step k+1
    proc, _, err = start_child(cfg, tmp_path)
    seen = []

    def past_k() -> bool:
        if not seen and (latest_step(ckpt) or 0) >= k:
            seen.append(time.monotonic())
        return bool(seen) and time.monotonic() - seen[0] >= delay

    kill_when(proc, err, past_k)
    first = check_survivors(ckpt, ref)
    assert first and first[-1] >= k and first[-1] < n, first

    # 2. resume, and kill it half-way through writing a later step's checkpoint (the final one included)
    cfg.resume = True
    j = rng.randint(first[-1] + 1, n)
    proc, marker, err = start_child(cfg, tmp_path, pause_step=j)
    kill_when(proc, err, marker.exists)
    half = [p for p in ckpt.iterdir() if p.name.startswith(f".tmp_step_{j:06d}_")]
    assert half and (half[0] / "model.safetensors").is_file() and not (half[0] / "meta.json").exists()
    second = check_survivors(ckpt, ref)
    assert second[-1] == j - 1 and j not in second  # the cut write is not a checkpoint; everything before is
    assert load_checkpoint(ckpt).meta["step"] == j - 1

    # 3. resume to the end: bit-identical to the run that was never interrupted
    proc, _, err = start_child(cfg, tmp_path)
    finish_child(proc, err)
    assert not [p for p in ckpt.iterdir() if p.name.startswith(".")]  # the cut write was cleaned up
    final = check_survivors(ckpt, ref)
    assert final == list(range(1, n + 1))
    assert_bit_identical(weights(ref, n), weights(ckpt, n))
    logged = {r["step"] for r in read_metrics(tmp_path / "victim") if any(key.startswith(("train/", "rl/loss"))
                                                                          for key in r)}
    missing = set(range(1 if stage != "rl" else 0, n if stage == "rl" else n + 1)) - logged
    assert not missing, f"steps missing from metrics.jsonl: {sorted(missing)}"
    record(f"SIGKILL mid-run + mid-write, resume ({stage})", True, len(missing))
