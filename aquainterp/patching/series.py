"""Circuits across training: the same patching pairs on every K-th saved checkpoint of a run.

    aquainterp patch --checkpoint-series runs/demo/rl/checkpoints --every 10 --sweeps z,attn_out --out runs/drift

The pairs are built once, on the newest selected checkpoint (for the completion decision: from ITS
greedy completions), and every selected step patches exactly those token sequences, so a cell means the
same thing in every row. Each step gives one row of a step × cell view per sweep ("which heads carry the
answer, and how training changes them"):
- series.safetensors: `{direction}/{sweep}/normalized` [steps, *cells], `.../logit_diff` [steps, *cells,
  pairs], `steps`, `clean_logit_diff` / `corrupted_logit_diff` [steps, pairs];
- metrics.jsonl (and W&B with --wandb): per step `patch/step`, `patch/clean_logit_diff`,
  `patch/corrupted_logit_diff`, `patch/{direction}/z/layer{l}/head{h}` for the head sweep and
  `patch/{direction}/{sweep}/decision/layer{l}` (the decision column, --align end) for the layer x
  position sweeps, which the
  "Circuit drift" dashboard template (dashboards/templates/circuit_drift.json) draws;
- the report (patching.html) of the newest step with a "Across checkpoints" section of step × cell heatmaps.

A step whose clean and corrupted runs give the same letter logit difference (nothing to restore, e.g. an
untrained model) gets a row of NaN and is named in the summary, never dropped silently.
"""

from __future__ import annotations

import html
import math

import torch
from tqdm.auto import tqdm

from aquainterp.patching.patcher import Patcher, SweepResult

MAX_SERIES_CELLS = 48  # a step x cell heatmap shows at most this many cells


def select_steps(directory, every: int) -> list[int]:
    """Saved steps whose number is a multiple of `every`, plus the newest; ValueError if there are none."""
    from aquainterp.checkpoints.native import available_steps

    if every < 1:
        raise ValueError(f"--every must be at least 1, got {every}")
    steps = available_steps(directory)
    if not steps:
        raise ValueError(f"--checkpoint-series {directory}: no saved checkpoints (step_XXXXXX folders with meta.json)")
    return sorted({s for s in steps if s % every == 0} | {steps[-1]})


def step_metrics(patcher: Patcher | None, results: list[SweepResult] | None, step: int, n_layers: int) -> dict:
    """The scalars one step logs (NaN-free: a step with no gap logs only its baselines)."""
    out = {"patch/step": step}
    if patcher is None:
        return out
    out["patch/clean_logit_diff"] = float(patcher.clean_ld.mean())
    out["patch/corrupted_logit_diff"] = float(patcher.corrupted_ld.mean())
    for r in results:
        v = r.normalized.detach().float().cpu()
        if r.axes == ("layer", "head"):
            for layer in range(v.shape[0]):
                for head in range(v.shape[1]):
                    out[f"patch/{r.direction}/{r.name}/layer{layer}/head{head}"] = float(v[layer, head])
        elif r.axes == ("layer", "pos") and patcher.align == "end":  # the decision column is the last
            for layer in range(n_layers):
                out[f"patch/{r.direction}/{r.name}/decision/layer{layer}"] = float(v[layer, -1])
    return out


