"""Attention entropy: how spread out each head's attention is.

A head that attends to one token has entropy 0; one that spreads evenly over n visible keys has log(n).
Dividing by log(n) makes heads at different query positions comparable (0 = one-hot, 1 = uniform).
Computed in float64 so that these two ground truths hold to rounding, not to float32's 1e-7.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def pattern_entropy(pattern: Tensor) -> Tensor:
    """-sum p log p over the last dim (keys), with 0 log 0 = 0. Returns float64, one value per row."""
    p = pattern.to(torch.float64)
    return -torch.special.xlogy(p, p).sum(dim=-1)


def normalized_entropy(entropy: Tensor, n_visible: Tensor | int) -> Tensor:
    """entropy / log(n_visible), in [0, 1]; rows that see a single key (log 1 = 0) count as 0."""
    n = torch.as_tensor(n_visible, dtype=torch.float64, device=entropy.device)
    if (n < 1).any():
        raise ValueError(f"normalized_entropy: n_visible must be >= 1, got min {n.min().item()}")
    log_n = torch.log(n)
    safe = torch.where(log_n > 0, log_n, torch.ones_like(log_n))
    return torch.where(log_n > 0, entropy.to(torch.float64) / safe, torch.zeros_like(safe))


def query_window(lengths: Tensor, window: int) -> tuple[Tensor, Tensor]:
    """The last `window` query positions of each right-padded row: (positions [B, W], valid [B, W]).

    The last position (length - 1) is the decision position. Rows shorter than the window repeat
    position 0 in the slots marked invalid, so a gather stays in range.
    """
    if window < 1:
        raise ValueError(f"query_window: window must be >= 1, got {window}")
    offsets = torch.arange(window - 1, -1, -1, device=lengths.device)
    positions = lengths[:, None] - 1 - offsets[None, :]
    valid = positions >= 0
    return positions.clamp(min=0), valid


def window_entropy(pattern: Tensor, positions: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
    """Entropy of the pattern rows at `positions` for one layer.

    pattern [B, H, Tq, Tk] (causal), positions/valid [B, W] -> (entropy, normalised) each [B, H, W],
    NaN where invalid. Under a causal mask query q sees q + 1 keys, which is the normaliser.
    """
    batch = torch.arange(pattern.shape[0], device=pattern.device)[:, None]
    rows = pattern[batch, :, positions, :]  # [B, W, H, Tk]
    ent = pattern_entropy(rows).transpose(1, 2)  # [B, H, W]
    norm = normalized_entropy(ent, (positions + 1)[:, None, :])
    nan = torch.tensor(math.nan, dtype=torch.float64, device=pattern.device)
    mask = valid[:, None, :]
    return torch.where(mask, ent, nan), torch.where(mask, norm, nan)


def entropy_metrics(entropy_lh: Tensor, prefix: str = "attn/entropy") -> dict[str, float]:
    """Flatten a [layers, heads] mean-entropy matrix into the design's metric names."""
    out = {f"{prefix}_mean": float(entropy_lh.mean())}
    for layer in range(entropy_lh.shape[0]):
        for head in range(entropy_lh.shape[1]):
            out[f"{prefix}/layer{layer}/head{head}"] = float(entropy_lh[layer, head])
    return out
