"""Prediction counts: how often the model picks each letter on the probe set (mode-collapse watch).

An RL policy that learns "always C" shows up here long before accuracy says why.
"""

from __future__ import annotations

import torch
from torch import Tensor

from aquainterp.tasks import LETTERS


def letter_counts(predicted: Tensor) -> dict[str, float]:
    """Predicted letter indices [N] in 0..4 -> rl/letter_pred_counts/A..E (counts, summing to N)."""
    if predicted.numel() and (predicted.min() < 0 or predicted.max() > 4):
        raise ValueError(f"letter_counts: indices must be in 0..4, got {predicted.tolist()}")
    counts = torch.bincount(predicted.flatten().long().cpu(), minlength=5)
    return {f"rl/letter_pred_counts/{letter}": float(counts[i]) for i, letter in enumerate(LETTERS)}
