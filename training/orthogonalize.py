"""Muon's orthogonalisation: the stacked updates [K, rows, cols] -> roughly U V^T of each one's SVD.

Polar Express (Amsel, Persson, Musco, Gower 2025, arxiv.org/abs/2505.16932): five odd polynomial
steps X <- a X + (b A + c A^2) X with A = X X^T, each with its own coefficients, tuned for 5 iterations with
a 2% safety factor (nanochat's table). Before the first step X is divided by margin * |X|_F + 1e-6, so its
spectral norm is below 1. Optionally (nanochat HEAD) MuonEq first rescales every row to the mean row norm
(arxiv.org/abs/2603.28254), which conditions the spectrum better.

Tall matrices iterate on the small Gram matrix: either on the transpose (nanochat 2c4473d) or multiplying
from the right, A = X^T X and X <- a X + X B (nanochat HEAD): the same numbers up to rounding.

The dtype: bf16 where the hardware multiplies bf16 natively (CUDA from Ampere on), fp32 elsewhere. A CPU
without bf16 units emulates bf16 matmuls (this project measured 1.25 against 70.7 GFLOP/s in fp32 on an AVX2
EPYC), and oneDNN's bf16 results differ between CPU vendors, so fp32 on CPU is both faster and reproducible.
"""

from __future__ import annotations

import torch
from torch import Tensor

POLAR_EXPRESS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)


def orthogonalize_dtype(device: torch.device) -> torch.dtype:
    """bf16 on a CUDA device of compute capability >= 8.0, fp32 anywhere else (nanochat HEAD's rule)."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0):
        return torch.bfloat16
    return torch.float32


def equilibrate_rows(x: Tensor) -> Tensor:
    """MuonEq: every row of every matrix rescaled to the matrix's mean row norm |X|_F / sqrt(rows)."""
    target = x.float().norm(dim=(-2, -1), keepdim=True) / x.size(-2) ** 0.5
    row_norms = x.float().norm(dim=-1, keepdim=True).clamp_min(1e-6)
    return x * (target / row_norms).to(x.dtype)


def orthogonalize(update: Tensor, steps: int = 5, dtype: torch.dtype = torch.float32, margin: float = 1.01,
                  row_equilibrate: bool = True, transpose_tall: bool = False) -> Tensor:
    """Polar Express on each matrix of [..., rows, cols], computed in `dtype` and returned in it."""
    if not 1 <= steps <= len(POLAR_EXPRESS):
        raise ValueError(f"orthogonalize: steps must be 1..{len(POLAR_EXPRESS)}, got {steps}")
    x = update.to(dtype)
    if row_equilibrate:
        x = equilibrate_rows(x)
    tall = x.size(-2) > x.size(-1)
    if tall and transpose_tall:
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) * margin + 1e-6)
    if tall and not transpose_tall:
        for a, b, c in POLAR_EXPRESS[:steps]:
            gram = x.mT @ x
            x = a * x + x @ (b * gram + c * (gram @ gram))
        return x
    for a, b, c in POLAR_EXPRESS[:steps]:
        gram = x @ x.mT
        x = a * x + (b * gram + c * (gram @ gram)) @ x
    return x.mT if tall and transpose_tall else x
