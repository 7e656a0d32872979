"""Muon's orthogonalisation: the stacked updates [K, rows, cols] -> roughly U V^T of each one's SVD.

Polar Express (Amsel, Persson, Musco, Gower 2025, arxiv.org/abs/2505.16932): five odd polynomial
steps X <- a X + (b A + c A^2) X with A = X X^T, each with its own coefficients, tuned for 5 iterations with
a 2% safety factor (nanochat's table). Before the first step X is divided by margin * |X|_F + 1e-6, so its
spectral norm is below 1. Optionally (nanochat HEAD) MuonEq first rescales every row to the mean row norm
(arxiv.org/abs/2603.28254), which conditions the spectrum better.

Tall matrices iterate on the small Gram matrix: either on the transpose (nanochat 2c4473d) or multiplying
from the right, A = X^T X and X <- a X + X B (nanochat HEAD): the same numbers up to rounding.

The dtype (orthogonalize_dtype): each nanochat's own choice wherever the hardware multiplies bf16 natively,
fp32 where bf16 would be emulated. nanochat HEAD computes in bf16 on CUDA from Ampere on and in fp32 elsewhere;
2c4473d in bf16 on every device, which a CPU without bf16 units emulates (this project measured 1.25 against
70.7 GFLOP/s in fp32 on an AVX2 EPYC), so there the 2025-10 recipe takes fp32, and bf16 only on CUDA sm80+ or
a CPU with AVX512-BF16/AMX that torch runs at its AVX-512 level. A process that caps torch at AVX2
(ATEN_CPU_CAPABILITY=avx2, as the demo pins for reproducible numerics) gets fp32: oneDNN's bf16 results
differ between CPU vendors (issue 32), fp32 ones do not.
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


def cpu_bf16_native() -> bool:
    """True when this CPU multiplies bf16 natively and torch may use it: AVX512-BF16 or AMX units, torch's
    kernels at their AVX-512 level (not capped by ATEN_CPU_CAPABILITY) and bf16 matmuls sent to oneDNN."""
    units = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return (torch.backends.cpu.get_cpu_capability() == "AVX512" and any(f is not None and f() for f in units)
            and torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()))


def orthogonalize_dtype(device: torch.device, bf16_on_cpu: bool = False) -> torch.dtype:
    """bf16 on a CUDA device of compute capability >= 8.0 (nanochat HEAD's rule) and, with bf16_on_cpu (the
    2025-10 recipe: nanochat 2c4473d computes in bf16 everywhere), on a CPU where bf16 is native
    (cpu_bf16_native); fp32 anywhere else."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0):
        return torch.bfloat16
    if device.type == "cpu" and bf16_on_cpu and cpu_bf16_native():
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
