"""Batched activation patching vs one forward per patch, same model, same pairs, same run.

    python benchmarks/patching.py [--depth 4] [--n-pairs 8] [--batch-size 128] [--device cpu] [--threads 0]

Three ways to compute the same sweeps (resid_pre per layer × position, hook_z per layer × position × head):
- batched: aquainterp.patching.Patcher, --batch-size patched sequences per forward, each resumed at its
  patch's layer and first patched position from the base run's cache (reuse_prefix, the default);
- naive: the same engine with one patch (all pairs of one cell) per forward from the first token,
  i.e. batch = n_pairs and reuse_prefix=False;
- transformer_lens: transformer_lens.patching's own function (one forward per cell, full logits).
Batched and naive must agree within 1e-5 in logit units (every pair's letter logit difference in every
cell; the batched path unembeds only the letter rows, so fp32 rounding near the soft-cap differs by
~1e-6), transformer_lens within 1e-4 in logit units (normalised values divide these by the clean-corrupted
gap, and the tests check 1e-5 normalised on a smaller model); the script prints seconds and ratios. The model has random non-zero
weights (timing does not depend on training); prompts are the synthetic task's, tokenised by a
tokenizer trained here on the synthetic corpus.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings

import torch
import transformer_lens.patching as tlp

from aquainterp.cli import normalize_flag_spelling
from aquainterp.model import GPT, GPTConfig
from aquainterp.patching import Patcher, make_pairs
from aquainterp.tasks.synthetic import SyntheticTask, corpus
from aquainterp.tokenizer import Tokenizer

TL = {"resid_pre": tlp.get_act_patch_resid_pre, "z_pos": tlp.get_act_patch_attn_head_out_by_pos}


def timed(device, fn, *args):
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn(*args)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--vocab-size", type=int, default=65536,
                        help="model vocabulary (nanochat's 65536; the tokenizer's ids use the first few hundred)")
    parser.add_argument("--n-pairs", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--sweeps", default="resid_pre,z_pos")
    args = parser.parse_args(normalize_flag_spelling(sys.argv[1:] if argv is None else argv))
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

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
    print(f"device {device}, threads {torch.get_num_threads()}, depth {args.depth} (d_model {config.n_embd}, "
          f"{config.n_head} heads, vocab {config.vocab_size}), {len(pairs)} pairs × {length} tokens, "
          f"batch {args.batch_size}")

    batched = Patcher(model, pairs, batch_size=args.batch_size, progress=False)
    naive = Patcher(model, pairs, batch_size=len(pairs), progress=False, reuse_prefix=False)
    for name in args.sweeps.split(","):
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
        if raw_naive > 1e-5 or raw_tl > 1e-4:  # fp32 logits near the 15 soft-cap: ~1e-6 rounding each
            print(f"MISMATCH in {name}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
