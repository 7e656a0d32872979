"""Logit lens on the letter decision: which layer's residual stream already holds the answer.

The residual stream after each block, at the decision position, is read through the model's own
final norm, unembedding and soft-cap (what the last block's output goes through to become logits),
restricted to the five letter tokens. At the last layer this is exactly the model's letter logits; at
earlier layers it says how far the answer has formed. Gold margin = gold letter - best other letter.
"""

from __future__ import annotations

from torch import Tensor


def lens_letter_logits(model, resid: Tensor, letter_ids: Tensor) -> Tensor:
    """resid [B, L, d_model] (each layer's hook_resid_post at the decision), letter_ids [B, 5]
    -> letter logits [B, L, 5] as the model's head would give them from that layer."""
    if resid.ndim != 3 or letter_ids.shape != (resid.shape[0], 5):
        raise ValueError(f"lens_letter_logits: expected resid [B, L, d] and letter_ids [B, 5], got "
                         f"{tuple(resid.shape)} and {tuple(letter_ids.shape)}")
    return model.logits_from_resid(resid, letter_ids)


def gold_margins(letters: Tensor, gold: Tensor) -> Tensor:
    """letters [N, ..., 5], gold [N] -> gold letter minus the best other letter, [N, ...]."""
    index = gold.view(-1, *([1] * (letters.ndim - 1))).expand(*letters.shape[:-1], 1)
    gold_logit = letters.gather(-1, index).squeeze(-1)
    others = letters.scatter(-1, index, float("-inf"))
    return gold_logit - others.max(-1).values


def lens_metrics(margins: Tensor) -> dict[str, float]:
    """margins [N, L] -> probe/logit_lens_gold_margin/layer{l} (mean over problems)."""
    means = margins.mean(0)
    return {f"probe/logit_lens_gold_margin/layer{layer}": float(v) for layer, v in enumerate(means)}
