"""KL drift from the frozen pre-RL policy: KL(policy || reference), the direction RL penalties use.

Letter KL compares the two five-letter distributions at the decision position (softmax over the
letter logits only). Sequence KL is exact over the full vocabulary at every position of a completion
fed to both models (teacher forcing), averaged over the completion's tokens.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def kl_from_logits(policy_logits: Tensor, reference_logits: Tensor) -> Tensor:
    """KL(softmax(policy) || softmax(reference)) over the last dim; identical inputs give exactly 0."""
    if policy_logits.shape != reference_logits.shape:
        raise ValueError(f"kl_from_logits: shapes differ, policy {tuple(policy_logits.shape)} "
                         f"vs reference {tuple(reference_logits.shape)}")
    logp = F.log_softmax(policy_logits.float(), dim=-1)
    logq = F.log_softmax(reference_logits.float(), dim=-1)
    return (logp.exp() * (logp - logq)).sum(-1)


def sequence_kl(policy_logits: Tensor, reference_logits: Tensor, mask: Tensor) -> Tensor:
    """Per-sequence mean of the per-token full-vocab KL over positions where mask is true.

    logits [B, T, V], mask [B, T] (the positions whose next token is a completion token) -> [B].
    """
    if mask.shape != policy_logits.shape[:2]:
        raise ValueError(f"sequence_kl: mask {tuple(mask.shape)} does not match logits "
                         f"{tuple(policy_logits.shape[:2])}")
    counts = mask.sum(-1)
    if (counts == 0).any():
        raise ValueError("sequence_kl: a sequence has no completion positions (empty completion)")
    per_token = kl_from_logits(policy_logits, reference_logits) * mask
    return per_token.sum(-1) / counts


def kl_metrics(values: Tensor, name: str) -> dict[str, float]:
    """`rl/{name}_mean|std` (population std)."""
    return {f"rl/{name}_mean": float(values.mean()), f"rl/{name}_std": float(values.std(unbiased=False))}
