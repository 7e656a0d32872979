"""Attention-to-option mass: how much of the decision position's attention lands on each option.

The spans come from the tokenizer's offsets (aquainterp.tasks.option_spans), so "C) 42" is exactly the
tokens that carry that text. Mass on an option = sum of the attention row over its span; total option
mass = sum over the five spans (the rest goes to the question, chat tokens, "Answer:").
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def span_mask(spans: Sequence[Sequence[tuple[int, int]]], length: int, device=None) -> Tensor:
    """[B, 5, length] float mask, 1 inside each option's [start, end) token span."""
    mask = torch.zeros(len(spans), 5, length, device=device)
    for b, row in enumerate(spans):
        if len(row) != 5:
            raise ValueError(f"span_mask: row {b} has {len(row)} spans, expected 5 (A..E)")
        for o, (start, end) in enumerate(row):
            if not 0 <= start < end <= length:
                raise ValueError(f"span_mask: row {b} option {'ABCDE'[o]} span ({start}, {end}) "
                                 f"is empty or outside [0, {length})")
            mask[b, o, start:end] = 1.0
    return mask


def option_mass(rows: Tensor, mask: Tensor) -> Tensor:
    """Attention rows [B, H, Tk] and span mask [B, 5, Tk] -> mass per head and option [B, H, 5]."""
    if rows.shape[0] != mask.shape[0] or rows.shape[-1] != mask.shape[-1]:
        raise ValueError(f"option_mass: rows {tuple(rows.shape)} and mask {tuple(mask.shape)} disagree")
    return torch.einsum("bhk,bok->bho", rows.to(torch.float64), mask.to(torch.float64))


def decision_rows(pattern: Tensor, lengths: Tensor) -> Tensor:
    """The attention row of each sequence's last real token: pattern [B, H, T, T] -> [B, H, T]."""
    batch = torch.arange(pattern.shape[0], device=pattern.device)
    return pattern[batch, :, lengths - 1, :]


def pick_option(mass: Tensor, letter_index: Tensor) -> Tensor:
    """mass [N, L, H, 5], one option per problem [N] -> [N, L, H] (gold or chosen option's mass)."""
    idx = letter_index.view(-1, 1, 1, 1).expand(*mass.shape[:3], 1)
    return mass.gather(-1, idx).squeeze(-1)


def option_mass_metrics(mass: Tensor, gold: Tensor, chosen: Tensor) -> dict[str, float]:
    """mass [N, L, H, 5] -> attn/option_mass_mean, per-head totals, gold and chosen option means."""
    total = mass.sum(-1)  # [N, L, H]
    per_head = total.mean(0)
    out = {"attn/option_mass_mean": float(total.mean())}
    for layer in range(per_head.shape[0]):
        for head in range(per_head.shape[1]):
            out[f"attn/option_mass/layer{layer}/head{head}"] = float(per_head[layer, head])
    out["attn/gold_option_mass_mean"] = float(pick_option(mass, gold).mean())
    out["attn/chosen_option_mass_mean"] = float(pick_option(mass, chosen).mean())
    return out


def completion_mass_metrics(mass: Tensor) -> dict[str, float]:
    """mass [N, L, H] (the decision row's attention on the completion's own tokens) ->
    attn/completion_mass_mean and attn/completion_mass/layer{l}/head{h}: how much the decision reads
    its own reasoning rather than the prompt."""
    per_head = mass.mean(0)
    out = {"attn/completion_mass_mean": float(mass.mean())}
    for layer in range(per_head.shape[0]):
        for head in range(per_head.shape[1]):
            out[f"attn/completion_mass/layer{layer}/head{head}"] = float(per_head[layer, head])
    return out