def run_series(args, build_pairs, patch_one, logger=None) -> dict:
    """Patch the pairs on every selected step. `build_pairs(model, tokenizer)` -> (pairs, skipped, no_marker,
    completions) on the newest step; `patch_one(model, pairs)` -> (Patcher, results), or raises ValueError
    when the step has nothing to restore. Returns a dict with everything the outputs need."""
    from aquainterp.checkpoints.load import load_model

    steps = select_steps(args.checkpoint_series, args.every)
    newest = steps[-1]
    try:
        model, tokenizer, meta = load_model(args.checkpoint_series, newest, device=args.device)
    except Exception as e:
        raise ValueError(f"cannot load checkpoint {args.checkpoint_series} step {newest}: {e}") from e
    if args.tokenizer is not None:
        from aquainterp.tokenizer import Tokenizer

        tokenizer = Tokenizer.load(args.tokenizer)
    if tokenizer is None:
        raise ValueError(f"--checkpoint-series {args.checkpoint_series} step {newest} carries no tokenizer; "
                         "pass --tokenizer DIR")
    newest_model = model.eval()
    pairs, skipped, no_marker, completions = build_pairs(newest_model, tokenizer)
    rows, failed, last = [], {}, None
    for step in tqdm(steps, desc="checkpoints"):
        if step == newest:
            model = newest_model
        else:
            try:
                model, _, _ = load_model(args.checkpoint_series, step, device=args.device)
            except Exception as e:
                raise ValueError(f"cannot load checkpoint {args.checkpoint_series} step {step}: {e}") from e
        try:
            patcher, results = patch_one(model.eval(), pairs)
        except ValueError as e:  # nothing to restore at this step: a NaN row, named
            failed[step] = str(e)
            rows.append((step, None, None))
            if logger is not None:
                logger.log(step_metrics(None, None, step, model.config.n_layer), step=step)
            continue
        rows.append((step, patcher, results))
        if logger is not None:
            logger.log(step_metrics(patcher, results, step, model.config.n_layer), step=step)
        if step == newest:
            last = (patcher, results)
    return {"steps": steps, "rows": rows, "failed": failed, "newest": newest, "last": last, "pairs": pairs,
            "skipped": skipped, "no_marker": no_marker, "tokenizer": tokenizer, "meta": meta,
            "model_config": model.config.to_dict()}


def stack(series: dict) -> dict[str, dict[str, torch.Tensor]]:
    """{"{direction}/{sweep}": {"normalized": [steps, *cells], "logit_diff": [steps, *cells, pairs]}}, NaN
    rows for steps with nothing to restore."""
    template = next(results for _, p, results in series["rows"] if p is not None)
    out = {}
    for k, r in enumerate(template):
        norm, ld = [], []
        for _, patcher, results in series["rows"]:
            if patcher is None:
                norm.append(torch.full_like(r.normalized.cpu(), math.nan))
                ld.append(torch.full_like(r.logit_diff.cpu(), math.nan))
            else:
                norm.append(results[k].normalized.detach().cpu())
                ld.append(results[k].logit_diff.detach().cpu())
        out[f"{r.direction}/{r.name}"] = {"normalized": torch.stack(norm), "logit_diff": torch.stack(ld),
                                          "axes": r.axes}
    return out


def cell_labels(axes, shape, positions: list[str]) -> list[str]:
    """One label per flattened cell: L1H3 @ 0: Answer."""
    labels = []
    for index in torch.cartesian_prod(*[torch.arange(s) for s in shape]).reshape(-1, len(shape)).tolist():
        cell = dict(zip(axes, index))
        text = f"L{cell['layer']}" + (f"H{cell['head']}" if "head" in cell else "")
        labels.append(text + (f" @ {positions[cell['pos']]}" if "pos" in cell else ""))
    return labels


