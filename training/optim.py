"""nanochat's optimiser split and schedules.

- Muon for every 2D matrix inside the transformer blocks (attention and MLP projections).
- AdamW for the token embedding and for the lm_head, each with its own learning rate, both scaled by
  1/sqrt(d_model/768) so the tuned d12 rates carry to other widths (nanochat's `dmodel_lr_scale`).

`torch.optim.Muon` (torch >= 2.9) does what nanochat's Muon does: nesterov momentum as
`buf.lerp_(g, 1-m); g.lerp(buf, m)`, Keller Jordan's quintic Newton-Schulz (3.4445, -4.7750, 2.0315)
for 5 steps in bf16 on the (transposed when tall) Frobenius-normalised matrix, and the shape-based step
scale sqrt(max(1, rows/cols)) (`adjust_lr_fn="original"`). The one difference is numerical: torch
divides by max(norm, eps) where nanochat divides by norm + eps. tests/test_optim.py checks it step by
step against a plain re-implementation. So we use it rather than carry our own copy.

Under DDP every rank holds the full optimiser and applies the same update to the all-reduced gradients
(nanochat's DistMuon shards the Newton-Schulz work across ranks instead; same maths, less compute).
"""

from __future__ import annotations

import torch
from torch import nn

ADAM_BETAS = (0.8, 0.95)
ADAM_EPS = 1e-10
MUON_MOMENTUM_START = 0.85
MUON_MOMENTUM_END = 0.95
MUON_MOMENTUM_WARMUP_STEPS = 300


def split_parameters(model: nn.Module) -> tuple[list, list, list]:
    """(block matrices for Muon, embedding weights, everything else outside the blocks = lm_head)."""
    embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    matrices, embeddings, head = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.startswith("blocks."):
            if p.ndim != 2:
                raise ValueError(f"split_parameters: block parameter {name!r} has shape {tuple(p.shape)}; "
                                 "Muon takes 2D matrices only (the nanochat block has no biases or gains)")
            matrices.append(p)
        elif id(p) in embedding_ids:
            embeddings.append(p)
        else:
            head.append(p)
    if not matrices or not embeddings or not head:
        raise ValueError(f"split_parameters: expected block matrices, an embedding and an lm_head, found "
                         f"{len(matrices)}, {len(embeddings)} and {len(head)} parameters")
    return matrices, embeddings, head


SCALAR_LR = 0.5  # nanochat 92d63d4's scalar_lr


def nanochat_2026_groups(model: nn.Module, embedding_lr: float, init_lr_frac: float = 1.0) -> list[dict]:
    """AdamW groups of a nanochat-2026-07 model's additions, with nanochat 92d63d4's settings: value
    embeddings at half the (scaled) embedding lr, weight decay 0.01; resid_lambdas lr 0.005, decay 0.05;
    x0_lambdas lr 0.5 with beta1 0.96; smear_gate/smear_lambda/backout_lambda lr 0.2. Empty for 2025-10
    (the ve_gates are block matrices and go to Muon, as in nanochat)."""
    if not hasattr(model, "resid_lambdas"):
        return []
    value_embeds = [p for p in model.value_embeds.parameters() if p.requires_grad]
    smear = [model.smear_gate.weight, model.smear_lambda, model.backout_lambda]
    groups = [
        {"params": value_embeds, "lr": embedding_lr * 0.5, "betas": (0.8, 0.995), "weight_decay": 0.01},
        {"params": [model.resid_lambdas], "lr": SCALAR_LR * 0.01 * init_lr_frac, "betas": (0.8, 0.95),
         "weight_decay": 0.05},
        {"params": [model.x0_lambdas], "lr": SCALAR_LR * init_lr_frac, "betas": (0.96, 0.95), "weight_decay": 0.0},
        {"params": smear, "lr": 0.2 * init_lr_frac, "betas": (0.8, 0.95), "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def dmodel_lr_scale(d_model: int) -> float:
    return (d_model / 768) ** -0.5


def build_optimizers(model: nn.Module, *, d_model: int, matrix_lr: float = 0.02, embedding_lr: float = 0.2,
                     unembedding_lr: float = 0.004, weight_decay: float = 0.0,
                     init_lr_frac: float = 1.0) -> list[torch.optim.Optimizer]:
    """[Muon, AdamW] as nanochat builds them; every group remembers its `initial_lr` for the schedule."""
    matrices, embeddings, head = split_parameters(model)
    scale = dmodel_lr_scale(d_model)
    extra = nanochat_2026_groups(model, embedding_lr * scale * init_lr_frac, init_lr_frac)
    taken = {id(p) for group in extra for p in group["params"]}
    head = [p for p in head if id(p) not in taken]
    embeddings = [p for p in embeddings if id(p) not in taken]
    adam = torch.optim.AdamW(
        [{"params": head, "lr": unembedding_lr * scale * init_lr_frac},
         {"params": embeddings, "lr": embedding_lr * scale * init_lr_frac}, *extra],
        betas=ADAM_BETAS, eps=ADAM_EPS, weight_decay=weight_decay, fused=False, foreach=False,
    )
    muon = torch.optim.Muon(matrices, lr=matrix_lr * init_lr_frac, momentum=MUON_MOMENTUM_END, nesterov=True,
                            weight_decay=0.0, adjust_lr_fn="original")
    optimizers = [muon, adam]
    for opt in optimizers:
        for group in opt.param_groups:
            group["initial_lr"] = group["lr"]
    return optimizers


def lr_multiplier(step: int, num_steps: int, warmup_ratio: float = 0.0, warmdown_ratio: float = 0.2,
                  final_lr_frac: float = 0.0) -> float:
    """nanochat base schedule: linear warmup, flat, linear warmdown to final_lr_frac over the last part."""
    warmup = round(warmup_ratio * num_steps)
    warmdown = round(warmdown_ratio * num_steps)
    if step < warmup:
        return (step + 1) / warmup
    if step <= num_steps - warmdown:
        return 1.0
    progress = (num_steps - step) / warmdown
    return progress + (1 - progress) * final_lr_frac


def muon_momentum(step: int) -> float:
    """Muon momentum warms up from 0.85 to 0.95 over the first 300 steps (nanochat)."""
    frac = min(step / MUON_MOMENTUM_WARMUP_STEPS, 1.0)
    return (1 - frac) * MUON_MOMENTUM_START + frac * MUON_MOMENTUM_END


def apply_schedule(optimizers: list[torch.optim.Optimizer], lrm: float, momentum: float | None) -> float:
    """Set every group's lr to initial_lr * lrm (and Muon's momentum); returns the Muon lr for logging."""
    muon_lr = 0.0
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * lrm
            if isinstance(opt, torch.optim.Muon):
                muon_lr = group["lr"]
                if momentum is not None:
                    group["momentum"] = momentum
    return muon_lr
