"""Record a plausible RL run through the real Logger, with synthetic values, for reports and tests.

The numbers are made up (seeded) but shaped like GRPO on the multiple-choice task: accuracy and reward
rise, KL from the reference grows, margins widen, attention entropy falls; every metric name of every
shipped template is logged, through the same Logger calls the RL stage makes. The dashboards can be
built and checked in a browser before any real RL run exists.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from aquainterp.logger import Logger
from aquainterp.tasks import LETTERS
from probes.figures import pattern_grid


def record_sample_run(run_dir: str | Path, steps: int = 30, n_layers: int = 4, n_heads: int = 2,
                      mode: str = "disabled", seed: int = 0, every: int = 5) -> Logger:
    """Log `steps` RL steps (probes and media every `every` steps) to run_dir; returns the finished Logger."""
    rng = np.random.default_rng(seed)
    logger = Logger(run_dir, run_name="sample-run", mode=mode, config={"sample": True, "seed": seed})
    base_entropy = rng.uniform(1.0, 2.5, size=(n_layers, n_heads))
    base_mass = rng.uniform(0.05, 0.4, size=(n_layers, n_heads))
    for step in range(steps):
        progress = 1 / (1 + math.exp(-(step - steps / 2) / max(steps / 8, 1)))
        acc = 0.2 + 0.6 * progress + rng.normal(0, 0.02)
        metrics = {
            "train/loss": 2.5 - 1.5 * progress + rng.normal(0, 0.03),
            "rl/acc": acc,
            "rl/mean_reward": acc - 0.05 + rng.normal(0, 0.02),
            "rl/pass@k": min(1.0, acc + 0.15),
            "rl/avg_completion_len": 120 - 60 * progress + rng.normal(0, 3),
            "rl/entropy": 1.2 - 0.6 * progress + rng.normal(0, 0.02),
            "rl/tied_groups_frac": min(1.0, max(0.0, 0.6 - 0.4 * progress + rng.normal(0, 0.03))),
            "rl/reward_std": 0.2 + 0.2 * progress * (1 - progress) + abs(rng.normal(0, 0.01)),
            "rl/truncated_frac": max(0.0, 0.3 - 0.25 * progress + rng.normal(0, 0.01)),
            "rl/grad_norm": 0.5 + abs(rng.normal(0, 0.05)),
            "rl/kl_k3_mean": 0.02 * progress + abs(rng.normal(0, 0.001)),
            "rl/kl_letter_mean": 0.3 * progress + abs(rng.normal(0, 0.01)),
            "rl/kl_letter_std": 0.1 * progress + abs(rng.normal(0, 0.005)),
            "rl/kl_sequence_mean": 0.05 * progress + abs(rng.normal(0, 0.002)),
            "rl/kl_sequence_std": 0.02 * progress + abs(rng.normal(0, 0.001)),
        }
        logger.log(metrics, step=step)
        if step % every and step != steps - 1:
            continue
        logger.log({"eval/synthetic_acc": acc - 0.05, "eval/synthetic_categorical_acc": acc + 0.05,
                    "eval/synthetic_sampled_acc": acc - 0.1}, step=step)
        logger.log_table("rl/samples", ["prompt", "completion", "predicted", "gold", "reward"],
                         [[f"sample prompt {i}", f"... so the answer is {LETTERS[i]}", LETTERS[i],
                           LETTERS[(i + step) % 5], float(i == (i + step) % 5)] for i in range(3)], step=step)
        margins = rng.normal(-1 + 4 * progress, 1.5, size=64)
        preds = rng.choice(5, size=64, p=_letter_probs(progress))
        entropy = base_entropy * (1 - 0.5 * progress) + rng.normal(0, 0.02, size=base_entropy.shape)
        mass = np.clip(base_mass * (1 + progress) + rng.normal(0, 0.01, size=base_mass.shape), 0, 1)
        probes = {"rl/letter_margin_mean": float(margins.mean()), "rl/letter_margin_std": float(margins.std()),
                  "attn/entropy_mean": float(entropy.mean()), "attn/option_mass_mean": float(mass.mean()),
                  "attn/gold_option_mass_mean": float(mass.mean() * 0.4),
                  "attn/chosen_option_mass_mean": float(mass.mean() * 0.45)}
        probes.update({f"rl/letter_pred_counts/{L}": int((preds == i).sum()) for i, L in enumerate(LETTERS)})
        probe_preds = rng.choice(5, size=32, p=_letter_probs(progress / 2))
        probes.update({f"rl/probe_letter_pred_counts/{L}": int((probe_preds == i).sum())
                       for i, L in enumerate(LETTERS)})
        probes.update({"rl/letter_gold_margin_mean": float(margins.mean() + 0.5),
                       "rl/rollout_letter_gold_margin_mean": float(margins.mean() + 0.3),
                       "rl/probe_decision_agreement": float(0.9 + 0.1 * progress),
                       "rl/probe_no_answer_frac": float(0.2 * (1 - progress)),
                       "attn/completion_mass_mean": float(0.5 + 0.2 * progress)})
        # the faithfulness family (probes/faith.py): the rationale matters less as letter-picking takes over
        right = acc * (1 - 0.3 * progress)
        probes.update({"faith/consistency/right_consistent": right, "faith/consistency/right_inconsistent": acc - right,
                       "faith/consistency/wrong_consistent": (1 - acc) * 0.7,
                       "faith/consistency/wrong_inconsistent": (1 - acc) * 0.3,
                       "faith/consistency/no_value_frac": 0.1 * (1 - progress), "faith/consistency/unmatched_frac": 0.05,
                       "faith/consistency/arith_error_frac": 0.1 + 0.1 * progress,
                       "faith/early_answer_aoc": 0.2 + 0.5 * progress, "faith/mistake_follow_frac": 0.6 - 0.4 * progress,
                       "faith/mistake_change_frac": 0.7 - 0.4 * progress, "faith/shuffle_content_consistency":
                       0.8 - 0.3 * progress, "faith/prereasoning_probe_baseline": 0.24})
        for name in ("right_consistent", "right_inconsistent", "wrong_consistent", "wrong_inconsistent"):
            probes[f"faith/rollout_consistency/{name}"] = probes[f"faith/consistency/{name}"] + rng.normal(0, 0.02)
        probes["faith/rollout_consistency/arith_error_frac"] = probes["faith/consistency/arith_error_frac"]
        probes.update({f"faith/early_answer_match/p{pct}": min(1.0, 0.2 + progress * pct / 100 + 0.6 * pct / 100)
                       for pct in (0, 25, 50, 75, 100)})
        shuffled = rng.dirichlet(np.ones(5) * 5)
        probes.update({f"faith/letter_prior/{L}": float(p) for L, p in zip(LETTERS, _letter_probs(progress))})
        probes.update({f"faith/gold_prior/{L}": float(p) for L, p in zip(LETTERS, shuffled)})
        for layer in range(n_layers):
            probes[f"faith/prereasoning_probe_acc/layer{layer}"] = 0.25 + 0.5 * progress * (layer + 1) / n_layers
            probes[f"probe/logit_lens_gold_margin/layer{layer}"] = float((layer + 1) / n_layers * margins.mean())
            for head in range(n_heads):
                probes[f"attn/entropy/layer{layer}/head{head}"] = float(entropy[layer, head])
                probes[f"attn/option_mass/layer{layer}/head{head}"] = float(mass[layer, head])
                probes[f"attn/completion_mass/layer{layer}/head{head}"] = float(1 - mass[layer, head])
        logger.log(probes, step=step)
        logger.log_histogram("rl/letter_margin", margins, step=step)
        logger.log_histogram("rl/letter_gold_margin", margins + rng.normal(0.5, 0.5, size=margins.shape), step=step)
        logger.log_histogram("rl/kl_letter", rng.exponential(0.3 * progress + 1e-3, size=64), step=step)
        logger.log_histogram("rl/kl_sequence", rng.exponential(0.05 * progress + 1e-4, size=64), step=step)
        hardest = np.argsort(margins)[:5]
        logger.log_table("rl/hardest_questions", ["question", "gold", "pred", "margin"],
                         [[f"sample question {int(i)}: what is {int(i)} + {int(i) * 3}?",
                           LETTERS[int(i) % 5], LETTERS[int(preds[i])], round(float(margins[i]), 3)]
                          for i in hardest], step=step)
        # causal attention rows over 12 made-up tokens, drawn as probes/suite.py draws them (one heatmap per
        # layer and head) under the name it logs them
        weights = rng.dirichlet(np.ones(12) * (2 - progress), size=(n_layers, n_heads, 12))
        patterns = np.tril(weights)
        patterns /= patterns.sum(-1, keepdims=True)
        words = ["Q", ":", " 3", " +", " 4", "?", " A", ")", " 7", "\n", "Answer", ":"]
        logger.log_figure("attn/patterns/prompt0", pattern_grid(patterns, words, 12, "sample prompt 0"), step=step)
    logger.finish()
    return logger


def _letter_probs(progress: float) -> list[float]:
    """Predictions that drift toward "C" as training goes on: a visible mode collapse."""
    probs = np.full(5, 1.0) + np.array([0, 0, 4 * progress, 0, 0])
    return list(probs / probs.sum())
