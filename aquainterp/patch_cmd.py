"""`aquainterp patch`: activation patching of a saved checkpoint, written as tensors, JSON and HTML.

    aquainterp patch --checkpoint runs/sft --task synthetic --n-pairs 16 --corruption permute --out runs/patch

Loads the model (our checkpoint, or an HF NanoChat directory through the bridge), builds clean/corrupted
pairs from the task, runs the sweeps (aquainterp.patching) and writes into --out:
- patching.safetensors: per sweep `{direction}/{sweep}/normalized` [*cells] and `.../logit_diff`
  [*cells, pairs], plus the baselines and token ids;
- summary.json: the run's settings, the pairs, baselines and each sweep's axes, range and top cells;
- patching.html: the report (aquainterp.patch_report): summary, cropped heatmaps with the decision column,
  per-pair drill-down, raw JSON last (plotly.js inlined, works offline).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from aquainterp.patching import ALIGNMENTS, CORRUPTIONS, DIRECTIONS, STYLES, SWEEPS, Patcher, SweepResult

TASKS = ("synthetic", "aqua")
DECISIONS = ("completion", "prompt")
METHODS = ("exact", "attribution")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from aquainterp.cliargs import (
        SEED,
        count_int,
        data_source,
        device_name,
        existing_path,
        number,
        positive_int,
    )

    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", type=existing_path("dir"), help="checkpoint folder written by aquainterp.checkpoint")
    source.add_argument("--hf-dir", type=existing_path("dir"), help="HF NanoChatForCausalLM directory (imported via the bridge)")
    source.add_argument("--checkpoint-series", type=existing_path("dir"), metavar="RUN_DIR/checkpoints",
                        help="patch the same pairs on every --every-th saved step of a run (pairs built on the newest "
                             "selected step): a step x cell view in the report, series.safetensors and metrics.jsonl "
                             "for the 'Circuit drift' dashboard template")
    parser.add_argument("--every", type=positive_int(1 << 30), default=1,
                        help="--checkpoint-series: steps whose number is a multiple of K, plus the newest (default: all)")
    parser.add_argument("--wandb", choices=("disabled", "offline", "online"), default="disabled",
                        help="--checkpoint-series: also log the per-step metrics to W&B (always to --out/metrics.jsonl)")
    parser.add_argument("--step", type=count_int(), default=None, help="checkpoint step (default: the latest)")
    parser.add_argument("--tokenizer", type=existing_path("dir"), default=None,
                        help="tokenizer folder, when the checkpoint or HF dir carries none")
    parser.add_argument("--task", choices=TASKS, default="synthetic", help="problems to pair up")
    parser.add_argument("--data", type=data_source, default=None,
                        help="AQuA JSON Lines file or hub id (task aqua; default deepmind/aqua_rat)")
    parser.add_argument("--split", default=None, help="synthetic: train|eval (default eval); aqua hub split")
    parser.add_argument("--difficulty", type=int, default=None, choices=(1, 2, 3),
                        help="synthetic problems of one difficulty (default: the task's mix), e.g. the demo's 1")
    parser.add_argument("--n-pairs", type=positive_int(100_000), default=8, help="clean/corrupted pairs to patch")
    parser.add_argument("--batch-size", type=positive_int(1 << 20), default=32, help="patched sequences per forward")
    parser.add_argument("--device", type=device_name, default="cpu", help="torch device (cpu, cuda, cuda:1, mps)")
    parser.add_argument("--decision", choices=DECISIONS, default="completion",
                        help="completion (default): the problem + the model's own greedy completion, teacher-forced "
                             "and cut right after its answer marker ('Answer:'), where a reasoning model picks its "
                             "letter; the corrupted run has the corrupted problem and the SAME completion; problems "
                             "whose completion writes no marker are skipped and counted. prompt: a fixed prompt cut "
                             "at 'Answer:' (see --style), for models trained to answer in one token")
    parser.add_argument("--max-new-tokens", type=positive_int(4096), default=128,
                        help="--decision completion: longest greedy completion, in tokens")
    parser.add_argument("--corruption", choices=CORRUPTIONS, default=None,
                        help="permute: the gold option swaps places with another; numbers: one question number "
                             "changes so another option is right (--decision prompt, style direct); noise: Gaussian "
                             "noise on the problem's token embeddings (--decision completion: question and options). "
                             "Default: noise for --decision completion (a model that checks the options in its "
                             "completion follows its own checks, so permuting the prompt's options hardly moves it), "
                             "permute for --decision prompt")
    parser.add_argument("--style", choices=STYLES, default=None,
                        help="--decision prompt only: decision right after the question (direct, default), after the "
                             "worked rationale (reasoning) or after the rationale and the option checks (checked; "
                             "corruption noise)")
    parser.add_argument("--direction", choices=(*DIRECTIONS, "both"), default="denoise",
                        help="denoise: clean activation into the corrupted run (what restores the answer); noise: "
                             "corrupted activation into the clean run (what breaks it); both")
    parser.add_argument("--sweeps", default=",".join(SWEEPS), help=f"comma list from {','.join(SWEEPS)}")
    parser.add_argument("--method", choices=METHODS, default="exact",
                        help="exact: one patched forward per cell and pair (batched); attribution: the gradient "
                             "estimate of every cell at once (one clean forward, one corrupted forward + backward; "
                             "exact only where the metric is linear in the activation, see README)")
    parser.add_argument("--align", choices=ALIGNMENTS, default="end",
                        help="position axis counts from the prompt start, or back from the decision token")
    parser.add_argument("--noise-scale", type=number(float, 0.0, 1e3, lo_open=True), default=3.0, help="noise std in embedding stds")
    parser.add_argument("--seed", type=SEED, default=0, help="problems, corruption order and noise")
    parser.add_argument("--skip-unalignable", action="store_true",
                        help="drop problems with no same-length corruption instead of stopping")
    parser.add_argument("--out", type=Path, required=True,
                        help="new or empty folder for patching.safetensors, summary.json and patching.html")


class LoadFailure(ValueError):
    """The checkpoint, HF directory or tokenizer could not be loaded: a runtime failure (exit 1)."""


def fail(message: str, code: int = 2) -> int:
    """One line on stderr; 2 for a usage error, 1 for a runtime failure (a file that cannot be loaded)."""
    print(f"aquainterp patch: error: {message}", file=sys.stderr)
    return code


def load(args):
    """(model, tokenizer, description) from --checkpoint or --hf-dir; ValueError with a plain message."""
    if args.checkpoint is not None:
        from aquainterp.checkpoint import load_model

        where = f"checkpoint {args.checkpoint}"
        try:
            model, tokenizer, meta = load_model(args.checkpoint, args.step, device=args.device)
        except Exception as e:  # the CLI boundary: a bad checkpoint is a message, not a traceback
            raise LoadFailure(f"cannot load {where}: {e}") from e
        described = {"checkpoint": str(args.checkpoint), "step": meta.get("step", args.step)}
    else:
        from aquainterp.bridge import import_hf

        where = f"HF directory {args.hf_dir}"
        try:
            model = import_hf(args.hf_dir).to(args.device)
        except Exception as e:
            raise LoadFailure(f"cannot load {where}: {e}") from e
        tokenizer = None
        if (args.hf_dir / "tokenizer.json").is_file() and args.tokenizer is None:
            args.tokenizer = args.hf_dir
        described = {"hf_dir": str(args.hf_dir)}
    if args.tokenizer is not None:
        from aquainterp.tokenizer import Tokenizer

        try:
            tokenizer = Tokenizer.load(args.tokenizer)
        except Exception as e:
            raise LoadFailure(f"cannot load tokenizer {args.tokenizer}: {e}") from e
    if tokenizer is None:
        raise ValueError(f"{where} carries no tokenizer; pass --tokenizer DIR")
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} tokens but the model's vocabulary is "
                         f"{model.config.vocab_size}: they do not belong together")
    described["model_config"] = model.config.to_dict()
    return model.eval(), tokenizer, described


def problems(args):
    """A stream of problems for the task (more than --n-pairs, since some may not pair up)."""
    if args.task == "synthetic":
        from aquainterp.tasks.synthetic import SyntheticTask

        task = SyntheticTask(seed=args.seed, split=args.split or "eval", difficulty=args.difficulty)
        return task.problems(args.n_pairs * 4)
    from aquainterp.tasks.aqua import load_aqua

    source = args.data or "deepmind/aqua_rat"
    return load_aqua(source, split=args.split or "validation")


def resolve_decision(args) -> None:
    """Fill --corruption/--style defaults for the chosen --decision; ValueError for combinations that
    cannot work."""
    if args.decision == "completion":
        if args.style is not None:
            raise ValueError("--style sets where a fixed prompt is cut (--decision prompt); --decision completion "
                             "cuts the model's own completion at its answer marker")
        args.corruption = args.corruption or "noise"
        if args.corruption == "numbers":
            raise ValueError("--corruption numbers changes the question, so the model's own completion would no "
                             "longer fit it; use noise or permute with --decision completion")
    else:
        args.style = args.style or "direct"
        args.corruption = args.corruption or "permute"


def build_pairs(args, tokenizer, pool, model=None):
    """(pairs, skipped sources, no-marker sources, completions by source) for --decision."""
    from functools import partial

    from aquainterp.completion_pairs import completion_pairs, greedy_completions
    from aquainterp.patching import make_pairs

    pairs, skipped, no_marker, completions = [], [], [], {}
    for start in range(0, len(pool), args.n_pairs):
        chunk = pool[start: start + args.n_pairs]
        if args.decision == "completion":
            generate = partial(greedy_completions, model, tokenizer, max_new_tokens=args.max_new_tokens,
                               batch_size=args.batch_size, progress=True)
            got = completion_pairs(tokenizer, chunk, args.corruption, generate, seed=args.seed + start,
                                   skip_unalignable=args.skip_unalignable)
            pairs += got.pairs
            skipped += got.unalignable
            no_marker += got.no_marker
            completions.update(got.completions)
        else:
            got, dropped = make_pairs(tokenizer, chunk, args.corruption, seed=args.seed + start,
                                      skip_unalignable=args.skip_unalignable, style=args.style)
            pairs += got
            skipped += dropped
        if len(pairs) >= args.n_pairs:
            break
    if not pairs:
        why = (f"; {len(no_marker)} of the model's completions never wrote the answer marker"
               if no_marker else "")
        raise ValueError(f"no {args.corruption} pairs could be built from {len(pool)} {args.task} problems{why}")
    return pairs[: args.n_pairs], skipped, no_marker, completions


# ---------------------------------------------------------------------------------------------------
# Outputs


def save_tensors(path: Path, patcher: Patcher, results: list[SweepResult]) -> None:
    from safetensors.torch import save_file

    tensors = {
        "clean_logit_diff": patcher.clean_ld, "corrupted_logit_diff": patcher.corrupted_ld,
        "clean_tokens": patcher.tokens["clean"], "corrupted_tokens": patcher.tokens["corrupted"],
        "lengths": patcher.lengths,
    }
    for r in results:
        tensors[f"{r.direction}/{r.name}/normalized"] = r.normalized
        tensors[f"{r.direction}/{r.name}/logit_diff"] = r.logit_diff
    axes = {f"{r.direction}/{r.name}": list(r.axes) for r in results}
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path),
              metadata={"axes": json.dumps(axes), "align": patcher.align})


def cell_label(r: SweepResult, index: tuple[int, ...], positions: list[str]) -> dict:
    out = {}
    for axis, i in zip(r.axes, index):
        out[axis] = int(i)
        if axis == "pos":
            out["token"] = positions[i]
    return out


def summarize(r: SweepResult, positions: list[str], top: int = 5) -> dict:
    values = r.normalized
    order = values.abs().flatten().argsort(descending=True)[:top].tolist()
    cells = [dict(cell_label(r, tuple(torch.unravel_index(torch.tensor(i), values.shape)), positions),
                  value=float(values.flatten()[i])) for i in order]
    moved = (values - (0.0 if r.direction == "denoise" else 1.0)).abs()
    return {"axes": list(r.axes), "shape": list(values.shape), "min": float(values.min()),
            "max": float(values.max()), "mean": float(values.mean()), "std": float(values.std()),
            "n_cells": values.numel(), "n_above_10pct": int((moved >= 0.1).sum()), "top_cells": cells}


def write_report(out: Path, patcher: Patcher, results: list[SweepResult], tokenizer, settings: dict,
                 extra_html: str = "") -> dict:
    """Tensors, summary.json and patching.html under `out`; returns the summary."""
    from aquainterp.patch_report import write_html

    out.mkdir(parents=True, exist_ok=True)
    positions = patcher.position_labels(tokenizer)
    save_tensors(out / "patching.safetensors", patcher, results)
    summary = {
        **settings,
        "pairs": [{"name": p.name, "tokens": len(p.clean_ids),
                   "clean_letter": tokenizer.token_str(p.clean_letter_id) if tokenizer else p.clean_letter_id,
                   "foil_letter": tokenizer.token_str(int(f)) if tokenizer else int(f),
                   "clean_logit_diff": float(c), "corrupted_logit_diff": float(d),
                   **({} if p.completion_start is None else {
                       "completion_start": p.completion_start,
                       "completion": tokenizer.decode(list(p.clean_ids[p.completion_start:])) if tokenizer else None,
                       "stated_letter": (tokenizer.token_str(p.stated_letter_id) if tokenizer else p.stated_letter_id)
                       if p.stated_letter_id is not None else None})}
                  for p, f, c, d in zip(patcher.pairs, patcher.foil_letter, patcher.clean_ld, patcher.corrupted_ld)],
        "clean_logit_diff_mean": float(patcher.clean_ld.mean()),
        "corrupted_logit_diff_mean": float(patcher.corrupted_ld.mean()),
        "positions": positions,
        "sweeps": {f"{r.direction}/{r.name}": summarize(r, positions) for r in results},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    write_html(out / "patching.html", patcher, results, summary, tokenizer, extra_html)
    return summary


def run_sweeps(args, patcher: Patcher, names, directions) -> list[SweepResult]:
    if args.method == "attribution":
        from aquainterp.attribution import attribution_sweeps

        return [r for d in directions for r in attribution_sweeps(patcher, names, d)]
    return [patcher.sweep(name, d) for d in directions for name in names]


def settings_of(args, pairs, skipped, no_marker, directions, names) -> dict:
    return {"task": args.task, "data": args.data, "decision": args.decision, "method": args.method,
            "corruption": args.corruption, "style": args.style, "n_pairs": len(pairs), "skipped": skipped,
            "no_marker": no_marker, "align": args.align, "seed": args.seed,
            "noise_scale": args.noise_scale if args.corruption == "noise" else None,
            "directions": list(directions), "sweeps": names}


def run_checkpoint_series(args, names) -> int:
    """--checkpoint-series: the same pairs on every selected step (aquainterp.patch_series)."""
    from safetensors.torch import save_file

    from aquainterp.logger import Logger
    from aquainterp.patch_series import run_series, series_section, stack

    directions = DIRECTIONS if args.direction == "both" else (args.direction,)

    def build(model, tokenizer):
        return build_pairs(args, tokenizer, problems(args), model)

    def patch_one(model, pairs):
        patcher = Patcher(model, pairs, batch_size=args.batch_size, align=args.align, noise_scale=args.noise_scale,
                          seed=args.seed, progress=False)
        return patcher, run_sweeps(args, patcher, names, directions)

    try:
        resolve_decision(args)
        with Logger(args.out, mode=args.wandb, run_name=f"patch-series-{args.out.name}",
                    config={"checkpoint_series": str(args.checkpoint_series), "every": args.every}) as logger:
            series = run_series(args, build, patch_one, logger)
    except (ValueError, FileNotFoundError) as e:
        return fail(str(e))
    if series["last"] is None:
        return fail(f"the newest step {series['newest']} has nothing to restore: {series['failed'][series['newest']]}")
    patcher, results = series["last"]
    tokenizer, steps = series["tokenizer"], series["steps"]
    stacked = stack(series)
    positions = patcher.position_labels(tokenizer)
    baselines = {step: (None, None) if p is None else (p.clean_ld.cpu(), p.corrupted_ld.cpu())
                 for step, p, _ in series["rows"]}
    nan = torch.full((len(series["pairs"]),), float("nan"))
    tensors = {"steps": torch.tensor(steps),
               "clean_logit_diff": torch.stack([baselines[s][0] if baselines[s][0] is not None else nan for s in steps]),
               "corrupted_logit_diff": torch.stack([baselines[s][1] if baselines[s][1] is not None else nan
                                                    for s in steps])}
    for key, t in stacked.items():
        tensors[f"{key}/normalized"], tensors[f"{key}/logit_diff"] = t["normalized"], t["logit_diff"]
    args.out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(args.out / "series.safetensors"),
              metadata={"axes": json.dumps({k: ["step", *t["axes"]] for k, t in stacked.items()})})
    settings = {"checkpoint_series": str(args.checkpoint_series), "step": series["newest"], "every": args.every,
                "model_config": series["model_config"],
                **settings_of(args, series["pairs"], series["skipped"], series["no_marker"], directions, names),
                "series": {"steps": steps, "failed": {str(k): v for k, v in series["failed"].items()},
                           "clean_logit_diff_mean": [float(tensors["clean_logit_diff"][i].mean()) for i in range(len(steps))],
                           "corrupted_logit_diff_mean": [float(tensors["corrupted_logit_diff"][i].mean())
                                                         for i in range(len(steps))]}}
    write_report(args.out, patcher, results, tokenizer, settings, series_section(stacked, steps, series["failed"], positions))
    print(f"{len(series['pairs'])} pairs on {len(steps)} steps {steps}"
          + (f"; nothing to restore at steps {sorted(series['failed'])}" if series["failed"] else ""))
    for key, t in stacked.items():
        drift = (t["normalized"][-1] - t["normalized"][0]).abs().nan_to_num(0.0).max().item()
        print(f"  {key:22s} largest change of a cell from step {steps[0]} to {steps[-1]}: {drift:.3f}")
    print(f"wrote {args.out}/series.safetensors, metrics.jsonl, summary.json, patching.html")
    return 0


def run(args: argparse.Namespace) -> int:
    names = [s.strip() for s in args.sweeps.split(",") if s.strip()]
    unknown = [s for s in names if s not in SWEEPS]
    if unknown or not names:
        return fail(f"--sweeps: unknown {unknown or 'empty list'}; choose from {','.join(SWEEPS)}")
    for flag in ("n_pairs", "batch_size"):
        if getattr(args, flag) < 1:
            return fail(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    try:
        torch.device(args.device)
    except RuntimeError as e:
        return fail(f"--device {args.device!r}: {e}")
    # where the results go is checked before any sweep runs: a folder (or a new path), never an input
    from aquainterp.rundir import check_can_create, check_output

    check_can_create(args.out, "--out")
    check_output(args.out, [args.checkpoint, args.hf_dir, args.checkpoint_series, args.tokenizer, args.data], "--out")
    if args.checkpoint_series is not None:
        return run_checkpoint_series(args, names)
    try:
        resolve_decision(args)
        model, tokenizer, described = load(args)
        pairs, skipped, no_marker, completions = build_pairs(args, tokenizer, problems(args), model)
        patcher = Patcher(model, pairs, batch_size=args.batch_size, align=args.align,
                          noise_scale=args.noise_scale, seed=args.seed)
    except (ValueError, FileNotFoundError) as e:
        return fail(str(e), 1 if isinstance(e, (LoadFailure, FileNotFoundError)) else 2)
    directions = DIRECTIONS if args.direction == "both" else (args.direction,)
    results = run_sweeps(args, patcher, names, directions)
    settings = {**described, **settings_of(args, pairs, skipped, no_marker, directions, names)}
    summary = write_report(args.out, patcher, results, tokenizer, settings)
    if no_marker:
        print(f"{len(no_marker)} problems skipped: their completion never wrote the answer marker "
              f"({', '.join(no_marker[:5])}{', ...' if len(no_marker) > 5 else ''})")
    print(f"{len(pairs)} pairs ({len(skipped) + len(no_marker)} skipped); clean logit diff {summary['clean_logit_diff_mean']:.3f}, "
          f"corrupted {summary['corrupted_logit_diff_mean']:.3f}")
    for key, s in summary["sweeps"].items():
        best = s["top_cells"][0]
        print(f"  {key:22s} range [{s['min']:+.3f}, {s['max']:+.3f}]  strongest {best}")
    print(f"wrote {args.out}/patching.safetensors, summary.json, patching.html")
    return 0
