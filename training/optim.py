"""nanochat's optimiser split, one recipe per architecture preset, and the schedules.

- Muon (training/muon.py) for every 2D matrix inside the transformer blocks (attention, MLP, ve_gate).
- AdamW for the token embedding, the lm_head and (2026-07) the value embeddings and scalars, each group with
  its own learning rate; embeddings and lm_head scaled by 1/sqrt(d_model/768) so the tuned d12 rates carry
  to other widths (nanochat's `dmodel_lr_scale`).

The recipe is the architecture's unless asked otherwise (`--optimizer`):
- nanochat-2025-10 = nanochat 2c4473d's `setup_optimizers`: Muon with Polar Express, NorMuon (beta2 0.95)
  and cautious weight decay; AdamW betas (0.8, 0.95), no AdamW weight decay.
- nanochat-2026-07 = nanochat HEAD 92d63d4's `setup_optimizer`: Muon adds MuonEq and Muon+ (NorMuon beta2
  0.9); AdamW betas and weight decay per group (lm_head (0.8, 0.96) / 0.01, wte (0.8, 0.995) / 0.001, ...).
`weight_decay` is Muon's cautious weight decay in both (nanochat's --weight_decay). Both are checked against
nanochat's own optimizer code: tests/test_muon_nanochat.py.

Under DDP every rank holds the full optimiser and state; Muon splits its orthogonalisation across ranks
(training/muon.py says how, and what it costs against nanochat's sharding).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from training.muon import Muon

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
RECIPES = ("nanochat-2025-10", "nanochat-2026-07")


def recipe_for(model: nn.Module, optimizer: str = "auto") -> str:
    """The optimizer recipe: the model's architecture preset for "auto", else the one named."""
    name = getattr(getattr(model, "config", None), "architecture", "nanochat-2025-10") if optimizer == "auto" \
        else optimizer
    if name not in RECIPES:
        raise ValueError(f"optimizer must be auto or one of {list(RECIPES)}, got {optimizer!r}")
    return name


def nanochat_2026_groups(model: nn.Module, embedding_lr: float, init_lr_frac: float = 1.0,
                         head_recipe: bool = True) -> list[dict]:
    """AdamW groups of a nanochat-2026-07 model's additions, with nanochat 92d63d4's settings: value
    embeddings at half the (scaled) embedding lr, betas (0.8, 0.995), weight decay 0.01; resid_lambdas lr
    0.005, decay 0.05; x0_lambdas lr 0.5 with beta1 0.96; smear_gate/smear_lambda/backout_lambda lr 0.2.
    With head_recipe False (the 2025-10 recipe on this model) every group gets that recipe's betas (0.8, 0.95)
    and no weight decay. Empty for a 2025-10 model."""
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
    if not head_recipe:
        groups = [{**g, "betas": ADAM_BETAS, "weight_decay": 0.0} for g in groups]
    return [g for g in groups if g["params"]]


def _fused_adam(model: nn.Module) -> bool:
    """torch's fused AdamW kernel (one pass per tensor; nanochat 2c4473d uses it too) where it exists."""
    return all(p.device.type in ("cpu", "cuda") for p in model.parameters())


def dmodel_lr_scale(d_model: int) -> float:
    return (d_model / 768) ** -0.5


def build_optimizers(model: nn.Module, *, d_model: int, matrix_lr: float = 0.02, embedding_lr: float = 0.2,
                     unembedding_lr: float = 0.004, weight_decay: float = 0.0, init_lr_frac: float = 1.0,
                     optimizer: str = "auto", ns_dtype: torch.dtype | None = None) -> list[torch.optim.Optimizer]:
    """[Muon, AdamW] as nanochat builds them for the recipe (recipe_for); every group remembers its
    `initial_lr` for the schedule. weight_decay is Muon's (cautious); AdamW's is the recipe's."""
    recipe = recipe_for(model, optimizer)
    head_recipe = recipe == "nanochat-2026-07"
    matrices, embeddings, head = split_parameters(model)
    scale = dmodel_lr_scale(d_model)
    extra = nanochat_2026_groups(model, embedding_lr * scale * init_lr_frac, init_lr_frac, head_recipe)
    taken = {id(p) for group in extra for p in group["params"]}
    head = [p for p in head if id(p) not in taken]
    embeddings = [p for p in embeddings if id(p) not in taken]
    head_betas, head_wd, emb_betas, emb_wd = ((0.8, 0.96), 0.01, (0.8, 0.995), 0.001) if head_recipe \
        else (ADAM_BETAS, 0.0, ADAM_BETAS, 0.0)
    adam = torch.optim.AdamW(
        [{"params": head, "lr": unembedding_lr * scale * init_lr_frac, "betas": head_betas, "weight_decay": head_wd},
         {"params": embeddings, "lr": embedding_lr * scale * init_lr_frac, "betas": emb_betas,
          "weight_decay": emb_wd}, *extra],
        betas=ADAM_BETAS, eps=ADAM_EPS, weight_decay=0.0, fused=_fused_adam(model),
    )
    muon = Muon(matrices, recipe=recipe, lr=matrix_lr * init_lr_frac, momentum=MUON_MOMENTUM_END,
                weight_decay=weight_decay, ns_dtype=ns_dtype)
    optimizers = [muon, adam]
    for opt in optimizers:
        for group in opt.param_groups:
            group["initial_lr"] = group["lr"]
    for group in muon.param_groups:
        group["initial_weight_decay"] = group["weight_decay"]
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
    """Muon momentum warms up from 0.85 to 0.95 over the first 300 steps (nanochat 2c4473d's base and mid,
    HEAD's SFT)."""
    frac = min(step / MUON_MOMENTUM_WARMUP_STEPS, 1.0)
    return (1 - frac) * MUON_MOMENTUM_START + frac * MUON_MOMENTUM_END


def base_momentum(step: int, recipe: str, num_steps: int, warmdown_ratio: float) -> float:
    """Muon momentum of base training: muon_momentum for 2025-10; nanochat HEAD's for 2026-07, 0.85 -> 0.97
    over 400 steps, then down to 0.90 through the learning-rate warmdown."""
    if recipe != "nanochat-2026-07":
        return muon_momentum(step)
    warmdown = round(warmdown_ratio * num_steps)
    if step < 400:
        return (1 - step / 400) * 0.85 + step / 400 * 0.97
    if warmdown and step >= num_steps - warmdown:
        progress = (step - (num_steps - warmdown)) / warmdown
        return 0.97 * (1 - progress) + 0.90 * progress
    return 0.97


def base_weight_decay(step: int, recipe: str, num_steps: int) -> float:
    """Fraction of Muon's weight decay at a base step: linear to 0 (2c4473d), cosine to 0 (HEAD)."""
    if recipe == "nanochat-2026-07":
        return 0.5 * (1 + math.cos(math.pi * step / num_steps))
    return 1 - step / num_steps


def apply_schedule(optimizers: list[torch.optim.Optimizer], lrm: float, momentum: float | None,
                   weight_decay_frac: float | None = None) -> float:
    """Set every group's lr to initial_lr * lrm (and Muon's momentum, and Muon's weight decay to its
    initial value * weight_decay_frac); returns the Muon lr for logging."""
    muon_lr = 0.0
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * lrm
            if isinstance(opt, Muon):
                muon_lr = group["lr"]
                if momentum is not None:
                    group["momentum"] = momentum
                if weight_decay_frac is not None:
                    group["weight_decay"] = group["initial_weight_decay"] * weight_decay_frac
    return muon_lr
