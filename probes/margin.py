"""Letter logit margins at the decision position: how sure the model is, and how right.

margin      = top letter logit - runner-up (the seed's definition, >= 0: confidence)
gold_margin = gold letter logit - best other letter (signed: > 0 exactly when the model is right)
Letter ids are the tokens the letters get in that context (aquainterp.tasks.decision_prompt).
"""

from __future__ import annotations

from torch import Tensor


def letter_margins(letters: Tensor, gold: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """letters [N, 5], gold index [N] -> (margin [N], gold_margin [N], predicted index [N])."""
    if letters.ndim != 2 or letters.shape[1] != 5:
        raise ValueError(f"letter_margins: expected [N, 5] letter logits, got {tuple(letters.shape)}")
    top2 = letters.topk(2, dim=-1).values
    margin = top2[:, 0] - top2[:, 1]
    gold_logit = letters.gather(-1, gold[:, None]).squeeze(-1)
    others = letters.scatter(-1, gold[:, None], float("-inf"))
    gold_margin = gold_logit - others.max(-1).values
    return margin, gold_margin, letters.argmax(-1)


def margin_metrics(margin: Tensor, gold_margin: Tensor) -> dict[str, float]:
    """Means and (population) standard deviations under the design's names."""
    return {
        "rl/letter_margin_mean": float(margin.mean()),
        "rl/letter_margin_std": float(margin.std(unbiased=False)),
        "rl/letter_gold_margin_mean": float(gold_margin.mean()),
        "rl/letter_gold_margin_std": float(gold_margin.std(unbiased=False)),
    }
