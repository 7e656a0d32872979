"""What the faith probes cost: an RL step with every probe on, with and without the faith family, side by side.

    .venv/bin/python benchmarks/faith.py --checkpoint runs/demo/sft/checkpoints      # after scripts/demo
    .venv/bin/python benchmarks/faith.py --checkpoint runs/demo/sft/checkpoints --steps 20

Three arms replay the same RL steps (training/rl.py's rollouts, run_probes on its default cadence,
train_on_rollouts at learning rate 0, so every arm samples and trains on identical tokens):

    no faith       --probes without 'faith' (what a run paid before the family existed)
    faith-every 0  every probe, --faith-every 0 (the family selected but switched off)
    faith          every probe, the default --faith-every 1 (the family on every probe step)

The arms run each step back to back, in a rotating order, so a neighbour's load burst hits all alike.
Ratios are of CPU time per step (this process, all threads), with the standard error of the mean per-step
difference. Rollout consistency (text only, every step) is in the faith arm's steps too. A trained
checkpoint matters: a fresh model never writes "Answer:", so most of the family has nothing to read.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

# Run as a script, this file's folder comes first on sys.path, and its benchmarks/probes.py would shadow the
# `probes` package: drop that entry.
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402

from aquainterp.cli.main import normalize_flag_spelling  # noqa: E402
from aquainterp.logger import Logger  # noqa: E402
from probes.reference import freeze_reference  # noqa: E402
from probes.suite import PROBE_NAMES, ProbeSuite, due  # noqa: E402
from training import rl  # noqa: E402
from training.common import Dist  # noqa: E402
from training.optim import apply_schedule, build_optimizers  # noqa: E402

ARMS = ("no faith", "faith-every 0", "faith")


def main(argv=None) -> int:
    d = rl.RLConfig()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="a trained SFT or RL checkpoint dir (the demo's)")
    parser.add_argument("--difficulty", type=int, default=1, help="synthetic task difficulty (the demo's: 1)")
    parser.add_argument("--steps", type=int, default=2 * d.probe_every,
                        help=f"RL steps per arm (default {2 * d.probe_every}: two probe runs at the default cadence)")
    parser.add_argument("--probe-every", type=int, default=d.probe_every)
    parser.add_argument("--examples-per-step", type=int, default=d.examples_per_step)
    parser.add_argument("--num-samples", type=int, default=d.num_samples)
    parser.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens,
                        help=f"longest completion (default {d.max_new_tokens}, rl.py's; the demo's stop after ~30)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(normalize_flag_spelling(list(sys.argv[1:] if argv is None else argv)))
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    config = rl.RLConfig(checkpoint=args.checkpoint, difficulty=args.difficulty,
                         examples_per_step=args.examples_per_step, num_samples=args.num_samples,
                         max_new_tokens=args.max_new_tokens, probes=PROBE_NAMES, probe_every=args.probe_every,
                         max_steps=args.steps, progress=False)
    train, held_out = rl.load_problems(config)
    model, tokenizer, _ = rl.start_model(config, train, device)
    reference = freeze_reference(model, device)
    engine = rl.Engine(model)
    stop = {tokenizer.encode_special("<|assistant_end|>"), tokenizer.bos_token_id}
    ddp = Dist(rank=0, local_rank=0, world_size=1, device=device)
    optimizers = build_optimizers(model, d_model=model.config.n_embd)
    pad_id = tokenizer.encode_special("<|assistant_end|>")

    def suite(probes, faith_every):  # as training/rl.py builds it
        return ProbeSuite(model, tokenizer, held_out[: config.probe_batch], probes=probes, reference_model=reference,
                          batch_size=config.device_batch_size, decision=config.probe_decision,
                          rollout_letters=config.probe_rollouts, max_new_tokens=config.max_new_tokens,
                          progress=False, faith_every=faith_every, seed=config.seed)

    suites = {"no faith": suite(tuple(p for p in PROBE_NAMES if p != "faith"), 1),
              "faith-every 0": suite(PROBE_NAMES, 0), "faith": suite(PROBE_NAMES, 1)}
    print(f"model {args.checkpoint}: depth {model.config.n_layer}, {model.num_params() / 1e6:.2f}M params; "
          f"{config.examples_per_step} problems x {config.num_samples} samples, max_new_tokens "
          f"{config.max_new_tokens}, probe set {config.probe_batch}, probes every {config.probe_every}; "
          f"{args.steps} steps per arm, torch threads {torch.get_num_threads()}")
    with tempfile.TemporaryDirectory() as tmp:
        logger = Logger(tmp, mode="disabled")

        def step(s: int, arm: str) -> tuple[float, float]:
            """(CPU seconds of the whole step, of its probe call)."""
            c0 = time.process_time()
            apply_schedule(optimizers, 0.0, None)  # lr 0: every arm replays identical rollouts
            problems = [train[(s * config.examples_per_step + i) % len(train)] for i in range(config.examples_per_step)]
            batch = rl.sample_rollouts(engine, tokenizer, problems, config,
                                       [rl.sample_seed(config.seed, s, i) for i in range(config.examples_per_step)], stop)
            if arm == "faith":
                rl.rollout_consistency(batch, ddp)
            p0 = time.process_time()
            if due(s, config.probe_every):
                rl.run_probes(suites[arm], logger, s, batch)
            probe = time.process_time() - p0
            rl.train_on_rollouts(model, optimizers, batch, config, ddp, pad_id, None, s)
            return time.process_time() - c0, probe

        step(0, "no faith")  # warm-up
        cpu = {arm: [] for arm in ARMS}
        probe = {arm: [] for arm in ARMS}
        for s in range(args.steps):
            order = ARMS[s % 3:] + ARMS[: s % 3]
            for arm in order:
                c, p = step(s, arm)
                cpu[arm].append(c)
                probe[arm].append(p)
        logger.finish()
    base = statistics.mean(cpu["no faith"])
    for arm in ARMS:
        mean = statistics.mean(cpu[arm])
        diffs = [a - b for a, b in zip(cpu[arm], cpu["no faith"])]
        err = statistics.stdev(diffs) / math.sqrt(len(diffs)) / base if len(diffs) > 1 else float("nan")
        runs = [p for s, p in enumerate(probe[arm]) if due(s, config.probe_every)]
        print(f"  {arm:14s} {mean * 1e3:9.1f} ms CPU/step   ratio vs no faith {mean / base:.3f}x +- {err:.3f}   "
              f"(probe run {statistics.mean(runs) * 1e3:.0f} ms CPU)")
    faith_run = statistics.mean(p for s, p in enumerate(probe["faith"]) if due(s, config.probe_every))
    plain_run = statistics.mean(p for s, p in enumerate(probe["no faith"]) if due(s, config.probe_every))
    off_step = statistics.mean(c - p for c, p in zip(cpu["no faith"], probe["no faith"]))
    print(f"  from the probe runs' own CPU time: faith adds {(faith_run - plain_run) * 1e3:.0f} ms per probe run, "
          f"{(faith_run - plain_run) / (args.probe_every * (off_step + plain_run / args.probe_every)):.3f} of a step "
          f"with probes at every {args.probe_every} steps")
    return 0


if __name__ == "__main__":
    sys.exit(main())
