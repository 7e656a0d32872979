"""Cost of logging: 20 scalars per step for 1,000 steps, through our Logger and through raw wandb.log.

    .venv/bin/python benchmarks/logger.py [--steps 1000] [--scalars 20]

Side by side in one process: Logger(mode="disabled") (metrics.jsonl only), Logger(mode="offline")
(metrics.jsonl + offline W&B run) and plain `wandb.init(mode="offline")` + `wandb.log` as the peer.
The loop time is what a training run pays per step; start and finish (wandb's core process) are
printed apart because they are paid once. Target: the disabled loop under 1 s.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aquainterp.cli.main import normalize_flag_spelling  # noqa: E402
from aquainterp.logger import Logger  # noqa: E402


def rows(steps: int, scalars: int):
    names = [f"train/metric_{i:02d}" for i in range(scalars)]
    for step in range(steps):
        yield step, {name: step * 0.001 + i for i, name in enumerate(names)}


def bench_logger(mode: str, run_dir: Path, steps: int, scalars: int) -> tuple[float, float, float]:
    t0 = time.perf_counter()
    log = Logger(run_dir, mode=mode, run_name=f"bench-{mode}")
    t1 = time.perf_counter()
    for step, metrics in rows(steps, scalars):
        log.log(metrics, step=step)
    t2 = time.perf_counter()
    log.finish()
    t3 = time.perf_counter()
    lines = sum(1 for _ in open(run_dir / "metrics.jsonl"))
    assert lines == steps, f"expected {steps} rows in metrics.jsonl, found {lines}"
    return t1 - t0, t2 - t1, t3 - t2


def bench_raw_wandb(run_dir: Path, steps: int, scalars: int) -> tuple[float, float, float]:
    import wandb

    t0 = time.perf_counter()
    run = wandb.init(project="aquainterp", name="bench-raw", dir=str(run_dir), mode="offline",
                     settings=wandb.Settings(console="off", x_disable_stats=True, silent=True),
                     reinit="create_new")
    t1 = time.perf_counter()
    for step, metrics in rows(steps, scalars):
        run.log(metrics, step=step)
    t2 = time.perf_counter()
    run.finish()
    t3 = time.perf_counter()
    return t1 - t0, t2 - t1, t3 - t2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--scalars", type=int, default=20)
    args = parser.parse_args(normalize_flag_spelling(sys.argv[1:]))
    os.environ.setdefault("WANDB_SILENT", "true")
    with tempfile.TemporaryDirectory(prefix="aq-bench-logger-") as tmp:
        tmp = Path(tmp)
        results = {
            "Logger disabled (jsonl only)": bench_logger("disabled", tmp / "disabled", args.steps, args.scalars),
            "Logger offline (jsonl + W&B)": bench_logger("offline", tmp / "offline", args.steps, args.scalars),
            "raw wandb.log offline (peer)": bench_raw_wandb(tmp / "raw", args.steps, args.scalars),
        }
    print(f"{args.scalars} scalars x {args.steps} steps, cpu count {os.cpu_count()}, "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"{'':32s} {'start s':>8s} {'loop s':>8s} {'finish s':>9s} {'us/step':>8s}")
    for name, (start, loop, finish) in results.items():
        print(f"{name:32s} {start:8.3f} {loop:8.3f} {finish:9.3f} {loop / args.steps * 1e6:8.1f}")
    raw_loop = results["raw wandb.log offline (peer)"][1]
    for name in ("Logger disabled (jsonl only)", "Logger offline (jsonl + W&B)"):
        print(f"{name} loop / raw wandb.log loop = {results[name][1] / raw_loop:.2f}")
    disabled_loop = results["Logger disabled (jsonl only)"][1]
    print(f"target: disabled loop < 1 s -> {'met' if disabled_loop < 1 else 'MISSED'} ({disabled_loop:.3f} s)")


if __name__ == "__main__":
    main()
