"""Train the depth-4 model that benchmarks/patching.py --method attribution --checkpoint validates on.

    python benchmarks/train_depth4.py [--out runs/depth4] [--seed 0] [--threads 1]
    python benchmarks/patching.py --method attribution --threads 1 --checkpoint runs/depth4/sft/checkpoints

The demo's pipeline (training.tok_train -> training.base -> training.sft, the same run(config) calls as
training/demo.py, on the synthetic AQuA-style task at difficulty 1) with a depth-4 GPT instead of the demo's
depth 2, then held-out categorical and greedy generative accuracy (chance 0.2). Numerics are pinned as the
demo pins them (training.demo.pin_numerics: MKL strict mode, AVX2 kernels, --threads torch threads), so a
seed gives the same checkpoint again. It writes OUT/{tokenizer,base,sft} and OUT/summary.json (settings,
accuracies, wall and CPU seconds per stage).

--out must be a new folder or one this script made (its .aquainterp-owner marker); that one is deleted and
trained again. Anything else is refused untouched.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aquainterp.cli.rundir import RunDirError, remove_owned, write_marker  # noqa: E402

OWNER = "benchmarks/train_depth4.py"
# depth 4 × aspect ratio 32 = width 128, 4 heads of 32 (the demo: depth 2 × 64, 4 heads of 32): twice the
# demo's compute per token. The demo's 250 SFT steps left seed 0 at 0.36 held-out greedy accuracy; 500 steps
# reach 0.86 (measured, 1 thread: base 84 s, SFT 271 s of CPU), so 500 it is
SETTINGS = dict(difficulty=1, vocab_size=512, tok_chars=1_000_000, depth=4, architecture="nanochat-2025-10",
                aspect_ratio=32, head_dim=32, seq_len=128, base_steps=300, base_batch_tokens=2048,
                base_device_batch=16, sft_examples=8000, sft_steps=500, sft_batch=32, sft_device_batch=32,
                sft_lr_frac=0.5, sft_styles="direct,checked", eval_n=200, gen_eval_n=200, rl_new_tokens=48)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--out", default="runs/depth4", help="output folder (default runs/depth4)")
    parser.add_argument("--seed", type=int, default=0, help="one seed for every stage (default 0)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--device", default="cpu")
    for key in ("depth", "aspect_ratio", "head_dim", "base_steps", "sft_steps", "eval_n"):
        parser.add_argument(f"--{key.replace('_', '-')}", type=int, default=SETTINGS[key],
                            help=f"default {SETTINGS[key]}")
    args = parser.parse_args(argv)
    s = {**SETTINGS, **{k: getattr(args, k) for k in ("depth", "aspect_ratio", "head_dim", "base_steps",
                                                       "sft_steps", "eval_n")}}
    s["gen_eval_n"] = s["eval_n"]
    out = Path(args.out)
    try:
        remove_owned(out, OWNER)  # refuses (RunDirError) a folder this script did not make
    except RunDirError as e:
        print(f"train_depth4: {e}", file=sys.stderr)
        return 2

    from training.demo import DemoConfig, held_out_accuracy, pin_numerics

    numerics = pin_numerics(args.threads)  # before any tensor math
    from training import base, sft, tok_train

    out.mkdir(parents=True)
    write_marker(out, OWNER, "depth-4 tokenizer/base/sft")
    times = {}

    def timed(name, fn):
        t0, c0 = time.time(), time.process_time()
        result = fn()
        times[name] = {"seconds": round(time.time() - t0, 1), "cpu_seconds": round(time.process_time() - c0, 1)}
        print(f"[{name}] {times[name]['seconds']} s wall, {times[name]['cpu_seconds']} s CPU", flush=True)
        return result

    tok_dir, base_dir, sft_dir = out / "tokenizer", out / "base", out / "sft"
    timed("tokenizer", lambda: tok_train.run(tok_train.TokTrainConfig(
        data="synthetic", out_dir=str(tok_dir), vocab_size=s["vocab_size"], max_chars=s["tok_chars"],
        eval_docs=200)))
    base_metrics = timed("base", lambda: base.run(base.BaseConfig(
        run_dir=str(base_dir), tokenizer_dir=str(tok_dir), val_docs=128,
        data=f"synthetic:{args.seed}:{s['difficulty']}", depth=s["depth"], architecture=s["architecture"],
        aspect_ratio=s["aspect_ratio"], head_dim=s["head_dim"], seq_len=s["seq_len"],
        device_batch_size=s["base_device_batch"], total_batch_tokens=s["base_batch_tokens"],
        max_steps=s["base_steps"], eval_every=0, save_every=s["base_steps"], device=args.device, bf16="auto",
        compile="off", seed=args.seed, wandb="disabled")))
    sft_metrics = timed("sft", lambda: sft.run(sft.SFTConfig(
        init_from=str(base_dir / "checkpoints"), run_dir=str(sft_dir), synthetic=s["sft_examples"],
        synthetic_seed=args.seed + 1, synthetic_difficulty=s["difficulty"], device_batch_size=s["sft_device_batch"],
        examples_per_step=s["sft_batch"], max_steps=s["sft_steps"], init_lr_frac=s["sft_lr_frac"],
        styles=s["sft_styles"], eval_every=0, eval_synthetic=0, save_every=s["sft_steps"], device=args.device,
        bf16="auto", compile="off", seed=args.seed, wandb="disabled")))
    accuracy = timed("eval", lambda: held_out_accuracy(sft_dir / "checkpoints", s,
                                                       DemoConfig(seed=args.seed, device=args.device)))
    floats = lambda m: {k: float(v) for k, v in (m or {}).items() if isinstance(v, int | float)}
    summary = {"settings": s, "seed": args.seed, "numerics": numerics, "times": times,
               "base": floats(base_metrics), "sft": floats(sft_metrics), **accuracy,
               "checkpoint": str(sft_dir / "checkpoints")}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"held-out ({s['eval_n']} problems, difficulty {s['difficulty']}): categorical "
          f"{accuracy['categorical_acc']:.3f}, greedy generative {accuracy['generative_acc']:.3f} (chance 0.200)\n"
          f"checkpoint: {sft_dir / 'checkpoints'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
