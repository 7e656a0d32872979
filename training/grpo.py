"""The pure math of GRPO: rewards, group advantages, the token-level policy-gradient loss.

Kept apart from the RL loop so every formula can be checked against a closed form on a toy policy
(tests/test_grpo.py). Defaults are nanochat's chat_rl: advantage = reward − group mean, one on-policy
epoch (ratio ≡ 1, so clipping never bites), no KL term. PPO clipping and a KL penalty to a frozen
reference are opt-in.

Shapes: `logprobs`, `old_logprobs`, `ref_logprobs`, `mask` are [B, T] (one row per sampled completion,
T = padded sequence length); `advantages` is [B] (one per completion, broadcast over its tokens).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def completion_reward(predicted: str | None, gold: str, well_formed: bool, format_reward: float = 0.0) -> float:
    """1 for the right letter, else 0; plus `format_reward` when the completion is well formed.

    "Well formed" is decided by the caller (an answer letter was found and the sample ended with the
    stop token). With format_reward = 0 (the default) the reward is pure correctness, as nanochat's.
    """
    if gold not in ("A", "B", "C", "D", "E"):
        raise ValueError(f"completion_reward: gold letter must be one of A..E, got {gold!r}")
    if not math.isfinite(format_reward):
        raise ValueError(f"completion_reward: format_reward must be finite, got {format_reward}")
    return float(predicted == gold) + (format_reward if well_formed else 0.0)


def group_advantages(rewards: torch.Tensor, std_normalize: bool = False, eps: float = 1e-6) -> torch.Tensor:
    """Advantage of each sample relative to its group: r − mean(group), optionally ÷ (std(group) + eps).

    rewards: [num_groups, group_size]. A group whose samples all got the same reward has advantage 0
    everywhere (nothing to learn from it), with or without std normalisation.
    """
    if rewards.dim() != 2 or rewards.size(1) < 1:
        raise ValueError(f"group_advantages: rewards must be [num_groups, group_size], got {tuple(rewards.shape)}")
    rewards = rewards.float()
    adv = rewards - rewards.mean(dim=1, keepdim=True)
    if std_normalize:
        # population std (unbiased=False) so a group of size 1 gives 0/eps = 0, not NaN
        adv = adv / (rewards.std(dim=1, keepdim=True, unbiased=False) + eps)
    return adv


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) per position at temperature 1; 0 where target == -1 (prompt or padding).

    logits: [B, T, V] (fp32 preferred), targets: [B, T] with -1 for ignored positions.
    """
    if logits.shape[:2] != targets.shape:
        raise ValueError(f"token_logprobs: logits {tuple(logits.shape)} and targets {tuple(targets.shape)} disagree")
    # cross_entropy with ignore_index is −log p without materialising a second [B, T, V] tensor
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 -> fp32, fp64 stays
    nll = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1, reduction="none")
    return -nll.view_as(targets)


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token KL(π || π_ref) estimate on samples from π: exp(d) − d − 1 with d = log π_ref − log π.

    Schulman's "k3" estimator (used by the GRPO paper): unbiased, never negative, exactly 0 where
    the two policies agree, and its gradient at π = π_ref is 0.
    """
    d = ref_logprobs - logprobs
    return torch.exp(d) - d - 1.0


@dataclass
class LossStats:
    """Detached diagnostics of one policy_loss call (sums over valid tokens, to be reduced by the caller)."""

    pg_sum: float  # Σ of the per-token policy-gradient objective terms (before the minus sign)
    kl_sum: float  # Σ of per-token k3 KL (0 without a reference)
    clipped_tokens: float  # number of valid tokens where the clipped branch was taken
    ratio_max: float  # largest |ratio − 1| over valid tokens


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    num_valid_tokens: float,
    clip_eps: float = 0.0,
    ref_logprobs: torch.Tensor | None = None,
    kl_coef: float = 0.0,
) -> tuple[torch.Tensor, LossStats]:
    """Token-level GRPO loss, summed over this batch's valid tokens and divided by `num_valid_tokens`.

        loss = −(1/N) Σ_{b,t valid} [ min(ρ A_b, clip(ρ, 1−ε, 1+ε) A_b) − β KL_k3(b,t) ]
        ρ = exp(log π − log π_old)

    N (`num_valid_tokens`) is the count over the WHOLE step's batch (all micro-batches, all ranks), so
    micro-batches and ranks can each call this on their slice and the summed gradients equal one call
    on everything. With clip_eps = 0 there is no clipping: the gradient is −(1/N) Σ A ∇log π, which on
    the first epoch (π = π_old) is nanochat's REINFORCE-with-group-baseline.
    """
    if not (logprobs.shape == old_logprobs.shape == mask.shape):
        raise ValueError(
            f"policy_loss: logprobs {tuple(logprobs.shape)}, old_logprobs {tuple(old_logprobs.shape)} "
            f"and mask {tuple(mask.shape)} must have the same [B, T] shape"
        )
    if advantages.shape != logprobs.shape[:1]:
        raise ValueError(f"policy_loss: advantages must be [B]={logprobs.shape[0]}, got {tuple(advantages.shape)}")
    if num_valid_tokens <= 0:
        raise ValueError(f"policy_loss: num_valid_tokens must be > 0, got {num_valid_tokens}")
    if clip_eps < 0:
        raise ValueError(f"policy_loss: clip_eps must be >= 0 (0 = no clipping), got {clip_eps}")
    if kl_coef < 0:
        raise ValueError(f"policy_loss: kl_coef must be >= 0, got {kl_coef}")
    if kl_coef > 0 and ref_logprobs is None:
        raise ValueError("policy_loss: kl_coef > 0 needs ref_logprobs from the frozen reference model")

    mask = mask.to(logprobs.dtype)
    adv = advantages.to(logprobs.dtype).unsqueeze(1)
    ratio = torch.exp(logprobs - old_logprobs.detach())
    unclipped = ratio * adv
    if clip_eps > 0:
        clipped = torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * adv
        objective = torch.minimum(unclipped, clipped)
        took_clip = (clipped < unclipped) & (mask > 0)
    else:
        objective = unclipped
        took_clip = torch.zeros_like(mask, dtype=torch.bool)
    pg_sum = (objective * mask).sum()
    total = -pg_sum
    kl_sum = torch.zeros((), dtype=logprobs.dtype, device=logprobs.device)
    if ref_logprobs is not None:
        kl_sum = (kl_k3(logprobs, ref_logprobs.detach()) * mask).sum()
        if kl_coef > 0:
            total = total + kl_coef * kl_sum
    loss = total / num_valid_tokens
    valid = mask > 0
    ratio_dev = (ratio.detach() - 1.0).abs()[valid]
    stats = LossStats(
        pg_sum=float(pg_sum.detach()),
        kl_sum=float(kl_sum.detach()),
        clipped_tokens=float(took_clip.sum()),
        ratio_max=float(ratio_dev.max()) if ratio_dev.numel() else 0.0,
    )
    return loss, stats
