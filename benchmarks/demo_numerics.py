"""Where two CPUs' demo runs part, and which kernel makes them (issue 32).

    # the demo's base stage here (the real `aquainterp demo`, its pinned numerics, stopped once the base
    # stage has finished) against another machine's base metrics.jsonl, step by step
    .venv/bin/python benchmarks/demo_numerics.py base \
        --against ../shared/fixtures/demo-numerics/amd-epyc-avx2/base-metrics.jsonl
    # the same with an extra variable in the demo's environment
    .venv/bin/python benchmarks/demo_numerics.py base --against ... --env ONEDNN_MAX_CPU_ISA=AVX2

    # op level: one bf16 matmul, torch.optim.Muon's bf16 Newton-Schulz (the demo's optimizer up to 26b0321,
    # its only bf16 math) and the fp32 orthogonalisation that replaced it (training/orthogonalize.py), under
    # the demo's pinned numerics, with and without each --env, in fresh processes: which oneDNN kernel ran,
    # the bf16 matmul's speed, and a hash of each result's bits
    .venv/bin/python benchmarks/demo_numerics.py ops --env ONEDNN_MAX_CPU_ISA=AVX2

`base` reuses the demo end to end (no copy of its settings): it starts `aquainterp demo --fresh` in a
folder of its own, waits for `base/stage.json`, stops the demo there and reads `base/metrics.jsonl`.
`--checkout DIR` runs another checkout's demo, e.g. the commit the other machine's metrics came from.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from training.demo import NUMERICS_ENV  # noqa: E402


def parse_env(pairs: list[str]) -> list[tuple[str, str]]:
    env = []
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise SystemExit(f"--env takes NAME=VALUE, got {pair!r}")
        env.append((name, value))
    return env


def losses(path: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {int(r["step"]): r["train/loss"] for r in rows if "train/loss" in r}


def run_base(out: Path, extra_env: dict, seed: int, threads: int, checkout: Path = REPO) -> Path:
    """The demo's base stage of `checkout` in `out` (tokenizer + base, fresh), under the demo's own pinned
    numerics plus `extra_env`; returns base/metrics.jsonl."""
    env = {**os.environ, **NUMERICS_ENV, **extra_env, "PYTHONUNBUFFERED": "1"}
    marker = out / "base" / "stage.json"
    cmd = [sys.executable, "-c", "import sys; from aquainterp.cli.main import main; sys.exit(main())", "demo", "--out", str(out), "--fresh",
           "--seed", str(seed), "--threads", str(threads)]
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=checkout, env=env)  # its own code first on sys.path
    try:
        while not marker.exists():
            if proc.poll() is not None:
                raise SystemExit(f"the demo exited ({proc.returncode}) before its base stage finished")
            time.sleep(1)
    finally:
        if proc.poll() is None:
            proc.terminate()  # the base stage is done (or we are leaving): stop the demo before SFT
            proc.wait(timeout=60)
    print(f"base stage finished in {time.time() - t0:.0f} s (tokenizer included)", flush=True)
    return out / "base" / "metrics.jsonl"


def compare(ours: dict[int, float], theirs: dict[int, float], label: str) -> int | None:
    """Print where the two loss curves part; returns the first differing step (None: all equal)."""
    steps = sorted(set(ours) & set(theirs))
    first = next((s for s in steps if ours[s] != theirs[s]), None)
    equal = sum(ours[s] == theirs[s] for s in steps)
    print(f"{label}: {equal} of {len(steps)} steps' losses bit-equal to the other machine's")
    if first is None:
        print(f"  no step differs; final loss {ours[steps[-1]]!r}")
        return None
    shown = [s for s in steps if first - 1 <= s <= first + 2] + [steps[-1]]
    for s in dict.fromkeys(shown):
        print(f"  step {s:>4}: here {ours[s]!r:<22} other {theirs[s]!r:<22} diff {ours[s] - theirs[s]:+.3e}")
    print(f"  first differing step: {first}")
    return first


OPS = r"""
import hashlib, json, os, sys, time
import torch
from torch.optim._muon import _zeropower_via_newtonschulz
torch.set_num_threads(1)
def bits(t):
    return hashlib.sha256(t.float().numpy().tobytes()).hexdigest()[:16]
g = torch.Generator().manual_seed(0)
a = torch.randn(128, 512, generator=g).bfloat16()
b = torch.randn(512, 128, generator=g).bfloat16()
grad = torch.randn(128, 512, generator=g)  # the shape of the demo's c_fc weight (d 128, MLP 512), fp32
c = a @ b
t0 = time.perf_counter()
for _ in range(3):
    a @ b
gflops = 3 * 2 * 128 * 512 * 128 / (time.perf_counter() - t0) / 1e9
ns = _zeropower_via_newtonschulz(grad, (3.4445, -4.7750, 2.0315), 5, 1e-7)
from training.orthogonalize import orthogonalize
print(json.dumps({"onednn_bf16": torch.ops.mkldnn._is_mkldnn_bf16_supported(),
                  "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                  "bf16_matmul": bits(c), "bf16_gflops": round(gflops, 2), "fp32_matmul": bits(a.float() @ b.float()),
                  "torch_muon_bf16_ns": bits(ns), "fp32_orthogonalize": bits(orthogonalize(grad[None]))}))
"""


def run_ops(extra_env: list[tuple[str, str]]) -> None:
    """One fresh process for the pinned numerics alone, then one per --env (each on its own)."""
    settings = [("demo's pinned numerics", {})]
    settings += [(f"+ {k}={v}", {k: v}) for k, v in extra_env]
    for label, extra in settings:
        env = {**os.environ, **NUMERICS_ENV, **extra, "ONEDNN_VERBOSE": "1"}
        done = subprocess.run([sys.executable, "-c", OPS], capture_output=True, text=True, env=env, check=True,
                              cwd=REPO)
        lines = done.stdout.splitlines()
        kernels = sorted({line.split(",")[6] for line in lines if ",primitive,exec,cpu,matmul," in line})
        print(f"{label}: oneDNN matmul kernels {kernels or 'none (ATen fallback)'}\n  {lines[-1]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("base", "ops"))
    parser.add_argument("--against", type=Path, help="the other machine's base metrics.jsonl (base)")
    parser.add_argument("--env", action="append", default=[], help="NAME=VALUE added to the demo's environment")
    parser.add_argument("--out", type=Path, help="demo folder (default runs/demo-numerics-<env>)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--checkout", type=Path, default=REPO,
                        help="run this checkout's demo (e.g. `git archive 26b0321 | tar -x -C DIR`, the commit the "
                             "other machine ran; copy aquainterp/_rustbpe*.so into it); default this one")
    args = parser.parse_args()
    if args.what == "ops":
        run_ops(parse_env(args.env))
        return
    extra = dict(parse_env(args.env))  # base: all of them together
    if args.against is None:
        parser.error("base needs --against")
    tag = "-".join(f"{k}={v}" for k, v in extra.items()).replace(",", "_") or "pinned"
    out = args.out or REPO / "runs" / f"demo-numerics-{tag}"
    ours = losses(run_base(out.resolve(), extra, args.seed, args.threads, args.checkout.resolve()))
    label = f"base stage here ({', '.join(f'{k}={v}' for k, v in {**NUMERICS_ENV, **extra}.items())})"
    compare(ours, losses(args.against), label)


if __name__ == "__main__":
    main()
