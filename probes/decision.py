"""Batched hooked forwards that read every probe quantity at each DecisionRow's decision position.

One right-padded forward per batch of rows (rows sorted by length, so little compute goes to padding;
results come back in the rows' order). Hooks reduce each layer as it is computed, so memory stays at
one layer's [B, H, T, T] pattern:
    hook_pattern      -> entropy of the last `window` query rows, the decision row's mass on each
                         option span and on the completion's own tokens
    hook_resid_post   -> the decision position's residual vector (for the logit lens)
The unembedding runs at the decision position only (GPT.forward(logits_at=)).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from probes.entropy import query_window, window_entropy
from probes.logit_lens import lens_letter_logits
from probes.option_mass import decision_rows, option_mass, span_mask
from probes.probe_set import DecisionRow, right_pad

ATTENTION_PROBES = ("entropy", "option_mass")


def _is_pattern(name: str) -> bool:
    return name.endswith("attn.hook_pattern")


def _leave_unchanged(tensor, hook):
    """A hook that reads nothing: it only switches the model to its explicit-softmax attention path."""
    return None


def completion_mask(rows: Sequence[DecisionRow], length: int, device=None) -> torch.Tensor:
    """[B, length] float mask, 1 on the completion tokens each row's decision can see
    (completion_start .. decision position inclusive); all 0 for rows without a completion."""
    mask = torch.zeros(len(rows), length, device=device)
    for b, row in enumerate(rows):
        if row.completion_start is not None:
            mask[b, row.completion_start : len(row.ids)] = 1.0
    return mask


class _LayerReducer:
    """Forward hooks that reduce each layer, at once, to what the probes need for one batch."""

    def __init__(self, want, n_layers, lengths, window, spans_mask, comp_mask):
        self.want, self.lengths = want, lengths
        self.spans_mask, self.comp_mask = spans_mask, comp_mask
        self.positions, self.valid = query_window(lengths, window)
        keys = ("entropy", "entropy_normalized", "option_mass", "completion_mass", "resid")
        self.per_layer = {key: [None] * n_layers for key in keys}

    def pattern_hook(self, layer: int):
        def reduce(pattern, hook):
            if "entropy" in self.want:
                ent, norm = window_entropy(pattern, self.positions, self.valid)
                self.per_layer["entropy"][layer] = ent
                self.per_layer["entropy_normalized"][layer] = norm
            if "option_mass" in self.want:
                rows = decision_rows(pattern, self.lengths)
                self.per_layer["option_mass"][layer] = option_mass(rows, self.spans_mask)
                self.per_layer["completion_mass"][layer] = torch.einsum(
                    "bhk,bk->bh", rows.to(torch.float64), self.comp_mask.to(torch.float64))
        return reduce

    def resid_hook(self, layer: int):
        def read(resid, hook):
            batch = torch.arange(resid.shape[0], device=resid.device)
            self.per_layer["resid"][layer] = resid[batch, self.lengths - 1].detach()
        return read

    def stacked(self) -> dict[str, torch.Tensor]:
        """{name: [B, L, ...]} for the quantities that were computed."""
        return {k: torch.stack(v, dim=1) for k, v in self.per_layer.items() if v[0] is not None}


def _by_length(rows: Sequence[DecisionRow]) -> tuple[list[int], torch.Tensor]:
    """(row indices in order of length, the permutation that puts results computed in that order back)."""
    order = sorted(range(len(rows)), key=lambda i: len(rows[i].ids))
    inverse = torch.empty(len(order), dtype=torch.long)
    inverse[torch.tensor(order)] = torch.arange(len(order))
    return order, inverse


def read_decisions(model, rows: Sequence[DecisionRow], probes: Sequence[str], *, batch_size: int,
                   pad_id: int, device, entropy_window: int = 8, lens: bool = False,
                   progress: bool = False) -> dict[str, torch.Tensor]:
    """Run `model` (no_grad is the caller's) over the rows; every output is in the rows' order:
    letters [N, 5] (fp32) and gold [N] always; with "entropy": entropy, entropy_normalized
    [N, L, H, W] (NaN where a row is shorter than the window); with "option_mass": option_mass
    [N, L, H, 5] and completion_mass [N, L, H]; with lens: lens_letters [N, L, 5]."""
    if not rows:
        raise ValueError("read_decisions: no decision rows")
    want = [p for p in ATTENTION_PROBES if p in probes]
    n_layers = model.cfg.n_layers
    order, inverse = _by_length(rows)
    out: dict[str, list[torch.Tensor]] = {}
    starts = range(0, len(order), batch_size)
    for start in tqdm(starts, desc="probes", leave=False, disable=not progress or len(starts) < 4):
        batch = [rows[i] for i in order[start : start + batch_size]]
        ids, lengths = right_pad([r.ids for r in batch], pad_id)
        ids, lengths = ids.to(device), lengths.to(device)
        letter_ids = torch.tensor([r.letter_ids for r in batch], device=device)
        spans = span_mask([r.spans for r in batch], ids.shape[1], device=device) if "option_mass" in want else None
        reducer = _LayerReducer(want, n_layers, lengths, entropy_window, spans,
                                completion_mask(batch, ids.shape[1], device=device))
        hooks = []
        if want:
            hooks += [(f"blocks.{layer}.attn.hook_pattern", reducer.pattern_hook(layer)) for layer in range(n_layers)]
        if lens:
            hooks += [(f"blocks.{layer}.hook_resid_post", reducer.resid_hook(layer)) for layer in range(n_layers)]
        if hooks:
            logits = model.run_with_hooks(ids, fwd_hooks=hooks, logits_at=lengths - 1)
        else:
            logits = model(ids, logits_at=lengths - 1)  # [B, vocab]: the decision positions only
        out.setdefault("letters", []).append(logits.gather(-1, letter_ids).float().cpu())
        del logits
        out.setdefault("gold", []).append(torch.tensor([r.gold for r in batch]))
        stacked = reducer.stacked()
        resid = stacked.pop("resid", None)
        if resid is not None:
            out.setdefault("lens_letters", []).append(lens_letter_logits(model, resid, letter_ids).cpu())
        for key, value in stacked.items():
            out.setdefault(key, []).append(value.cpu())  # one device-to-host copy per batch, not per layer
    return {k: torch.cat(v)[inverse] for k, v in out.items()}


def reference_letters(reference, rows: Sequence[DecisionRow], *, batch_size: int, pad_id: int,
                      hooked: bool) -> torch.Tensor:
    """The reference model's letter logits [N, 5] at each row's decision position, rows' order.
    `hooked`: use the explicit attention path the policy's hooked forward used, so an unchanged
    policy gives a letter KL of exactly 0."""
    device = next(reference.parameters()).device
    order, inverse = _by_length(rows)
    values = []
    for start in range(0, len(order), batch_size):
        batch = [rows[i] for i in order[start : start + batch_size]]
        ids, lengths = right_pad([r.ids for r in batch], pad_id)
        ids, decision = ids.to(device), lengths.to(device) - 1
        if hooked:
            logits = reference.run_with_hooks(ids, fwd_hooks=[(_is_pattern, _leave_unchanged)], logits_at=decision)
        else:
            logits = reference(ids, logits_at=decision)
        values.append(logits.gather(-1, torch.tensor([r.letter_ids for r in batch], device=device)).float().cpu())
        del logits
    return torch.cat(values)[inverse]
