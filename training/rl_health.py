"""The GRPO health metrics TRL and verl users look at first, from what an RL step already holds.

- rl/entropy: mean per-token entropy (nats) of the policy at temperature 1 on its sampled completions,
  from the logits of the update's first forward (no extra forward). Falling to ~0 = the policy collapsed.
- rl/tied_groups_frac: share of prompts whose completions all earned the same reward. Group-mean
  advantages are then all 0: those prompts teach nothing (TRL's frac_reward_zero_std).
- rl/reward_std: within-group reward standard deviation, averaged over groups (TRL's reward_std).
- rl/truncated_frac: share of completions that ran into --max-new-tokens without a stop token (TRL's
  completions/clipped_ratio): they cannot state an answer the format reward accepts.
- rl/grad_norm: L2 norm of the whole step's gradient (summed over ranks) before the optimizer step.
- KL to the frozen reference is rl/kl_k3_mean (training.rl), logged whenever a reference exists, which
  --probes kl gives with --kl-coef 0.

All are sums over ranks (training.rl.global_sum) divided by global counts, so 2 ranks log what 1 would.
"""

from __future__ import annotations

import torch


def entropy_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Σ over positions with targets >= 0 of the entropy of softmax(logits) (fp32), one row at a time so
    no second [B, T, vocab] tensor is held. logits [B, T, V], targets [B, T]."""
    total = torch.zeros((), dtype=torch.float64)
    with torch.no_grad():
        for row, want in zip(logits, targets):
            row = row[want >= 0].float()
            logp = torch.log_softmax(row, dim=-1)
            total += -(logp.exp() * logp).sum().double().cpu()
    return total


def group_counts(rewards: list[list[float]], finished: list[list[bool]]) -> torch.Tensor:
    """[tied groups, Σ within-group reward std, groups, truncated completions, completions] of this rank's
    rollouts (one list per prompt). The std is the population std (a group of one has std 0)."""
    out = torch.zeros(5, dtype=torch.float64)
    for group, done in zip(rewards, finished):
        r = torch.tensor(group, dtype=torch.float64)
        out[0] += float(bool((r == r[0]).all()))
        out[1] += r.std(unbiased=False).item() if len(group) > 1 else 0.0
        out[2] += 1
        out[3] += sum(not d for d in done)
        out[4] += len(done)
    return out


def group_metrics(counts: torch.Tensor) -> dict[str, float]:
    """rl/tied_groups_frac, rl/reward_std, rl/truncated_frac from group_counts summed over ranks."""
    tied, std, groups, truncated, completions = counts.tolist()
    return {"rl/tied_groups_frac": tied / groups, "rl/reward_std": std / groups,
            "rl/truncated_frac": truncated / completions}


def grad_norm(model) -> float:
    """L2 norm of every parameter's gradient together (parameters without one count as 0)."""
    norms = [p.grad.detach().float().norm() for p in model.parameters() if p.grad is not None]
    return torch.stack(norms).norm().item() if norms else 0.0
