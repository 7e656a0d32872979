"""Attribution patching: the first-order (gradient) estimate of every activation patch at once.

Activation patching writes one activation of the other run into the base run and reads the metric; a
sweep costs one (partial) forward per cell and pair. Attribution patching (Nanda 2023, "Attribution
Patching: Activation Patching At Industrial Scale"; Syed et al. 2023) replaces each patch by its linear
approximation around the base run:

    metric(base with a := a_other) ≈ metric(base) + (a_other - a_base) · ∂metric/∂a |_base

so one forward of the other run (its activations), one forward of the base run and one backward from
the metric give the estimate for every layer, position and head of every hook together. Here the
metric is each pair's letter logit difference at its decision position (aquainterp.patching.patcher.Patcher's),
so the result is the same SweepResult an exact sweep returns: per-pair estimated logit differences
[*cells, pairs] and their normalised pair mean (0 = corrupted run, 1 = clean run).

Denoising (the default) takes the gradient on the corrupted run and moves towards the clean
activations; noising takes it on the clean run. The estimate is exact when the metric is linear in the
patched activation (tests: a hand-built linear model) and drifts where the patch moves the run far
through non-linear parts: the final RMSNorm and soft-cap, attention patterns that shift when a
query/key changes, the ReLU² MLP, and most visibly early residual-stream patches at the positions where
clean and corrupted tokens differ (the whole model lies between the patch and the metric).
benchmarks/patching.py --method attribution prints its correlation with exact sweeps.

Cost on our GPT (2025-10): the positions before the pairs' first difference run once, without gradients,
into a key/value cache that both runs continue from (their estimates are exactly 0: nothing differs
there); the two runs skip the 65k-row unembedding and the base run unembeds its decision position with the
letter rows only. Other models (a 2026-07 GPT, TransformerLens models) run both prompts from the first
token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from aquainterp.model.gpt import GPT, norm
from aquainterp.model.kv_cache import SharedPrompt
from aquainterp.patching.patcher import DIRECTIONS, SWEEPS, Patcher, SweepResult


def _first_change(patcher: Patcher, pair_index: torch.Tensor) -> int:
    """The first position at which any of these pairs' clean and corrupted runs differ (a token, or the
    noise span), capped at the earliest decision position. Before it both runs compute the same
    activations bit for bit (causal attention), so every estimate there is exactly 0."""
    first = []
    for i in pair_index.tolist():
        pair = patcher.pairs[i]
        differs = [j for j, (a, b) in enumerate(zip(pair.clean_ids, pair.corrupted_ids)) if a != b]
        candidates = [len(pair.clean_ids) - 1, *differs[:1]]
        if pair.noise_span is not None and patcher.noise is not None:
            candidates.append(pair.noise_span[0])
        first.append(min(candidates))
    return min(first)


def _runs(patcher: Patcher, templates: list[str], base: str, other: str, pair_index: torch.Tensor):
    """(first position run, other run's activations, base run's activations, gradients of the summed base
    letter difference w.r.t. them), each {hook name: tensor [rows, pos - first, ...]}, for pairs
    `pair_index`.

    On our GPT (with Patcher.reuse_prefix, i.e. not 2026-07) the positions before the pairs' first
    difference run once, without gradients, into a key/value cache both runs continue from (SharedPrompt):
    their activations are the same in both runs, so their estimates are 0 and need neither a second forward
    nor a backward. On our GPT the forwards skip the unembedding (return_type=None) and the base run's
    letter logits are its decision position's final norm through GPT.logits_from_resid with the letter rows
    only (forward's unembedding and soft-cap, without the other 65k rows)."""
    model, n_layers = patcher.model, patcher.n_layers
    names = [t.format(layer) for t in templates for layer in range(n_layers)]
    gpt = isinstance(model, GPT)
    start = _first_change(patcher, pair_index) if patcher.reuse_prefix else 0
    # The last block at the decision position only (GPT.forward_from with `at`): its head outputs, attention
    # and MLP outputs elsewhere never reach the metric (their gradient is exactly 0), so neither run computes
    # them; its hooks there are read from its c_proj and MLP (_DecisionOnly).
    last = n_layers - 1
    at_decision = patcher.reuse_prefix and set(templates) <= {*_LAST_AT_DECISION, "blocks.{}.hook_resid_pre"}
    tl_names = [n for n in names if not (at_decision and n in {t.format(last) for t in _LAST_AT_DECISION})]
    cache = None
    if start > 0:
        cache = SharedPrompt(n_layers)
        with torch.no_grad():
            model(patcher.tokens["clean"][pair_index, :start], kv_cache=cache, return_type=None)
    decision = patcher.decision_pos[pair_index] - start
    rows = torch.arange(len(pair_index), device=patcher.device)

    def run(which: str, grad: bool):
        store = {}

        def save(act, hook):
            store[hook.name] = act
        hooks = []
        if which == "corrupted" and patcher.noise is not None:  # Patcher.corruption_hooks, from `start` on
            noise = patcher.noise[pair_index][:, start:]
            hooks.append((patcher._embed_hook, lambda act, hook: act + noise[:, : act.shape[1]]))
        if grad:  # a fresh leaf at the embedding: gradients reach every hooked activation, not the weights
            hooks.append((patcher._embed_hook, lambda act, hook: act.detach().requires_grad_(True)))
        hooks += [(name, save) for name in tl_names]
        tokens = patcher.tokens[which][pair_index, start:]
        with torch.set_grad_enabled(grad):
            if at_decision:
                with model.hooks(fwd_hooks=hooks), _DecisionOnly(model.blocks[last], templates, store):
                    x = model.hook_embed(norm(model.hook_embed_raw(model.wte(tokens)), model.config.norm_eps))
                    final = model.forward_from(x, 0, cache, at=decision)
                return store, (model.logits_from_resid(final, patcher.head_ids) if grad else None)
            if not gpt:  # any HookedRootModule: unembed the decision position only
                keep = lambda act, hook: act[rows, decision].unsqueeze(1)
                logits = model.run_with_hooks(tokens, fwd_hooks=hooks + [("ln_final.hook_normalized", keep)])
                return store, (logits[:, 0][:, patcher.head_ids].float() if grad else None)
            if grad:
                hooks.append(("ln_final.hook_normalized", lambda act, hook: store.__setitem__("final", act[rows, decision])))
            model.run_with_hooks(tokens, kv_cache=cache, return_type=None, fwd_hooks=hooks)
            if not grad:
                return store, None
            return store, model.logits_from_resid(store.pop("final"), patcher.head_ids, normed=True)

    with torch.no_grad():
        other_acts, _ = run(other, grad=False)
    base_acts, letters = run(base, grad=True)
    diff = patcher._letter_diff(letters, pair_index)
    grads = torch.autograd.grad(diff.sum(), [base_acts[n] for n in names], allow_unused=True)
    grads = {n: (torch.zeros_like(base_acts[n]) if g is None else g) for n, g in zip(names, grads)}
    base_acts = {n: a.detach() for n, a in base_acts.items()}
    if at_decision:  # the last block's decision-only activations back on the position axis (0 elsewhere)
        n_pos = patcher.n_pos - start
        for name in set(names) - set(tl_names):
            for acts in (other_acts, base_acts, grads):
                one = acts[name]  # [rows, 1, ...]
                if one.shape[1] != 1:
                    raise RuntimeError(f"attribution: {name} ran on {one.shape[1]} positions, expected the decision "
                                       "position alone (a hook inside the last block made forward_from run it whole)")
                acts[name] = one.new_zeros(one.shape[0], n_pos, *one.shape[2:])
                acts[name][rows, decision] = one[:, 0]
    return start, other_acts, base_acts, grads


# hooks of the last block that GPT.forward_from(at=...) computes at the decision position only
_LAST_AT_DECISION = ("blocks.{}.attn.hook_z", "blocks.{}.hook_attn_out", "blocks.{}.hook_mlp_out")


class _DecisionOnly:
    """While active, the last block's decision-position forward (Block.forward_at, which fires no hook
    inside the block) stores hook_z (c_proj's input, [rows, 1, heads, d_head]), hook_attn_out (c_proj's
    output) and hook_mlp_out (the MLP's output) of `templates` under their hook names, as tensors the
    forward goes on with (so gradients reach them). Torch module hooks on c_proj and the MLP, removed on exit."""

    def __init__(self, block, templates, store: dict):
        self.block, self.store, self.handles = block, store, []
        self.want = {t: t.format(block.attn.layer_idx) for t in templates if t in _LAST_AT_DECISION}

    def __enter__(self):
        attn, want, store = self.block.attn, self.want, self.store
        if "blocks.{}.attn.hook_z" in want:
            def z_in(module, args):
                (y,) = args
                z = y.view(*y.shape[:-1], attn.n_head, attn.head_dim)
                store[want["blocks.{}.attn.hook_z"]] = z
                return (z.flatten(-2),)
            self.handles.append(attn.c_proj.register_forward_pre_hook(z_in))
        if "blocks.{}.hook_attn_out" in want:
            self.handles.append(attn.c_proj.register_forward_hook(
                lambda module, args, out: store.__setitem__(want["blocks.{}.hook_attn_out"], out)))
        if "blocks.{}.hook_mlp_out" in want:
            self.handles.append(self.block.mlp.register_forward_hook(
                lambda module, args, out: store.__setitem__(want["blocks.{}.hook_mlp_out"], out)))
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()


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
        start, other_acts, base_acts, grads = _runs(patcher, templates, base, other, pair_index)
        for t in templates:
            for layer in range(n_layers):
                name = t.format(layer)
                delta = other_acts[name].float() - base_acts[name].float()
                effect = (delta * grads[name].float()).sum(-1)  # [rows, pos - start(, heads)]
                parts[t][layer].append(F.pad(effect, (0, 0) * (effect.dim() - 2) + (start, 0)))
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
