"""Muon as nanochat has it, one recipe per architecture preset.

Every 2D matrix of the transformer blocks is trained by Muon. Matrices of one shape are stacked into a
[K, rows, cols] tensor and updated together, in this order (nanochat's order; the recipe switches the
parts that differ between nanochat 2c4473d, which trains the 2025-10 architecture, and nanochat HEAD
92d63d4, which trains the 2026-07 one):

1. Nesterov momentum: buf <- lerp(buf, g, 1 - mu); u <- lerp(g, buf, mu).
2. Orthogonalisation (training/orthogonalize.py): Polar Express, with MuonEq row equilibration first and
   the Muon+ Frobenius renormalisation after on HEAD.
3. NorMuon variance reduction: a running second moment per row (square and tall matrices) or per column
   (wide ones) rescales the orthogonalised update, keeping its Frobenius norm.
4. Cautious weight decay and the step: p <- p - lr * s * (u + wd * p * [u * p >= 0]) with the shape scale
   s = sqrt(max(1, rows / cols)).

The iteration runs in the dtype its nanochat uses wherever bf16 is native, fp32 where bf16 would be emulated
(training/orthogonalize.py, orthogonalize_dtype): 2026-07 bf16 on CUDA sm80+ and fp32 elsewhere, as nanochat
HEAD; 2025-10 bf16 also on a CPU with AVX512-BF16/AMX (2c4473d runs it in bf16 everywhere, which a CPU
without bf16 units emulates at ~30x the cost).

Under torch.distributed (DDP in base/mid/SFT, RL's own gradient sum) every rank already holds the summed
gradients, so momentum and state stay identical on every rank and a checkpoint written by rank 0 is
complete; only the orthogonalisation, the part that costs, is split: each rank orthogonalises its
contiguous share of every stack and one all_gather per shape hands the results to all. nanochat instead
reduce-scatters gradients and all-gathers parameters (ZeRO-2) and keeps each rank's share of the state;
docs/design.md "Distributed" gives what the difference costs.

Checked against nanochat's own optimizer code at both commits: tests/test_muon_nanochat.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as torch_dist
from torch import Tensor

from training.orthogonalize import orthogonalize, orthogonalize_dtype


@dataclass(frozen=True)
class MuonRecipe:
    """What differs between nanochat's Muons (both have Polar Express, NorMuon and cautious weight decay)."""

    name: str
    beta2: float  # NorMuon second-moment decay
    spectral_margin: float  # the first normalisation divides by margin * |X|_F
    row_equilibrate: bool  # MuonEq before the iteration
    renormalize: bool  # Muon+ after it: |update|_F = sqrt(min(rows, cols))
    transpose_tall: bool  # 2c4473d iterates on the transpose of a tall matrix; HEAD multiplies from the right
    update_in_param_dtype: bool  # HEAD casts the update back to the parameter dtype; 2c4473d keeps bf16
    fp32_scalars: bool  # HEAD passes momentum, beta2, lr and wd as fp32 tensors: 1 - mu, lr * wd round to fp32
    bf16_on_cpu: bool  # orthogonalise in bf16 on a CPU with native bf16 (2c4473d: bf16 on every device)

    def scalar(self, value: float) -> float:
        """A hyper-parameter expression's value as this nanochat computes it (fp32 or Python double)."""
        return torch.tensor(value, dtype=torch.float32).item() if self.fp32_scalars else value


MUON_RECIPES = {
    "nanochat-2025-10": MuonRecipe("nanochat-2025-10", beta2=0.95, spectral_margin=1.02, row_equilibrate=False,
                                   renormalize=False, transpose_tall=True, update_in_param_dtype=False,
                                   fp32_scalars=False, bf16_on_cpu=True),
    "nanochat-2026-07": MuonRecipe("nanochat-2026-07", beta2=0.9, spectral_margin=1.01, row_equilibrate=True,
                                   renormalize=True, transpose_tall=False, update_in_param_dtype=True,
                                   fp32_scalars=True, bf16_on_cpu=False),
}


def variance_reduced(update: Tensor, second_moment: Tensor, one_minus_beta2: float) -> Tensor:
    """NorMuon: scale each row (second_moment [K, rows, 1]) or column ([K, 1, cols]) of the update by the
    inverse root of its running mean square, then restore each matrix's Frobenius norm. Updates
    second_moment in place."""
    dim = -1 if second_moment.size(-1) == 1 else -2
    n = update.size(dim)
    mean_sq = update.float().square().mean(dim=dim, keepdim=True)
    norm_before = (mean_sq.sum(dim=(-2, -1), keepdim=True) * n).sqrt()
    second_moment.lerp_(mean_sq.to(second_moment.dtype), one_minus_beta2)
    inv_rms = second_moment.clamp_min(1e-10).rsqrt()
    norm_after = ((mean_sq * n) * inv_rms.float().square()).sum(dim=(-2, -1), keepdim=True).sqrt()
    return update * (inv_rms * (norm_before / norm_after.clamp_min(1e-10))).to(update.dtype)


