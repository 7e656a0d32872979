"""Ours against nanochat's own code at a named commit, on identical weights: is aquainterp as fast as the
nanochat it reproduces?

    .venv/bin/python benchmarks/peers.py --nanochat-src /tmp/nanochat-2c4473d --nanochat-src /tmp/nanochat-92d63d4
    .venv/bin/python benchmarks/peers.py --nanochat-src DIR --depth 2 --width 128 --rounds 3   # quick look

DIR is a checkout (or `git archive`) of github.com/karpathy/nanochat, kept outside this repository; a DIR
that does not exist is skipped with one line. The architecture follows the commit: one with
`GPT.setup_optimizer` (HEAD, 92d63d4) is compared with our nanochat-2026-07 preset, an older one (2c4473d)
with nanochat-2025-10. Each DIR runs in its own process (both are the package `nanochat`), with
TORCHDYNAMO_DISABLE=1: nanochat's @torch.compile'd optimizer helpers run eagerly ("nanochat eager"), as
our code does on CPU. nanochat's Engine imports its tokenizer module, so nanochat's own dependencies tiktoken
and rustbpe must be importable (`pip install --target DEPS tiktoken rustbpe`, then PYTHONPATH=DEPS).

First the identity on identical weights (logits, loss, every gradient, greedy tokens), then per measurement
the median time of each side and the median and min-max of the per-round ratios ours / nanochat (each
round runs both sides back to back, in alternating order): forward without grad, forward + backward,
optimizer step (both optimizers of a step on the same gradients), full train step, KV-cache generation
(one prompt, `--gen-batch` rows, greedy and sampled), and memory: on CPU the bytes autograd saves for
backward in forward + backward, on CUDA the peak allocated.

Times are process CPU seconds with --threads 1 by default (a shared machine's other jobs then cost less
noise than wall time); --clock wall for wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

MEASUREMENTS = ("forward, no grad", "forward + backward", "optimizer step", "full train step",
                "generation, greedy", "generation, sampled", "memory, forward + backward")


def _worker(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(Path(args.worker).resolve()))
    import nanochat.engine as nengine
    import nanochat.gpt as ngpt

    from aquainterp.checkpoints.nanochat import config_from_nanochat, state_from_nanochat
    from aquainterp.model.engine import Engine
    from aquainterp.model.gpt import GPT
    from training.muon import Muon
    from training.optim import build_optimizers
    from training.orthogonalize import orthogonalize_dtype

    is_head = hasattr(ngpt.GPT, "setup_optimizer")
    heads = args.width // args.head_dim
    model_config = dict(sequence_len=args.seq_len, vocab_size=args.vocab, n_layer=args.depth, n_head=heads,
                        n_kv_head=heads, n_embd=args.width)
    if is_head:
        model_config["window_pattern"] = "SSSL"
    torch.manual_seed(0)
    theirs = ngpt.GPT(ngpt.GPTConfig(**model_config))
    theirs.init_weights()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # off nanochat's init, where several parts are exactly neutral
        for p in theirs.parameters():
            if p.ndim == 2:
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[1] ** 0.5)
            else:
                p.copy_(0.5 + 0.5 * torch.rand(p.shape, generator=gen))
    state = state_from_nanochat({k: v for k, v in theirs.state_dict().items() if k not in ("cos", "sin")})
    ours = GPT(config_from_nanochat(model_config, state, args.worker))
    ours.load_state_dict(state, strict=False)
    ours_name = {n: next(iter(state_from_nanochat({n: None}))) for n, _ in theirs.named_parameters()}
    our_params = dict(ours.named_parameters())
    assert len(our_params) == len(ours_name)
    for n, p in theirs.named_parameters():
        assert torch.equal(our_params[ours_name[n]], p), n

    x = torch.randint(0, args.vocab, (args.batch, args.seq_len), generator=gen)
    y = torch.roll(x, -1, dims=1)
    y[:, -1] = -1
    lrs = dict(unembedding_lr=0.004, embedding_lr=0.2, matrix_lr=0.02, weight_decay=0.2)
    their_opts = [theirs.setup_optimizer(**lrs)] if is_head else theirs.setup_optimizers(**lrs)
    ns_dtype = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16}[args.ns_dtype]
    our_opts = build_optimizers(ours, d_model=args.width, ns_dtype=ns_dtype, **lrs)

    # identity on identical weights
    with torch.no_grad():
        logit_diff = (ours(x) - theirs(x)).abs().max().item()
    loss_ours, loss_theirs = ours(x, y), theirs(x, y)
    loss_ours.backward()
    loss_theirs.backward()
    grad_diff = max((our_params[ours_name[n]].grad - p.grad).abs().max().item() / p.grad.abs().max().item()
                    for n, p in theirs.named_parameters())
    grads = {n: p.grad.clone() for n, p in ours.named_parameters()}

    class NoToolTokens:  # nanochat's Engine asks its tokenizer for special ids; none can be sampled here
        def encode_special(self, _name):
            return -1

        def get_bos_token_id(self):
            return -1

    their_engine, our_engine = nengine.Engine(theirs, NoToolTokens()), Engine(ours)
    prompt = x[0, : args.prompt_len].tolist()

    def their_generate(temperature):
        rows = [[] for _ in range(args.gen_batch)]
        for column, _ in their_engine.generate(prompt, num_samples=args.gen_batch, max_tokens=args.gen_tokens,
                                               temperature=temperature, seed=7):
            for row, token in zip(rows, column):
                row.append(token)
        return rows

    def our_generate(temperature):
        return our_engine.generate(prompt, num_samples=args.gen_batch, max_new_tokens=args.gen_tokens,
                                   temperature=temperature, seed=7).completions

    greedy_equal = their_generate(0.0) == our_generate(0.0)

    def set_grads(model, opts):
        for opt in opts:
            opt.zero_grad(set_to_none=True)
        for n, p in model.named_parameters():
            p.grad = grads[n if model is ours else ours_name[n]].clone()

    # one step of both optimizers on the same gradients: how far apart the weights land, per the update's size
    muon = next(opt for opt in our_opts if isinstance(opt, Muon))
    our_ns_dtype = muon.ns_dtype or orthogonalize_dtype(x.device, muon.recipe.bf16_on_cpu)
    before = {n: p.detach().clone() for n, p in theirs.named_parameters()}
    for model, opts in ((ours, our_opts), (theirs, their_opts)):
        set_grads(model, opts)
        for opt in opts:
            opt.step()
    step_diff = max((our_params[ours_name[n]] - p).abs().max().item() / (p - before[n]).abs().max().item()
                    for n, p in theirs.named_parameters() if not torch.equal(p, before[n]))

    def fwd(model):
        with torch.no_grad():
            model(x)

    def fwd_bwd(model):
        model(x, y).backward()
        model.zero_grad(set_to_none=True)

    def opt_step(model, opts):
        set_grads(model, opts)
        start = CLOCK()
        for opt in opts:
            opt.step()
        return CLOCK() - start

    def train_step(model, opts):
        model(x, y).backward()
        for opt in opts:
            opt.step()
        model.zero_grad(set_to_none=True)

    def saved_bytes(model):
        total = 0

        def pack(t):
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(x, y)
        loss.backward()
        model.zero_grad(set_to_none=True)
        return total

    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter

    def timed(fn):
        start = CLOCK()
        fn()
        return CLOCK() - start

    arms = {
        "forward, no grad": (lambda: timed(lambda: fwd(ours)), lambda: timed(lambda: fwd(theirs))),
        "forward + backward": (lambda: timed(lambda: fwd_bwd(ours)), lambda: timed(lambda: fwd_bwd(theirs))),
        "optimizer step": (lambda: opt_step(ours, our_opts), lambda: opt_step(theirs, their_opts)),
        "full train step": (lambda: timed(lambda: train_step(ours, our_opts)),
                            lambda: timed(lambda: train_step(theirs, their_opts))),
        "generation, greedy": (lambda: timed(lambda: our_generate(0.0)), lambda: timed(lambda: their_generate(0.0))),
        "generation, sampled": (lambda: timed(lambda: our_generate(1.0)), lambda: timed(lambda: their_generate(1.0))),
    }
    arms = {label: pair for label, pair in arms.items() if args.only in label}
    for a, b in arms.values():  # warm-up
        a(), b()
    times = {label: ([], []) for label in arms}
    for r in range(args.rounds):
        for label, (a, b) in arms.items():
            if r % 2:
                tb, ta = b(), a()
            else:
                ta, tb = a(), b()
            times[label][0].append(ta)
            times[label][1].append(tb)
    if torch.cuda.is_available() and x.is_cuda:  # pragma: no cover - CPU here
        raise SystemExit("peers: CUDA timing is not wired")
    mem = (saved_bytes(ours), saved_bytes(theirs))
    return {"architecture": "nanochat-2026-07" if is_head else "nanochat-2025-10", "src": args.worker,
            "commit": _commit_of(Path(args.worker)), "identity": {"logits": logit_diff,
                                                                  "loss": abs(loss_ours.item() - loss_theirs.item()),
                                                                  "grads": grad_diff, "greedy_equal": greedy_equal,
                                                                  "optimizer_step": step_diff},
            "ns_dtype": str(our_ns_dtype).removeprefix("torch."),
            "times": times, "memory": mem, "torch": torch.__version__}


def _commit_of(src: Path) -> str:
    for name in ("COMMIT", ".commit"):  # a `git archive` export can carry its commit in a file
        if (src / name).is_file():
            return (src / name).read_text().strip()[:12]
    done = subprocess.run(["git", "-C", str(src), "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else "unknown commit"


def _median(values):
    return statistics.median(values)


def _print_result(res: dict) -> dict[str, str]:
    ident = res["identity"]
    print(f"\n{res['architecture']} vs nanochat {res['commit']} ({res['src']})")
    print(f"  identity on identical weights: logits max|diff| {ident['logits']:.2e}, loss |diff| {ident['loss']:.2e}, "
          f"grads max|diff|/max|grad| {ident['grads']:.2e}, greedy tokens equal: {ident['greedy_equal']}")
    print(f"  one optimizer step on identical gradients: weights max|diff|/max|update| {ident['optimizer_step']:.2e} "
          f"(our orthogonalisation in {res['ns_dtype']})")
    print(f"  {'measurement':<28} {'ours':>10} {'nanochat':>10} {'ratio':>7}  min-max")
    rows = []
    for label, (ours, theirs) in res["times"].items():
        ratios = [a / b for a, b in zip(ours, theirs)]
        print(f"  {label:<28} {_median(ours) * 1e3:8.1f}ms {_median(theirs) * 1e3:8.1f}ms {_median(ratios):6.2f}x  "
              f"{min(ratios):.2f}-{max(ratios):.2f}")
        rows.append((label, f"{_median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})"))
    ours_b, theirs_b = res["memory"]
    print(f"  {'memory, forward + backward':<28} {ours_b / 2**20:8.1f}MB {theirs_b / 2**20:8.1f}MB "
          f"{ours_b / theirs_b:6.2f}x  (bytes autograd saves for backward)")
    rows.append(("memory, forward + backward", f"{ours_b / theirs_b:.2f}x"))
    identity = (f"logits/loss/grads max diff {ident['logits']:.1e}/{ident['loss']:.1e}/{ident['grads']:.1e}, "
                f"greedy {'same' if ident['greedy_equal'] else 'DIFFERENT'}; one optimizer step "
                f"{ident['optimizer_step']:.1e} of the update ({res['ns_dtype']} orthogonalisation)")
    return {"logits / grads on identical weights": identity, **dict(rows)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nanochat-src", action="append", default=[], metavar="DIR",
                        help="a nanochat checkout at a named commit (repeatable: one per architecture)")
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--gen-batch", type=int, default=8)
    parser.add_argument("--gen-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    parser.add_argument("--only", default="", help="measure only the rows whose name contains this")
    parser.add_argument("--ns-dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                        help="our Muon's orthogonalisation dtype (auto: the recipe's, training.orthogonalize."
                             "orthogonalize_dtype: bf16 where its nanochat uses bf16 and the device has bf16 units)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(_worker(args)))
        return 0
    if not args.nanochat_src:
        parser.error("give at least one --nanochat-src DIR")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"peers: ours / nanochat's own code, CPU, {args.threads} thread(s), {args.clock} clock; our Muon's "
          f"orthogonalisation {args.ns_dtype}; depth {args.depth}, "
          f"width {args.width}, vocab {args.vocab}, batch {args.batch}x{args.seq_len}; generation {args.gen_batch} "
          f"rows x {args.gen_tokens} tokens; {args.rounds} rounds; load average {load:.1f} on {os.cpu_count()} CPUs")
    columns = []
    for src in args.nanochat_src:
        if not (Path(src) / "nanochat" / "gpt.py").is_file():
            print(f"peers: skipped {src}: no nanochat checkout there (nanochat/gpt.py missing)")
            continue
        argv_worker = [sys.executable, __file__, "--worker", src] + [
            f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k not in ("nanochat_src", "worker")]
        path = [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]
        env = {**os.environ, "TORCHDYNAMO_DISABLE": "1", "PYTHONPATH": os.pathsep.join(p for p in path if p)}
        done = subprocess.run(argv_worker, capture_output=True, text=True, env=env)
        if done.returncode != 0:
            print(done.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"peers: the worker for {src} failed (exit {done.returncode})")
        res = json.loads(done.stdout.strip().splitlines()[-1])
        columns.append((f"{res['architecture']} vs nanochat {res['commit']}", _print_result(res)))
    if columns:
        print("\n| | " + " | ".join(name for name, _ in columns) + " |")
        print("|---|" + "---|" * len(columns))
        for label in ("logits / grads on identical weights", *MEASUREMENTS):
            print(f"| {label} | " + " | ".join(col.get(label, "not run") for _, col in columns) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
