"""Attribution patching: the first-order (gradient) estimate of every activation patch at once.

Activation patching writes one activation of the other run into the base run and reads the metric; a
sweep costs one (partial) forward per cell and pair. Attribution patching (Nanda 2023, "Attribution
Patching: Activation Patching At Industrial Scale"; Syed et al. 2023) replaces each patch by its linear
approximation around the base run:

    metric(base with a := a_other) ≈ metric(base) + (a_other - a_base) · ∂metric/∂a |_base

so one forward of the other run (its activations), one forward of the base run and one backward from
the metric give the estimate for every layer, position and head of every hook together. Here the
metric is each pair's letter logit difference at its decision position (aquainterp.patching.Patcher's),
so the result is the same SweepResult an exact sweep returns: per-pair estimated logit differences
[*cells, pairs] and their normalised pair mean (0 = corrupted run, 1 = clean run).

Denoising (the default) takes the gradient on the corrupted run and moves towards the clean
activations; noising takes it on the clean run. The estimate is exact when the metric is linear in the
patched activation (tests: a hand-built linear model) and drifts where the patch moves the run far
through non-linear parts: the final RMSNorm and soft-cap, attention patterns that shift when a
query/key changes, the ReLU² MLP, and most visibly early residual-stream patches at the positions where
clean and corrupted tokens differ (the whole model lies between the patch and the metric).
benchmarks/patching.py --method attribution prints its correlation with exact sweeps.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from aquainterp.patching import DIRECTIONS, SWEEPS, Patcher, SweepResult


def _runs(patcher: Patcher, templates: list[str], base: str, other: str, pair_index: torch.Tensor):
    """(other run's activations, base run's activations, gradients of the summed base letter
    difference w.r.t. them), each {hook name: tensor [rows, pos, ...]}, for pairs `pair_index`."""
    model, n_layers = patcher.model, patcher.n_layers
    names = [t.format(layer) for t in templates for layer in range(n_layers)]
    decision = patcher.decision_pos[pair_index]
    rows = torch.arange(len(pair_index), device=patcher.device)
    keep = lambda act, hook: act[rows, decision].unsqueeze(1)  # unembed the decision position only

    def run(which: str, grad: bool):
        store = {}

        def save(act, hook):
            store[hook.name] = act
        hooks = patcher.corruption_hooks(pair_index) if which == "corrupted" else []
        if grad:  # a fresh leaf at the embedding: gradients reach every hooked activation, not the weights
            hooks = hooks + [(patcher._embed_hook, lambda act, hook: act.detach().requires_grad_(True))]
        hooks = hooks + [(name, save) for name in names] + [("ln_final.hook_normalized", keep)]
        with torch.set_grad_enabled(grad):
            logits = model.run_with_hooks(patcher.tokens[which][pair_index], fwd_hooks=hooks)
        return store, logits[:, 0][:, patcher.head_ids].float()

    with torch.no_grad():
        other_acts, _ = run(other, grad=False)
    base_acts, letters = run(base, grad=True)
    diff = patcher._letter_diff(letters, pair_index)
    grads = torch.autograd.grad(diff.sum(), [base_acts[n] for n in names], allow_unused=True)
    grads = {n: (torch.zeros_like(base_acts[n]) if g is None else g) for n, g in zip(names, grads)}
    return other_acts, {n: a.detach() for n, a in base_acts.items()}, grads


def attribution_sweeps(patcher: Patcher, names=("resid_pre", "attn_out", "mlp_out", "z_pos"),
                       direction: str = "denoise") -> list[SweepResult]:
    """Attribution estimates for every cell of the sweeps `names` (keys of patching.SWEEPS) in one
    direction: one forward of the other run, one forward + backward of the base run per batch_size pairs.
    Cells outside a pair's prompt (padding) read the base value, as in Patcher.sweep."""
    if direction not in DIRECTIONS:
        raise ValueError(f"attribution: direction must be one of {DIRECTIONS}, got {direction!r}")
    unknown = [n for n in names if n not in SWEEPS]
    if unknown or not names:
        raise ValueError(f"attribution: unknown sweeps {unknown or 'none given'}; choose from {sorted(SWEEPS)}")
    base, other = ("corrupted", "clean") if direction == "denoise" else ("clean", "corrupted")
    templates = sorted({SWEEPS[n][0] for n in names})
    n_pairs, n_pos, n_layers = len(patcher.pairs), patcher.n_pos, patcher.n_layers
    chunks = [torch.arange(i, min(i + patcher.batch_size, n_pairs), device=patcher.device)
              for i in range(0, n_pairs, patcher.batch_size)]
    parts: dict[str, list[list[torch.Tensor]]] = {t: [[] for _ in range(n_layers)] for t in templates}
    for pair_index in tqdm(chunks, desc=f"attribution {direction}", disable=not patcher.progress):
        other_acts, base_acts, grads = _runs(patcher, templates, base, other, pair_index)
        for t in templates:
            for layer in range(n_layers):
                name = t.format(layer)
                delta = other_acts[name].float() - base_acts[name].float()
                parts[t][layer].append((delta * grads[name].float()).sum(-1))
    # effect[template][layer]: [pairs, pos] (per-position hooks) or [pairs, pos, heads] (hook_z)
    effect = {t: [torch.cat(p) for p in parts[t]] for t in templates}
    # each pair's absolute positions on the cell axis (align="end" counts back from the decision)
    cell = torch.arange(n_pos, device=patcher.device)
    offset = (n_pos - patcher.lengths) if patcher.align == "end" else torch.zeros_like(patcher.lengths)
    absolute = cell[None, :] - offset[:, None]  # [pairs, cells]
    inside = (absolute >= 0) & (absolute < patcher.lengths[:, None])
    gather = absolute.clamp(0, n_pos - 1)
    base_ld = (patcher.corrupted_ld if base == "corrupted" else patcher.clean_ld).float()
    results = []
    for name in names:
        template, axes = SWEEPS[name]
        per_layer = []
        for e in effect[template]:  # [pairs, pos] or [pairs, pos, heads]
            if axes == ("layer", "head"):  # one patch covers every position of the head
                per_layer.append(e.sum(1).T)  # [heads, pairs]
                continue
            at = torch.gather(e, 1, gather.view(*gather.shape, *[1] * (e.dim() - 2)).expand(-1, -1, *e.shape[2:]))
            at = at * inside.view(*inside.shape, *[1] * (e.dim() - 2))
            per_layer.append(at.permute(*range(1, e.dim()), 0))  # [cells, (heads,) pairs]
        ld = base_ld + torch.stack(per_layer)
        results.append(SweepResult(name, direction, axes, patcher.normalize(ld), ld))
    return results
