"""A stage's evaluation set against the data its model trained on: the same problem on both sides is caught.

Problems are compared by content (question and option texts, whitespace and case folded), not by where
they came from, so a file evaluated under one name and trained on under another is still caught. When at
least half of an evaluation set was trained on, the stage refuses to start (the number would measure
recall of the training data, not the skill); a smaller overlap is warned about, names the problems, and
those problems are left out of the evaluation.

    SFT  --eval-aqua against its own training mixture (--aqua, --aqua-split, --aqua-limit)
    RL   its held-out problems against the AQuA rows of the SFT (or mid) checkpoint it starts from
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from aquainterp.tasks import MCProblem

REFUSE_AT = 0.5  # fraction of an evaluation set seen in training from which a stage refuses to start


def problem_key(p: MCProblem) -> tuple[str, ...]:
    """What makes two problems the same: the question and the five option texts, case and spacing folded."""
    fold = lambda text: re.sub(r"\s+", " ", text).strip().lower()
    return (fold(p.question), *(fold(o) for o in p.options))


def check_overlap(eval_set: list[MCProblem], trained: list[MCProblem], eval_what: str, train_what: str,
                  stage: str) -> list[MCProblem]:
    """`eval_set` without the problems `trained` holds; prints a warning naming them, or raises ValueError
    when at least REFUSE_AT of the evaluation set was trained on."""
    seen = {problem_key(p) for p in trained}
    shared = [p for p in eval_set if problem_key(p) in seen]
    if not shared:
        return eval_set
    examples = ", ".join(p.source for p in shared[:3]) + (", ..." if len(shared) > 3 else "")
    what = (f"{stage}: {len(shared)} of the {len(eval_set)} problems of {eval_what} are also in {train_what} "
            f"({examples})")
    if len(shared) >= REFUSE_AT * len(eval_set):
        raise ValueError(f"{what}; accuracy on problems the model trained on measures recall of its training data, "
                         "not the skill. Evaluate on held-out problems (another file, or a hub id's validation "
                         "split) or train without them")
    print(f"warning: {what}; they are left out of the evaluation, which keeps the other "
          f"{len(eval_set) - len(shared)}")
    return [p for p in eval_set if problem_key(p) not in seen]


def sft_eval_aqua(config, eval_set: list[MCProblem]) -> list[MCProblem]:
    """SFT's --eval-aqua problems checked against the AQuA rows of its own training mixture."""
    if not config.aqua:
        return eval_set
    from aquainterp.tasks.aqua import load_aqua

    limit = None if config.aqua_limit < 0 else config.aqua_limit
    trained = load_aqua(config.aqua, split=config.aqua_split)[:limit]
    return check_overlap(eval_set, trained, f"--eval-aqua {config.eval_aqua}",
                         f"the training mixture (--aqua {config.aqua})", "training.sft")


def parent_config(checkpoint, step: int | None = None) -> dict:
    """The stage config a checkpoint folder records (meta.json "config" of the step, default the latest)."""
    from aquainterp.checkpoints.native import META_FILE, latest_step, step_dir

    step = latest_step(checkpoint) if step is None else step
    if step is None:
        return {}
    meta = json.loads((step_dir(checkpoint, step) / META_FILE).read_text(encoding="utf-8"))
    config = meta.get("config")
    return config if isinstance(config, dict) else {}


def rl_held_out(config, held_out: list[MCProblem]) -> list[MCProblem]:
    """RL's held-out problems checked against the AQuA rows the checkpoint it starts from trained on (an SFT
    or mid run's --aqua). Synthetic held-out problems come from the task's eval split, which no stage trains
    on (disjoint by question hash), so only AQuA needs the check."""
    if config.task != "aqua" or config.checkpoint is None:
        return held_out
    parent = parent_config(Path(config.checkpoint), config.step)
    if not parent.get("aqua"):
        return held_out
    from aquainterp.tasks.aqua import load_aqua

    limit = parent.get("aqua_limit", -1)
    trained = load_aqua(parent["aqua"], split=parent.get("aqua_split", "train"))[: None if limit < 0 else limit]
    return check_overlap(held_out, trained, "the RL held-out problems",
                         f"the data of checkpoint {config.checkpoint} (its --aqua {parent['aqua']})", "training.rl")