def _shard_bounds(k: int, rank: int, world: int) -> tuple[int, int, int]:
    """(start, stop, chunk) of this rank's contiguous share of k stacked matrices."""
    chunk = -(-k // world)
    start = min(k, rank * chunk)
    return start, min(k, start + chunk), chunk


class Muon(torch.optim.Optimizer):
    """nanochat's Muon for 2D parameters (recipe: a key of MUON_RECIPES). Parameters are grouped by shape;
    a group's state lives on its first parameter, stacked: the momentum buffer [K, rows, cols] and the
    NorMuon second moment [K, rows, 1] or [K, 1, cols]. state_dict() hands out (and load_state_dict() takes)
    one entry per parameter, so a checkpoint does not depend on how parameters are stacked.
    `ns_dtype` None = the recipe's (orthogonalize_dtype): bf16 where its nanochat uses it and the device has
    bf16 units, fp32 elsewhere."""

    def __init__(self, params, recipe: str = "nanochat-2026-07", lr: float = 0.02, momentum: float = 0.95,
                 weight_decay: float = 0.0, ns_steps: int = 5, ns_dtype: torch.dtype | None = None):
        if recipe not in MUON_RECIPES:
            raise ValueError(f"Muon: recipe must be one of {list(MUON_RECIPES)}, got {recipe!r}")
        params = [p for p in params]
        bad = [tuple(p.shape) for p in params if p.ndim != 2]
        if bad:
            raise ValueError(f"Muon: 2D parameters only, got shapes {bad}")
        groups = [{"params": [p for p in params if p.shape == shape]}
                  for shape in sorted({tuple(p.shape) for p in params})]
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, ns_steps=ns_steps,
                        beta2=MUON_RECIPES[recipe].beta2)
        super().__init__(groups, defaults)
        self.recipe = MUON_RECIPES[recipe]
        self.ns_dtype = ns_dtype

    def state_dict(self) -> dict:
        sd = super().state_dict()
        for group in sd["param_groups"]:
            stacked = sd["state"].pop(group["params"][0], {})
            for i, pid in enumerate(group["params"]):
                if stacked:
                    sd["state"][pid] = {key: value[i].clone() for key, value in stacked.items()}
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = {**state_dict, "state": dict(state_dict["state"])}
        for group in state_dict["param_groups"]:
            per_param = [state_dict["state"].pop(pid, None) for pid in group["params"]]
            if any(s is None for s in per_param):
                if any(s is not None for s in per_param):
                    raise ValueError("Muon.load_state_dict: state for some but not all parameters of a group")
                continue
            state_dict["state"][group["params"][0]] = {key: torch.stack([s[key] for s in per_param])
                                                      for key in per_param[0]}
        super().load_state_dict(state_dict)

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("Muon.step takes no closure")
        sharded = torch_dist.is_available() and torch_dist.is_initialized() and torch_dist.get_world_size() > 1
        for group in self.param_groups:
            self._step_group(group, sharded)

    def _step_group(self, group: dict, sharded: bool) -> None:
        params: list[Tensor] = group["params"]
        if any(p.grad is None for p in params):
            missing = sum(p.grad is None for p in params)
            raise ValueError(f"Muon: {missing} of {len(params)} parameters of shape {tuple(params[0].shape)} "
                             "have no gradient")
        recipe = self.recipe
        rows, cols = params[0].shape
        state = self.state[params[0]]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros(len(params), rows, cols, dtype=params[0].dtype,
                                                   device=params[0].device)
        grads = torch.stack([p.grad for p in params])
        buf = state["momentum_buffer"]
        mu = recipe.scalar(group["momentum"])
        buf.lerp_(grads, recipe.scalar(1 - mu))
        update = grads.lerp_(buf, mu)

        dtype = self.ns_dtype or orthogonalize_dtype(update.device, recipe.bf16_on_cpu)
        ortho = lambda x: orthogonalize(x, group["ns_steps"], dtype, recipe.spectral_margin,  # noqa: E731
                                        recipe.row_equilibrate, recipe.transpose_tall)
        update = self._sharded(ortho, update) if sharded else ortho(update)
        if recipe.update_in_param_dtype:
            update = update.to(params[0].dtype)
        if recipe.renormalize:
            norm = update.float().norm(dim=(-2, -1), keepdim=True).clamp_min(1e-6)
            update = update * (min(rows, cols) ** 0.5 / norm).to(update.dtype)

        if "second_moment" not in state:
            shape = (len(params), rows, 1) if rows >= cols else (len(params), 1, cols)
            state["second_moment"] = torch.zeros(shape, dtype=update.dtype, device=update.device)
        update = variance_reduced(update, state["second_moment"], recipe.scalar(1 - recipe.scalar(group["beta2"])))

        lr = recipe.scalar(group["lr"] * max(1.0, rows / cols) ** 0.5)
        wd = recipe.scalar(group["weight_decay"])
        lr_wd = recipe.scalar(lr * wd)
        for p, u in zip(params, update.unbind(0)):  # in place, per parameter: no stacked copy of the weights
            if wd != 0:
                p.sub_(lr * u + lr_wd * p * ((u * p) >= 0))
            else:
                p.sub_(lr * u)

    @staticmethod
    def _sharded(ortho, update: Tensor) -> Tensor:
        """Each rank orthogonalises its share of the stack; one all_gather assembles the whole stack."""
        rank, world = torch_dist.get_rank(), torch_dist.get_world_size()
        k = update.size(0)
        start, stop, chunk = _shard_bounds(k, rank, world)
        mine = ortho(update[start:stop])
        padded = mine.new_zeros(chunk, *update.shape[1:])
        padded[: stop - start] = mine
        gathered = mine.new_empty(chunk * world, *update.shape[1:])
        torch_dist.all_gather_into_tensor(gathered, padded)
        return gathered[:k]
