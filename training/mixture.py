"""Conversation mixtures for mid-training and SFT: synthetic, AQuA-RAT and GSM8K rows as chats.

Multiple-choice rows (synthetic, AQuA) become aquainterp.tasks conversations; the styles given are
used in turn, row i getting styles[i % len(styles)], so SFT sees both "direct" (the letter only) and
"reasoning" (rationale, then the letter). GSM8K rows have no options: the user asks the question and
the assistant gives the worked solution and "Answer: <number>". The list is shuffled with the seed,
so a mixture is a deterministic function of its flags.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from aquainterp.tasks.chat import STYLES


@dataclass
class MixtureSpec:
    synthetic: int = 0  # number of synthetic train problems
    synthetic_seed: int = 0
    synthetic_difficulty: int | None = None  # 1-3, or None for the task's mix
    aqua: str | None = None  # hub id or local JSON Lines path
    aqua_split: str = "train"
    aqua_limit: int | None = None
    gsm8k: str | None = None
    gsm8k_split: str = "train"
    gsm8k_limit: int | None = None
    styles: tuple[str, ...] = STYLES
    seed: int = 0


@dataclass
class MixtureSettings:
    """The conversation-mixture settings of mid-training and SFT as flags (-1 limit = all rows, difficulty
    0 = the task's mix, styles a comma list); mixture_spec turns them into a MixtureSpec."""

    synthetic: int = 20000
    synthetic_seed: int = 0
    synthetic_difficulty: int = 0  # 1-3 for train (and SFT's eval) problems; 0 = the task's mix of levels
    aqua: str | None = None
    aqua_split: str = "train"
    aqua_limit: int = -1
    gsm8k: str | None = None
    gsm8k_split: str = "train"
    gsm8k_limit: int = -1
    styles: str = "reasoning,direct"


def mixture_spec(config) -> MixtureSpec:
    """A stage config's MixtureSettings (and its seed) as the MixtureSpec build_mixture takes."""
    return MixtureSpec(synthetic=config.synthetic, synthetic_seed=config.synthetic_seed,
                       synthetic_difficulty=config.synthetic_difficulty or None, aqua=config.aqua,
                       aqua_split=config.aqua_split, aqua_limit=None if config.aqua_limit < 0 else config.aqua_limit,
                       gsm8k=config.gsm8k, gsm8k_split=config.gsm8k_split,
                       gsm8k_limit=None if config.gsm8k_limit < 0 else config.gsm8k_limit,
                       styles=parse_styles(config.styles), seed=config.seed)


def gsm8k_conversation(problem) -> dict:
    return {"messages": [{"role": "user", "content": problem.question},
                         {"role": "assistant", "content": f"{problem.solution}\nAnswer: {problem.answer}"}]}


def parse_styles(text: str) -> tuple[str, ...]:
    styles = tuple(s.strip() for s in text.split(",") if s.strip())
    bad = [s for s in styles if s not in STYLES]
    if bad or not styles:
        raise ValueError(f"--styles: expected a comma list of {STYLES}, got {text!r}")
    return styles


def build_mixture(spec: MixtureSpec) -> list[dict]:
    """The shuffled list of conversations; a summary of its sources goes with each run's meta."""
    from aquainterp.tasks.chat import conversation

    chats: list[dict] = []
    problems = []
    if spec.synthetic:
        from aquainterp.tasks.synthetic import SyntheticTask

        problems += SyntheticTask(seed=spec.synthetic_seed, split="train",
                                  difficulty=spec.synthetic_difficulty).problems(spec.synthetic)
    if spec.aqua:
        from aquainterp.tasks.aqua import load_aqua

        problems += load_aqua(spec.aqua, split=spec.aqua_split)[: spec.aqua_limit]
    for i, p in enumerate(problems):
        chats.append(conversation(p, spec.styles[i % len(spec.styles)]))
    if spec.gsm8k:
        from aquainterp.tasks.gsm8k import load_gsm8k

        chats += [gsm8k_conversation(p) for p in load_gsm8k(spec.gsm8k, split=spec.gsm8k_split)[: spec.gsm8k_limit]]
    if not chats:
        raise ValueError("the conversation mixture is empty: give --synthetic N, --aqua SOURCE or --gsm8k SOURCE")
    random.Random(spec.seed).shuffle(chats)
    return chats
