"""`aquainterp patch`: activation patching of a saved checkpoint, written as tensors, JSON and HTML.

    aquainterp patch --checkpoint runs/sft --task synthetic --n-pairs 16 --corruption permute --out runs/patch

Loads the model (our checkpoint, or an HF NanoChat directory through the bridge), builds clean/corrupted
pairs from the task, runs the sweeps (aquainterp.patching.patcher) and writes into --out:
- patching.safetensors: per sweep `{direction}/{sweep}/normalized` [*cells] and `.../logit_diff`
  [*cells, pairs], plus the baselines and token ids;
- summary.json: the run's settings, the pairs, baselines and each sweep's axes, range and top cells;
- patching.html: the report (aquainterp.patching.report): summary, cropped heatmaps with the decision column,
  per-pair drill-down, raw JSON last (plotly.js inlined, works offline).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from aquainterp.cli.args import SEED, count_int, data_source, device_name, existing_path, number, positive_int
from aquainterp.cli.rundir import output_path
from aquainterp.cli.settings import add_arguments as add_setting_flags
from aquainterp.cli.settings import check_settings, setting
from aquainterp.patching.pairs import CORRUPTIONS
from aquainterp.patching.patcher import (
    ALIGNMENTS,
    DIRECTIONS,
    MIN_GAP,
    SWEEPS,
    Patcher,
    SweepResult,
    screen_pairs,
)
from aquainterp.tasks.chat import STYLES

TASKS = ("synthetic", "aqua")
DECISIONS = ("completion", "prompt")
METHODS = ("exact", "attribution")


@dataclass
class PatchConfig:
    """Every setting of one `aquainterp patch` run, each declared once: `run(PatchConfig(...))` is the library
    entry (the demo calls it), and the command's flags, ranges and help are generated from these fields
    (aquainterp.cli.settings). Exactly one of checkpoint, hf_dir and checkpoint_series; out is required."""

    checkpoint: Path | None = setting(None, "checkpoint folder written by aquainterp.checkpoints.native",
                                      type=existing_path("dir"), group="source")
    hf_dir: Path | None = setting(None, "HF NanoChatForCausalLM directory (imported via the bridge)",
                                  type=existing_path("dir"), group="source")
    checkpoint_series: Path | None = setting(
        None, "patch the same pairs on every --every-th saved step of a run (pairs built on the newest selected "
        "step): a step x cell view in the report, series.safetensors and metrics.jsonl for the 'Circuit drift' "
        "dashboard template", type=existing_path("dir"), group="source", metavar="RUN_DIR/checkpoints")
    every: int = setting(1, "--checkpoint-series: steps whose number is a multiple of K, plus the newest (default: all)",
                         type=positive_int(1 << 30))
    wandb: str = setting("disabled", "--checkpoint-series: also log the per-step metrics to W&B (always to "
                         "--out/metrics.jsonl)", choices=("disabled", "offline", "online"))
    step: int | None = setting(None, "checkpoint step (default: the latest)", type=count_int())
    tokenizer: Path | None = setting(None, "tokenizer folder, when the checkpoint or HF dir carries none",
                                     type=existing_path("dir"))
    task: str = setting("synthetic", "problems to pair up", choices=TASKS)
    data: str | None = setting(None, "AQuA JSON Lines file or hub id (task aqua; default deepmind/aqua_rat)",
                               type=data_source)
    split: str | None = setting(None, "synthetic: train|eval (default eval); aqua hub split")
    difficulty: int | None = setting(None, "synthetic problems of one difficulty (default: the task's mix), e.g. "
                                     "the demo's 1", type=int, choices=(1, 2, 3))
    n_pairs: int = setting(8, "clean/corrupted pairs to patch", type=positive_int(100_000))
    batch_size: int = setting(32, "patched sequences per forward", type=positive_int(1 << 20))
    device: str = setting("cpu", "torch device (cpu, cuda, cuda:1, mps)", type=device_name)
    decision: str = setting(
        "completion", "completion (default): the problem + the model's own greedy completion, teacher-forced and "
        "cut right after its answer marker ('Answer:'), where a reasoning model picks its letter; the corrupted "
        "run has the corrupted problem and the SAME completion; problems whose completion writes no marker are "
        "skipped and counted. prompt: a fixed prompt cut at 'Answer:' (see --style), for models trained to "
        "answer in one token", choices=DECISIONS)
    max_new_tokens: int = setting(128, "--decision completion: longest greedy completion, in tokens",
                                  type=positive_int(4096))
    corruption: str | None = setting(
        None, "permute: the gold option swaps places with another; numbers: one question number changes so "
        "another option is right (--decision prompt, style direct); noise: Gaussian noise on the problem's token "
        "embeddings (--decision completion: question and options). Default: noise for --decision completion (a "
        "model that checks the options in its completion follows its own checks, so permuting the prompt's "
        "options hardly moves it), permute for --decision prompt", choices=CORRUPTIONS)
    style: str | None = setting(None, "--decision prompt only: decision right after the question (direct, "
                                "default), after the worked rationale (reasoning) or after the rationale and the "
                                "option checks (checked; corruption noise)", choices=STYLES)
    direction: str = setting("denoise", "denoise: clean activation into the corrupted run (what restores the "
                             "answer); noise: corrupted activation into the clean run (what breaks it); both",
                             choices=(*DIRECTIONS, "both"))
    sweeps: str = setting(",".join(SWEEPS), f"comma list from {','.join(SWEEPS)}")
    method: str = setting("exact", "exact: one patched forward per cell and pair (batched); attribution: the "
                          "gradient estimate of every cell at once (one clean forward, one corrupted forward + "
                          "backward; exact only where the metric is linear in the activation, see docs/patching.md)",
                          choices=METHODS)
    align: str = setting("end", "position axis counts from the prompt start, or back from the decision token",
                         choices=ALIGNMENTS)
    noise_scale: float = setting(3.0, "noise std in embedding stds", type=number(float, 0.0, 1e3, lo_open=True))
    seed: int = setting(0, "problems, corruption order and noise", type=SEED)
    skip_unalignable: bool = setting(False, "drop problems with no same-length corruption instead of stopping")
    min_gap: float = setting(MIN_GAP, "pairs whose clean - corrupted letter logit difference is below this many "
                             "logits, and pairs the model gets wrong on the clean prompt (clean < 0), are left out "
                             "of the sweeps and the headline, counted and listed (see --keep-all-pairs)",
                             type=number(float, 0.0, 1e6))
    keep_all_pairs: bool = setting(False, "patch every pair, also those --min-gap leaves out (they are still listed "
                                   "and a tiny mean gap is flagged)")
    out: Path | None = setting(None, "new or empty folder for patching.safetensors, summary.json and patching.html",
                               type=output_path("dir", Path), required=True)
    overwrite: bool = setting(False, "write into --out even where it holds files patch did not write")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_setting_flags(parser, PatchConfig)


class LoadFailure(ValueError):
    """The checkpoint, HF directory or tokenizer could not be loaded: a runtime failure (exit 1)."""


def fail(message: str, code: int = 2) -> int:
    """One line on stderr; 2 for a usage error, 1 for a runtime failure (a file that cannot be loaded)."""
    print(f"aquainterp patch: error: {message}", file=sys.stderr)
    return code


def load(config):
    """(model, tokenizer, description) from --checkpoint or --hf-dir; ValueError with a plain message."""
    if config.checkpoint is not None:
        from aquainterp.checkpoints.load import load_model

        where = f"checkpoint {config.checkpoint}"
        try:
            model, tokenizer, meta = load_model(config.checkpoint, config.step, device=config.device)
        except Exception as e:  # the CLI boundary: a bad checkpoint is a message, not a traceback
            raise LoadFailure(f"cannot load {where}: {e}") from e
        described = {"checkpoint": str(config.checkpoint), "step": meta.get("step", config.step)}
    else:
        from aquainterp.checkpoints.huggingface import import_hf

        where = f"HF directory {config.hf_dir}"
        try:
            model = import_hf(config.hf_dir).to(config.device)
        except Exception as e:
            raise LoadFailure(f"cannot load {where}: {e}") from e
        tokenizer = None
        if (config.hf_dir / "tokenizer.json").is_file() and config.tokenizer is None:
            config.tokenizer = config.hf_dir
        described = {"hf_dir": str(config.hf_dir)}
    if config.tokenizer is not None:
        from aquainterp.tokenizer import Tokenizer

        try:
            tokenizer = Tokenizer.load(config.tokenizer)
        except Exception as e:
            raise LoadFailure(f"cannot load tokenizer {config.tokenizer}: {e}") from e
    if tokenizer is None:
        raise ValueError(f"{where} carries no tokenizer; pass --tokenizer DIR")
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} tokens but the model's vocabulary is "
                         f"{model.config.vocab_size}: they do not belong together")
    described["model_config"] = model.config.to_dict()
    return model.eval(), tokenizer, described


def problems(config):
    """A stream of problems for the task (more than --n-pairs, since some may not pair up)."""
    if config.task == "synthetic":
        from aquainterp.tasks.synthetic import SyntheticTask

        task = SyntheticTask(seed=config.seed, split=config.split or "eval", difficulty=config.difficulty)
        return task.problems(config.n_pairs * 4)
    from aquainterp.tasks.aqua import load_aqua

    source = config.data or "deepmind/aqua_rat"
    return load_aqua(source, split=config.split or "validation")


def resolve_decision(config) -> None:
    """Fill --corruption/--style defaults for the chosen --decision; ValueError for combinations that
    cannot work."""
    if config.decision == "completion":
        if config.style is not None:
            raise ValueError("--style sets where a fixed prompt is cut (--decision prompt); --decision completion "
                             "cuts the model's own completion at its answer marker")
        config.corruption = config.corruption or "noise"
        if config.corruption == "numbers":
            raise ValueError("--corruption numbers changes the question, so the model's own completion would no "
                             "longer fit it; use noise or permute with --decision completion")
    else:
        config.style = config.style or "direct"
        config.corruption = config.corruption or "permute"


def build_pairs(config, tokenizer, pool, model=None):
    """(pairs, skipped sources, no-marker sources, completions by source) for --decision."""
    from functools import partial

    from aquainterp.patching.completion_pairs import completion_pairs, greedy_completions
    from aquainterp.patching.pairs import make_pairs

    pairs, skipped, no_marker, completions = [], [], [], {}
    for start in range(0, len(pool), config.n_pairs):
        chunk = pool[start: start + config.n_pairs]
        if config.decision == "completion":
            generate = partial(greedy_completions, model, tokenizer, max_new_tokens=config.max_new_tokens,
                               batch_size=config.batch_size, progress=True)
            got = completion_pairs(tokenizer, chunk, config.corruption, generate, seed=config.seed + start,
                                   skip_unalignable=config.skip_unalignable)
            pairs += got.pairs
            skipped += got.unalignable
            no_marker += got.no_marker
            completions.update(got.completions)
        else:
            got, dropped = make_pairs(tokenizer, chunk, config.corruption, seed=config.seed + start,
                                      skip_unalignable=config.skip_unalignable, style=config.style)
            pairs += got
            skipped += dropped
        if len(pairs) >= config.n_pairs:
            break
    if not pairs:
        why = (f"; {len(no_marker)} of the model's completions never wrote the answer marker"
               if no_marker else "")
        raise ValueError(f"no {config.corruption} pairs could be built from {len(pool)} {config.task} problems{why}")
    return pairs[: config.n_pairs], skipped, no_marker, completions


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


OWNER = "aquainterp patch"


def write_report(out: Path, patcher: Patcher, results: list[SweepResult], tokenizer, settings: dict,
                 extra_html: str = "") -> dict:
    """Tensors, summary.json and patching.html under `out`; returns the summary."""
    from aquainterp.patching.report import write_html

    out = Path(out)
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
    from aquainterp.cli.rundir import record_written

    record_written([out], OWNER)  # a later run may replace these files, and only these (aquainterp.cli.rundir)
    return summary


def screen(config, pairs, patcher: Patcher) -> tuple[Patcher, dict]:
    """Leave out of the sweeps the pairs screen_pairs names (unless --keep-all-pairs): the Patcher of the
    kept pairs, and what the report and summary.json say about it (every pair's baselines, who was left out
    and why, warnings). ValueError when no pair is left."""
    excluded = screen_pairs(patcher.clean_ld, patcher.corrupted_ld, config.min_gap)
    listed = [{"name": pairs[i].name, "clean_logit_diff": float(patcher.clean_ld[i]),
               "corrupted_logit_diff": float(patcher.corrupted_ld[i]), "reason": why} for i, why in excluded]
    info = {"min_gap": config.min_gap, "kept_all": config.keep_all_pairs, "of": len(pairs),
            "excluded": listed, "warnings": []}
    if excluded and not config.keep_all_pairs:
        gone = {i for i, _ in excluded}
        kept = [p for i, p in enumerate(pairs) if i not in gone]
        if not kept:
            raise ValueError(f"all {len(pairs)} pairs are left out of the headline ("
                             + "; ".join(f"{e['name']}: {e['reason']}" for e in listed[:3])
                             + ("; ..." if len(listed) > 3 else "") + "); lower --min-gap or pass --keep-all-pairs "
                             "to patch them anyway")
        patcher = patcher.subset([i for i in range(len(pairs)) if i not in gone])  # the same noise per pair
    info["used"] = len(patcher.pairs)
    if excluded and not config.keep_all_pairs and 2 * info["used"] < len(pairs):
        info["warnings"].append(f"only {info['used']} of {len(pairs)} pairs remain after leaving out "
                                f"{len(excluded)}: the headline rests on few pairs")
    if excluded and config.keep_all_pairs:
        info["warnings"].append(f"--keep-all-pairs: {len(excluded)} of {len(pairs)} pairs in the headline would "
                                "have been left out (listed below)")
    if abs(patcher.scale) < config.min_gap:
        info["warnings"].append(f"the mean clean - corrupted gap is {patcher.scale:+.3f} logits (< {config.min_gap:g}):"
                                " normalised values divide by it and are not reliable")
    info["scale"] = patcher.scale
    info["reliable"] = abs(patcher.scale) >= config.min_gap  # normalised values divide by this gap
    return patcher, info


def run_sweeps(config, patcher: Patcher, names, directions) -> list[SweepResult]:
    if config.method == "attribution":
        from aquainterp.patching.attribution import attribution_sweeps

        return [r for d in directions for r in attribution_sweeps(patcher, names, d)]
    return [patcher.sweep(name, d) for d in directions for name in names]


def settings_of(config, pairs, skipped, no_marker, directions, names) -> dict:
    return {"task": config.task, "data": config.data, "decision": config.decision, "method": config.method,
            "corruption": config.corruption, "style": config.style, "n_pairs": len(pairs), "skipped": skipped,
            "no_marker": no_marker, "align": config.align, "seed": config.seed,
            "noise_scale": config.noise_scale if config.corruption == "noise" else None,
            "directions": list(directions), "sweeps": names}


def run_checkpoint_series(config, names) -> int:
    """--checkpoint-series: the same pairs on every selected step (aquainterp.patching.series)."""
    from safetensors.torch import save_file

    from aquainterp.logger import Logger
    from aquainterp.patching.series import run_series, series_section, stack

    directions = DIRECTIONS if config.direction == "both" else (config.direction,)

    def build(model, tokenizer):
        return build_pairs(config, tokenizer, problems(config), model)

    def patch_one(model, pairs):
        patcher = Patcher(model, pairs, batch_size=config.batch_size, align=config.align, noise_scale=config.noise_scale,
                          seed=config.seed, progress=False)
        return patcher, run_sweeps(config, patcher, names, directions)

    try:
        resolve_decision(config)
        with Logger(config.out, mode=config.wandb, run_name=f"patch-series-{config.out.name}",
                    config={"checkpoint_series": str(config.checkpoint_series), "every": config.every}) as logger:
            series = run_series(config, build, patch_one, logger)
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
    config.out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(config.out / "series.safetensors"),
              metadata={"axes": json.dumps({k: ["step", *t["axes"]] for k, t in stacked.items()})})
    settings = {"checkpoint_series": str(config.checkpoint_series), "step": series["newest"], "every": config.every,
                "model_config": series["model_config"],
                **settings_of(config, series["pairs"], series["skipped"], series["no_marker"], directions, names),
                "series": {"steps": steps, "failed": {str(k): v for k, v in series["failed"].items()},
                           "clean_logit_diff_mean": [float(tensors["clean_logit_diff"][i].mean()) for i in range(len(steps))],
                           "corrupted_logit_diff_mean": [float(tensors["corrupted_logit_diff"][i].mean())
                                                         for i in range(len(steps))]}}
    write_report(config.out, patcher, results, tokenizer, settings, series_section(stacked, steps, series["failed"], positions))
    print(f"{len(series['pairs'])} pairs on {len(steps)} steps {steps}"
          + (f"; nothing to restore at steps {sorted(series['failed'])}" if series["failed"] else ""))
    for key, t in stacked.items():
        drift = (t["normalized"][-1] - t["normalized"][0]).abs().nan_to_num(0.0).max().item()
        print(f"  {key:22s} largest change of a cell from step {steps[0]} to {steps[-1]}: {drift:.3f}")
    print(f"wrote {config.out}/series.safetensors, metrics.jsonl, summary.json, patching.html")
    return 0


PATHS = ("checkpoint", "hf_dir", "checkpoint_series", "tokenizer", "out")


def run(config: PatchConfig | argparse.Namespace) -> int:
    """Patch, write the outputs under config.out and print a summary; 0, or after one line on stderr 2 (usage)
    or 1 (a file that cannot be loaded). `aquainterp patch` passes its parsed flags (the same fields); the
    caller's config is never modified."""
    values = vars(config) if isinstance(config, argparse.Namespace) else dataclasses.asdict(config)
    config = PatchConfig(**{k: Path(v) if k in PATHS and v is not None else v for k, v in values.items()})
    try:
        check_settings(config, "aquainterp patch")
    except ValueError as e:
        return fail(str(e).removeprefix("aquainterp patch: "))
    names = [s.strip() for s in config.sweeps.split(",") if s.strip()]
    unknown = [s for s in names if s not in SWEEPS]
    if unknown or not names:
        return fail(f"--sweeps: unknown {unknown or 'empty list'}; choose from {','.join(SWEEPS)}")
    try:
        torch.device(config.device)
    except RuntimeError as e:
        return fail(f"--device {config.device!r}: {e}")
    # where the results go is checked before any sweep runs: a folder (or a new path), never an input
    from aquainterp.cli.rundir import claim_output

    data = config.data if config.data and Path(config.data).exists() else None
    claim_output(config.out, "--out", owner=OWNER, kind="dir", overwrite=config.overwrite,
                 inputs=[config.checkpoint, config.hf_dir, config.checkpoint_series, config.tokenizer, data])
    if config.checkpoint_series is not None:
        return run_checkpoint_series(config, names)
    try:
        resolve_decision(config)
        model, tokenizer, described = load(config)
        pairs, skipped, no_marker, completions = build_pairs(config, tokenizer, problems(config), model)
        patcher = Patcher(model, pairs, batch_size=config.batch_size, align=config.align,
                          noise_scale=config.noise_scale, seed=config.seed)
        patcher, screened = screen(config, pairs, patcher)
    except (ValueError, FileNotFoundError) as e:
        return fail(str(e), 1 if isinstance(e, (LoadFailure, FileNotFoundError)) else 2)
    directions = DIRECTIONS if config.direction == "both" else (config.direction,)
    results = run_sweeps(config, patcher, names, directions)
    settings = {**described, **settings_of(config, patcher.pairs, skipped, no_marker, directions, names),
                "screen": screened}
    summary = write_report(config.out, patcher, results, tokenizer, settings)
    if no_marker:
        print(f"{len(no_marker)} problems skipped: their completion never wrote the answer marker "
              f"({', '.join(no_marker[:5])}{', ...' if len(no_marker) > 5 else ''})")
    for e in screened["excluded"]:
        print(f"{'kept (--keep-all-pairs)' if config.keep_all_pairs else 'left out of the headline'}: {e['name']}: "
              f"{e['reason']}")
    for warning in screened["warnings"]:
        print(f"warning: {warning}")
    print(f"{len(patcher.pairs)} of {len(pairs)} pairs in the headline ({len(skipped) + len(no_marker)} problems "
          f"skipped); clean logit diff {summary['clean_logit_diff_mean']:.3f}, "
          f"corrupted {summary['corrupted_logit_diff_mean']:.3f}")
    for key, s in summary["sweeps"].items():
        best = s["top_cells"][0]
        print(f"  {key:22s} range [{s['min']:+.3f}, {s['max']:+.3f}]  strongest {best}")
    print(f"wrote {config.out}/patching.safetensors, summary.json, patching.html")
    return 0
