"""What the probes cost: per-probe milliseconds on a depth-4 CPU model, and the RL step time with
probes at the default cadence vs probes off, measured side by side in one run.

    .venv/bin/python benchmarks/probes.py                 # depth 4, CPU, a small RL step
    .venv/bin/python benchmarks/probes.py --examples-per-step 16 --num-samples 16 --max-new-tokens 256
    .venv/bin/python benchmarks/probes.py --checkpoint runs/demo/rl/checkpoints --difficulty 1  # a trained model

A fresh random model never writes "Answer:", so under the default decision (the answer step of the
policy's own completion) its probe runs decode the probe set but skip the letter forward; pass a trained
--checkpoint (the demo's) to time what a real run pays.

The RL step is training/rl.py's own loop body (rollouts with the Engine, run_probes on the due steps,
train_on_rollouts). Both arms replay the same steps with the same sampling seeds and the learning rate
held at 0, so they generate and train on identical tokens and differ only by the probe runs. The arms
run each step back to back (off then on on even steps, on then off on odd ones), so a neighbour's load
burst hits both alike. The suite is built as rl.py builds it, so the hardest-questions table (greedy
completions) comes on probe steps that are multiples of its table_every (default 50 = every 5th probe
run): the default --blocks (blocks of probe_every steps) covers one such cycle; fewer blocks
over-weight the table (with 2 blocks, 1 probe run in 2 has it). The suite's first run also computes
the frozen reference's letter logits, which later runs reuse.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

# Run as a script, this file's folder comes first on sys.path and its name would shadow the `probes`
# package: drop that entry so `import probes` finds the package.
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402

from aquainterp.cli.main import normalize_flag_spelling  # noqa: E402
from aquainterp.logger import Logger  # noqa: E402
from probes.probe_set import build_probe_set  # noqa: E402
from probes.reference import freeze_reference  # noqa: E402
from probes.suite import PROBE_NAMES, ProbeSuite, due  # noqa: E402
from training import rl  # noqa: E402
from training.common import Dist  # noqa: E402
from training.optim import apply_schedule, build_optimizers  # noqa: E402


def clock() -> tuple[float, float]:
    """(process CPU seconds, wall seconds). CPU time (all threads of this process) is what we compare:
    on a shared machine wall time mostly measures the neighbours."""
    return time.process_time(), time.perf_counter()


def timed(fn, repeats: int) -> tuple[float, float]:
    """Median (CPU, wall) seconds of fn() over `repeats` calls after one warm-up call."""
    fn()
    cpu, wall = [], []
    for _ in range(repeats):
        c0, w0 = clock()
        fn()
        c1, w1 = clock()
        cpu.append(c1 - c0)
        wall.append(w1 - w0)
    return statistics.median(cpu), statistics.median(wall)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--depth", type=int, default=4, help="fresh random model of this depth (without --checkpoint)")
    parser.add_argument("--checkpoint", default=None, help="time a trained model instead (an RL or SFT checkpoint dir)")
    parser.add_argument("--difficulty", type=int, default=None, help="synthetic task difficulty (default: mixed)")
    parser.add_argument("--decision", choices=("completion", "direct"), default=rl.RLConfig().probe_decision,
                        help="where the letter and attention probes read (rl.py's --probe-decision)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per probe (median reported)")
    parser.add_argument("--probe-problems", type=int, default=rl.RLConfig().probe_batch)
    parser.add_argument("--probe-every", type=int, default=rl.RLConfig().probe_every)
    parser.add_argument("--blocks", type=int, default=None,
                        help="blocks of probe_every steps per arm (default: one hardest-table cycle, "
                             "table_every / probe_every)")
    parser.add_argument("--examples-per-step", type=int, default=4)
    parser.add_argument("--num-samples", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1: on a shared machine, idle OpenMP threads spin and bill CPU time)")
    parser.add_argument("--project-default-step", action="store_true",
                        help="also time one RL step at rl.py's default size and project the ratio at that size")
    args = parser.parse_args(normalize_flag_spelling(list(sys.argv[1:] if argv is None else argv)))
    table_every = inspect.signature(ProbeSuite).parameters["table_every"].default  # as rl.py gets it
    if args.blocks is None:
        args.blocks = max(1, table_every // args.probe_every)
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    config = rl.RLConfig(depth=None if args.checkpoint else args.depth, checkpoint=args.checkpoint,
                         difficulty=args.difficulty, probe_decision=args.decision, examples_per_step=args.examples_per_step, num_samples=args.num_samples,
                         max_new_tokens=args.max_new_tokens, probes=PROBE_NAMES, probe_every=args.probe_every,
                         probe_batch=args.probe_problems, eval_examples=args.probe_problems,
                         max_steps=args.blocks * args.probe_every * 2, progress=False)
    train, held_out = rl.load_problems(config)
    model, tokenizer, _ = rl.start_model(config, train, device)
    if args.checkpoint is None:
        with torch.no_grad():  # a fresh model has a zero lm_head (uniform logits); give it some preference
            model.lm_head.weight.normal_(0, 0.02)
    reference = freeze_reference(model, device)
    probe_set = held_out[: args.probe_problems]
    engine = rl.Engine(model)
    stop = {tokenizer.encode_special("<|assistant_end|>"), tokenizer.bos_token_id}
    print(f"model: {args.checkpoint or 'fresh'}, depth {model.config.n_layer}, {model.num_params() / 1e6:.2f}M params, vocab {tokenizer.vocab_size}, "
          f"device {device}, torch threads {torch.get_num_threads()}; probe set {len(probe_set)} problems, "
          f"batch {config.device_batch_size}")

    # ---- per-probe cost -------------------------------------------------------------------------------
    rollouts = rl.sample_rollouts(engine, tokenizer, train[: config.examples_per_step], config,
                                  list(range(config.examples_per_step)), stop)
    pairs = [(r.prompt, c) for r in rollouts for c in r.completions if c]
    print(f"\nper-probe cost, ms per run (median of {args.repeats}; CPU time of this process, wall in brackets):")
    items = build_probe_set(tokenizer, probe_set)  # tokenised once, shared by every suite below

    def make(probes, **kw):
        return ProbeSuite(model, tokenizer, items, probes=probes, reference_model=reference,
                          batch_size=config.device_batch_size, max_new_tokens=args.max_new_tokens,
                          decision=args.decision, progress=False, **kw)

    # (label, suite factory, step, completions, fresh suite per call); step 0 is a table step, 10 is not
    cases = [(name, lambda n=name: make((n,), hardest_k=0), 10, pairs, False) for name in PROBE_NAMES]
    cases += [("margin + hardest table (greedy completions)", lambda: make(("margin",)), 0, pairs, False),
              ("kl with greedy completions (no rollouts given)", lambda: make(("kl",)), 10, None, False),
              ("all, RL loop, probe step without table", lambda: make(PROBE_NAMES), 10, pairs, False),
              ("all, RL loop, table step", lambda: make(PROBE_NAMES), 0, pairs, False),
              ("all, a suite's first run (reference letters)", lambda: make(PROBE_NAMES), 10, pairs, True)]
    for label, factory, probe_step, completions, fresh in cases:
        kl_pairs = completions[:8] if completions else None  # kl_sequences, as rl.run_probes cuts them
        held = [factory()]

        def once(st=probe_step, c=kl_pairs, fresh=fresh, factory=factory, held=held):
            if fresh:
                held[0] = factory()
            held[0].run(st, completions=c, rollouts=rollouts)

        cpu, wall = timed(once, args.repeats)
        parts = ", ".join(f"{k} {v * 1e3:.0f}" for k, v in held[0].last_seconds.items() if k != "total")
        print(f"  {label:50s} {cpu * 1e3:8.1f}  [wall {wall * 1e3:.0f}; wall parts: {parts}]")

    # ---- RL step with probes at the default cadence vs off ----------------------------------------------
    ddp = Dist(rank=0, local_rank=0, world_size=1, device=device)
    optimizers = build_optimizers(model, d_model=model.config.n_embd)
    pad_id = tokenizer.encode_special("<|assistant_end|>")
    # constructed as training/rl.py constructs it
    suite = ProbeSuite(model, tokenizer, probe_set, probes=PROBE_NAMES, reference_model=reference,
                       batch_size=config.device_batch_size, decision=config.probe_decision,
                       rollout_letters=config.probe_rollouts, max_new_tokens=config.max_new_tokens, progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        logger = Logger(tmp, mode="disabled")

        def step(s: int, probes_on: bool) -> tuple[float, float, float]:
            c0, w0 = clock()
            apply_schedule(optimizers, 0.0, None)  # lr 0: both arms replay identical rollouts
            batch = rl.sample_rollouts(
                engine, tokenizer,
                [train[(s * config.examples_per_step + i) % len(train)] for i in range(config.examples_per_step)],
                config, [rl.sample_seed(config.seed, s, i) for i in range(config.examples_per_step)], stop)
            probe_cpu = 0.0
            if probes_on and due(s, config.probe_every):  # rl.py: probe_every and step % probe_every == 0
                p0, _ = clock()
                rl.run_probes(suite, logger, s, batch)
                probe_cpu = clock()[0] - p0
            rl.train_on_rollouts(model, optimizers, batch, config, ddp, pad_id, None, s)
            c1, w1 = clock()
            return c1 - c0, w1 - w0, probe_cpu

        totals = {arm: [0.0, 0.0] for arm in ("off", "on")}
        probe_cpu = 0.0
        differences = []  # per step: on CPU - off CPU, and the same without the probe call
        step(0, False)  # warm-up
        for s in range(args.blocks * args.probe_every):
            cpus = {}
            for arm in (("off", "on") if s % 2 == 0 else ("on", "off")):
                cpu, wall, pc = step(s, arm == "on")
                totals[arm][0] += cpu
                totals[arm][1] += wall
                probe_cpu += pc
                cpus[arm] = (cpu, pc)
            (on, on_probe), (off, _) = cpus["on"], cpus["off"]
            differences.append((on - off, on - on_probe - off))
        logger.finish()
    # the on arm's probe runs are at steps block * probe_every; those that are multiples of table_every
    # also built the hardest-questions table
    table_runs = sum(due(block * args.probe_every, suite.table_every) for block in range(args.blocks))
    n = args.blocks * args.probe_every
    (off_cpu, off_wall), (on_cpu, on_wall) = ([t / n for t in totals[a]] for a in ("off", "on"))
    print(f"\nRL step (training/rl.py rollout + run_probes + train_on_rollouts; examples_per_step "
          f"{config.examples_per_step} x num_samples {config.num_samples}, max_new_tokens {config.max_new_tokens}), "
          f"{n} steps per arm, probes every {args.probe_every} (rl.py default {rl.RLConfig().probe_every}):")
    print(f"  probes off   {off_cpu * 1e3:9.1f} ms CPU/step  [wall {off_wall * 1e3:.0f}]")
    print(f"  probes on    {on_cpu * 1e3:9.1f} ms CPU/step  [wall {on_wall * 1e3:.0f}]  "
          f"(one probe run {probe_cpu / args.blocks * 1e3:.0f} ms CPU on average; {table_runs} of "
          f"{args.blocks} runs built the hardest table, table_every {suite.table_every})")
    spread = statistics.stdev(d for d, _ in differences) / math.sqrt(n) / off_cpu
    rest = [r for _, r in differences]
    print(f"  ratio on/off {on_cpu / off_cpu:.3f}x CPU  [{on_wall / off_wall:.3f}x wall]  timed side by side "
          f"(+-{spread:.3f}: standard error of the mean per-step difference)")
    print(f"  the rest of the step (all but the probe call), on - off: {statistics.mean(rest) * 1e3:+.1f} ms "
          f"+- {statistics.stdev(rest) / math.sqrt(n) * 1e3:.1f} ms per step (what the probes cost outside "
          f"their own call, or the neighbours' noise)")
    print(f"  ratio from the probe runs' own CPU time: {1 + probe_cpu / args.blocks / (args.probe_every * off_cpu):.3f}x "
          f"(1 + probe run / ({args.probe_every} x off step); less sensitive to the neighbours' load)")
    if args.project_default_step:
        d = rl.RLConfig()
        big = dataclasses.replace(config, examples_per_step=d.examples_per_step, num_samples=d.num_samples,
                                  max_new_tokens=d.max_new_tokens)
        c0, _ = clock()
        batch = rl.sample_rollouts(engine, tokenizer, [train[i % len(train)] for i in range(big.examples_per_step)],
                                   big, [rl.sample_seed(big.seed, 0, i) for i in range(big.examples_per_step)], stop)
        rl.train_on_rollouts(model, optimizers, batch, big, ddp, pad_id, None, 0)
        big_cpu = clock()[0] - c0
        run_cpu = probe_cpu / args.blocks
        print(f"\none RL step at rl.py's default size ({d.examples_per_step} x {d.num_samples} samples, "
              f"{d.max_new_tokens} new tokens): {big_cpu * 1e3:.0f} ms CPU; projected ratio with one probe run "
              f"every {d.probe_every} steps: {1 + run_cpu / (d.probe_every * big_cpu):.3f}x (computed, not timed "
              f"side by side)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