def series_section(stacked: dict, steps: list[int], failed: dict, positions: list[str]) -> str:
    """The report section: per sweep a step × cell heatmap of the cells that matter at some step."""
    import plotly.graph_objects as go

    from aquainterp.patching.report import PLOT_CONFIG

    parts = ["<h2>Across checkpoints</h2><p class='note'>The same pairs patched at every selected step (rows); "
             "columns: the cells whose restored fraction reaches 10% of the sweep's strongest at some step "
             f"(at most {MAX_SERIES_CELLS}).</p>"]
    if failed:
        parts.append("<p class='note'>Steps with nothing to restore (empty rows): "
                     + html.escape("; ".join(f"{s}: {why}" for s, why in failed.items())) + "</p>")
    for key, t in stacked.items():
        v = t["normalized"]
        flat = v.reshape(len(steps), -1)
        labels = cell_labels(t["axes"], v.shape[1:], positions)
        baseline = 0.0 if key.startswith("denoise/") else 1.0
        strength = (flat - baseline).abs().nan_to_num(0.0).amax(0)
        top = float(strength.max()) if strength.numel() else 0.0
        keep = [int(i) for i in strength.argsort(descending=True)[:MAX_SERIES_CELLS] if strength[i] >= 0.1 * top and top > 0]
        keep = sorted(keep) or [int(strength.argmax())]
        z = flat[:, keep]
        fig = go.Figure(go.Heatmap(z=[[None if math.isnan(x) else x for x in row] for row in z.tolist()],
                                   x=[labels[i] for i in keep], y=[str(s) for s in steps], colorscale="RdBu_r",
                                   zmid=0.0, xgap=1, ygap=1, colorbar={"title": "restored", "thickness": 12},
                                   hovertemplate="step %{y} · %{x}<br>%{z:.3f}<extra></extra>"))
        fig.update_layout(margin={"l": 60, "r": 20, "t": 20, "b": 120},
                          yaxis={"type": "category", "title": "step", "autorange": "reversed"},
                          xaxis={"type": "category", "tickangle": -60, "automargin": True},
                          height=max(260, 160 + 24 * len(steps)), width=min(1300, max(420, 160 + 22 * len(keep))))
        parts.append(f"<div class='aq-panel series' data-sweep='{html.escape(key)}'><b>{html.escape(key)}</b> "
                     f"<span class='note'>(step × cell, {len(keep)} of {flat.shape[1]} cells)</span>"
                     + fig.to_html(full_html=False, include_plotlyjs=False, config=PLOT_CONFIG) + "</div>")
    return "".join(parts)


class TrainingPatcher:
    """Patching inside a training loop (training.rl --patch-every): the same pairs at every call, built on
    the first call where some completion writes "Answer:", from the model's own greedy completions (completion decision, noise on question and
    options); each call returns the step's `patch/*` metrics (step_metrics) for the logger.

    `generate(model, prompts)` makes the completions (default: greedy_completions); a call whose pairs
    cannot be built (no completion wrote "Answer:") or whose clean and corrupted runs agree logs only
    `patch/step`, `patch/pairs` and `patch/no_marker_frac`. The model's train/eval mode is restored."""

    def __init__(self, tokenizer, problems, sweeps=("z", "attn_out"), max_new_tokens: int = 128,
                 batch_size: int = 64, seed: int = 0, generate=None):
        self.tokenizer, self.problems, self.sweeps = tokenizer, list(problems), tuple(sweeps)
        self.max_new_tokens, self.batch_size, self.seed = max_new_tokens, batch_size, seed
        self.generate, self.pairs, self.no_marker_frac = generate, None, 0.0

    def __call__(self, model, step: int) -> dict:
        from aquainterp.patching.completion_pairs import completion_pairs, greedy_completions

        was_training = model.training
        model.eval()
        try:
            if self.pairs is None:
                generate = self.generate or (lambda m, prompts: greedy_completions(
                    m, self.tokenizer, prompts, self.max_new_tokens, batch_size=self.batch_size))
                got = completion_pairs(self.tokenizer, self.problems, "noise", lambda p: generate(model, p),
                                       seed=self.seed)
                self.no_marker_frac = len(got.no_marker) / max(len(self.problems), 1)
                if not got.pairs:  # no completion wrote "Answer:" yet: try again next time
                    return {"patch/step": step, "patch/pairs": 0, "patch/no_marker_frac": self.no_marker_frac}
                self.pairs = got.pairs
            out = {"patch/step": step, "patch/pairs": len(self.pairs), "patch/no_marker_frac": self.no_marker_frac}
            try:
                patcher = Patcher(model, self.pairs, batch_size=self.batch_size, align="end", seed=self.seed,
                                  progress=False)
            except ValueError:  # nothing to restore at this step
                return out
            results = [patcher.sweep(name) for name in self.sweeps]
            return {**out, **step_metrics(patcher, results, step, model.cfg.n_layers)}
        finally:
            model.train(was_training)
