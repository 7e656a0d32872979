"""Batched activation patching vs one forward per patch, same model, same pairs, same run.

    python benchmarks/patching.py [--depth 4] [--n-pairs 8] [--batch-size 128] [--device cpu] [--threads 0]
                                  [--clock wall|cpu] [--method exact|attribution|all] [--checkpoint DIR]

Three ways to compute the same sweeps (resid_pre per layer × position, hook_z per layer × position × head):
- batched: aquainterp.patching.patcher.Patcher, --batch-size patched sequences per forward, each resumed at its
  patch's layer and first patched position from the base run's cache (reuse_prefix, the default), and no
  forward at all for a patch whose clean and corrupted activations are bitwise equal (skip_identical);
- naive: the same engine with one patch (all pairs of one cell) per forward from the first token,
  i.e. batch = n_pairs, reuse_prefix=False and skip_identical=False;
- transformer_lens: transformer_lens.patching's own function (one forward per cell, full logits).
Batched and naive must agree within 2e-5 in logit units (every pair's letter logit difference in every
cell; the batched path unembeds only the letter rows and resumes mid-model, so fp32 rounding of logits up to
the 15 soft-cap, 1.9e-6 per ulp, differs by a few ulps), transformer_lens within 1e-4 in logit units (normalised values divide these by the clean-corrupted
gap, and the tests check 1e-5 normalised on a smaller model); the script prints seconds and ratios. The model has random non-zero
weights (timing does not depend on training); prompts are the synthetic task's, tokenised by a
tokenizer trained here on the synthetic corpus.

--method attribution compares attribution patching (aquainterp.patching.attribution: one clean forward, one
corrupted forward + backward for every cell) with the exact batched sweep of the same pairs: seconds,
speed ratio, Pearson correlation of the normalised cells and of the per-pair logit differences, overlap
of the 10 strongest cells, and per layer where the estimate breaks (correlation, worst cell). With
--checkpoint DIR the model is a trained checkpoint and the pairs are its own completion decisions
(noise on question and options, as `aquainterp patch` does by default); docs/patching.md's trained depth-4 model is
benchmarks/train_depth4.py's (--checkpoint runs/depth4/sft/checkpoints). --method all runs both tables.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings

import torch
import transformer_lens.patching as tlp

from aquainterp.cli.main import normalize_flag_spelling
from aquainterp.model.gpt import GPT, GPTConfig
from aquainterp.patching.pairs import make_pairs
from aquainterp.patching.patcher import Patcher
from aquainterp.tasks.synthetic import SyntheticTask, corpus
from aquainterp.tokenizer import Tokenizer

TL = {"resid_pre": tlp.get_act_patch_resid_pre, "resid_mid": tlp.get_act_patch_resid_mid,
      "attn_out": tlp.get_act_patch_attn_out, "mlp_out": tlp.get_act_patch_mlp_out,
      "z": tlp.get_act_patch_attn_head_out_all_pos, "z_pos": tlp.get_act_patch_attn_head_out_by_pos}


CLOCK = {"wall": time.perf_counter, "cpu": time.process_time}
clock = CLOCK["wall"]


def timed(device, fn, *args):
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = clock()
    out = fn(*args)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out, clock() - start


ATTRIBUTION_SWEEPS = "resid_pre,attn_out,mlp_out,z_pos"


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten().double(), b.flatten().double()
    a, b = a - a.mean(), b - b.mean()
    denominator = (a.norm() * b.norm()).item()
    return float((a @ b).item() / denominator) if denominator > 0 else float("nan")


def best_time(device, repeats, fn, *args):
    out, best = None, float("inf")
    for _ in range(max(repeats, 1)):
        out, seconds = timed(device, fn, *args)
        best = min(best, seconds)
    return out, best


def attribution_table(patcher: Patcher, device, sweeps: str, repeats: int) -> None:
    """Attribution vs the exact batched sweep of the same pairs, one line per sweep, then per layer."""
    from aquainterp.patching.attribution import attribution_sweeps

    names = sweeps.split(",")
    _, t_all = best_time(device, repeats, attribution_sweeps, patcher, names)
    print(f"attribution, all {len(names)} sweeps in one pass: {t_all:.3f}s")
    for name in names:
        patcher.sweep(name)  # warm-up and the clean/corrupted caches
        exact, t_exact = best_time(device, repeats, patcher.sweep, name)
        (approx,), t_attr = best_time(device, repeats, attribution_sweeps, patcher, [name])
        e, a = exact.normalized, approx.normalized
        top = lambda v: set(v.abs().flatten().argsort(descending=True)[:10].tolist())
        overlap = len(top(e) & top(a))
        base = patcher.corrupted_ld  # per-pair effects: each pair's patched minus unpatched logit difference
        per_pair = pearson(exact.logit_diff - base, approx.logit_diff - base)
        print(f"{name:10s} {e.numel():6d} cells: exact batched {t_exact:7.2f}s  attribution {t_attr:6.3f}s  "
              f"| exact/attribution {t_exact / t_attr:6.1f}x  | Pearson r {pearson(e, a):+.3f} "
              f"(per-pair effects {per_pair:+.3f})  top-10 overlap {overlap}/10")
        for layer in range(e.shape[0]):
            gap = (a[layer] - e[layer]).abs()
            worst = tuple(int(i) for i in torch.unravel_index(gap.argmax(), gap.shape))
            print(f"    layer {layer}: r {pearson(e[layer], a[layer]):+.3f}  max |attr - exact| "
                  f"{gap.max().item():.3f} at {dict(zip(exact.axes[1:], worst))} "
                  f"(exact {e[layer][worst].item():+.3f}, attribution {a[layer][worst].item():+.3f})")


def attribution_on_checkpoint(args, device) -> int:
    from functools import partial

    from aquainterp.checkpoints.load import load_model
    from aquainterp.patching.completion_pairs import completion_pairs, greedy_completions

    model, tokenizer, meta = load_model(args.checkpoint, device=str(device))
    model.eval()
    problems = SyntheticTask(seed=0, split="eval", difficulty=1).problems(args.n_pairs * 2)
    got = completion_pairs(tokenizer, problems, "noise",
                           partial(greedy_completions, model, tokenizer, max_new_tokens=args.max_new_tokens))
    pairs = got.pairs[: args.n_pairs]
    config = model.config
    print(f"device {device}, threads {torch.get_num_threads()}, clock {args.clock}, checkpoint {args.checkpoint} step {meta.get('step')}: "
          f"depth {config.n_layer} (d_model {config.n_embd}, {config.n_head} heads, vocab {config.vocab_size}); "
          f"{len(pairs)} completion-decision pairs ({len(got.no_marker)} completions without a marker skipped), "
          f"{min(len(p.clean_ids) for p in pairs)}-{max(len(p.clean_ids) for p in pairs)} tokens, noise on "
          f"question and options, batch {args.batch_size}")
    patcher = Patcher(model, pairs, batch_size=args.batch_size, align="end", progress=False)
    print(f"clean logit diff {patcher.clean_ld.mean():.3f}, corrupted {patcher.corrupted_ld.mean():.3f}")
    attribution_table(patcher, device, args.sweeps or ATTRIBUTION_SWEEPS, args.repeats)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--vocab-size", type=int, default=65536,
                        help="model vocabulary (nanochat's 65536; the tokenizer's ids use the first few hundred)")
    parser.add_argument("--n-pairs", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--sweeps", default=None,
                        help="comma list (default: resid_pre,z_pos for exact; resid_pre,attn_out,mlp_out,z_pos "
                             "for attribution)")
    parser.add_argument("--method", choices=("exact", "attribution", "all"), default="exact",
                        help="exact: batched vs naive vs transformer_lens; attribution: attribution vs exact "
                             "batched; all: both tables")
    parser.add_argument("--checkpoint", default=None,
                        help="trained checkpoint folder (attribution only): its own completion decisions as pairs")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="--checkpoint: completion length cap")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per method (the best is kept)")
    parser.add_argument("--clock", choices=tuple(CLOCK), default="wall",
                        help="wall: elapsed seconds; cpu: this process's CPU seconds (all its threads), steadier "
                             "on a shared machine with --threads 1 (CPU only: a GPU's time is not counted)")
    args = parser.parse_args(normalize_flag_spelling(sys.argv[1:] if argv is None else argv))
    if args.checkpoint is not None and args.method != "attribution":
        parser.error("--checkpoint pairs have different lengths, which transformer_lens.patching cannot take; "
                     "use it with --method attribution")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.clock == "cpu" and device.type != "cpu":
        parser.error("--clock cpu counts this process's CPU time only; use --clock wall on a GPU")
    global clock
    clock = CLOCK[args.clock]

    if args.checkpoint is not None:
        return attribution_on_checkpoint(args, device)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*ran out of pairs to merge")
        tokenizer = Tokenizer.train_from_iterator(corpus(1500, seed=123), vocab_size=700)
    torch.manual_seed(0)
    config = GPTConfig.from_depth(args.depth, vocab_size=max(args.vocab_size, tokenizer.vocab_size), sequence_len=256)
    model = GPT(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)  # large enough that moving the answer moves the letter logits
    model = model.to(device).eval()
    problems = SyntheticTask(seed=0, split="eval", difficulty=1).problems(200)
    # One token length for every pair, as transformer_lens.patching needs.
    length = len(make_pairs(tokenizer, problems[:1], "permute")[0][0].clean_ids)
    pairs = [p for p in make_pairs(tokenizer, problems, "permute")[0] if len(p.clean_ids) == length]
    pairs = pairs[: args.n_pairs]
    print(f"device {device}, threads {torch.get_num_threads()}, clock {args.clock}, depth {args.depth} (d_model {config.n_embd}, "
          f"{config.n_head} heads, vocab {config.vocab_size}), {len(pairs)} pairs × {length} tokens, "
          f"batch {args.batch_size}")

    batched = Patcher(model, pairs, batch_size=args.batch_size, progress=False)
    if args.method in ("attribution", "all"):
        attribution_table(batched, device, args.sweeps or ATTRIBUTION_SWEEPS, args.repeats)
    if args.method == "attribution":
        return 0
    naive = Patcher(model, pairs, batch_size=len(pairs), progress=False, reuse_prefix=False, skip_identical=False)
    for name in (args.sweeps or "resid_pre,z_pos").split(","):
        batched.sweep(name)  # warm-up (and the clean/corrupted caches) for both engines
        naive.sweep(name)
        fast, t_fast = timed(device, batched.sweep, name)
        slow, t_slow = timed(device, naive.sweep, name)
        _, clean_cache = model.run_with_cache(batched.tokens["clean"])
        ref, t_tl = timed(device, TL[name], model, batched.tokens["corrupted"], clean_cache, batched.metric)
        cells = fast.normalized.numel()
        d_naive = (fast.normalized - slow.normalized).abs().max().item()
        raw_naive = (fast.logit_diff - slow.logit_diff).abs().max().item()
        d_tl = (fast.normalized - ref.to(fast.normalized.device)).abs().max().item()
        raw_tl = d_tl * abs(batched.scale)  # the same gap in logits, before dividing by clean - corrupted
        print(f"{name:10s} {cells} cells: batched {t_fast:7.2f}s  naive {t_slow:7.2f}s  "
              f"transformer_lens {t_tl:7.2f}s  | naive/batched {t_slow / t_fast:5.1f}x  "
              f"TL/batched {t_tl / t_fast:5.1f}x  | max diff vs naive {d_naive:.1e}, vs TL {d_tl:.1e} "
              f"(normalised; {raw_naive:.1e} and {raw_tl:.1e} in logits, gap {batched.scale:.3f})")
        if raw_naive > 2e-5 or raw_tl > 1e-4:  # fp32 logits near the 15 soft-cap: ulps of 1.9e-6, a few add up
            print(f"MISMATCH in {name}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
