"""Supervised fine-tuning: whole conversations, one per row, both answer styles, with evaluation.

    python -m training.sft --init-from runs/mid/checkpoints --synthetic 20000 --aqua deepmind/aqua_rat

Each row is one rendered conversation padded to the longest in its micro-batch; only assistant tokens
are targets. nanochat's SFT schedule: learning rates at 2% of base, decaying linearly to zero. Every
--eval-every steps and at the end: categorical accuracy (letter logits after "Answer:") on held-out
synthetic problems (the task's eval split), and on AQuA-RAT when --eval-aqua is given.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from training.common import (
    LearningRates,
    RunSettings,
    claim_run_dir,
    open_logger,
    resolve_flag,
    seed_everything,
    setup_distributed,
    stage_main,
    teardown_distributed,
)
from training.data import ConversationBatches
from training.loop import LoopSpec, train
from training.mid import finetune_setup
from training.mixture import MixtureSettings, build_mixture, mixture_spec


@dataclass
class SFTConfig(MixtureSettings, LearningRates, RunSettings):
    """Every flag of `python -m training.sft` (its own, then the mixture's, the optimizer's and the run's)."""

    init_from: str = "runs/mid/checkpoints"
    run_dir: str = "runs/sft"
    synthetic_seed: int = 1  # MixtureSettings' fields, SFT's defaults
    styles: str = "direct,reasoning"
    device_batch_size: int = 4
    examples_per_step: int = 32
    num_epochs: int = 1
    max_steps: int = -1  # -1: num_epochs passes over the mixture
    init_lr_frac: float = 0.02
    eval_every: int = 100
    eval_synthetic: int = 500  # held-out synthetic problems for categorical accuracy
    eval_aqua: str | None = None  # e.g. deepmind/aqua_rat or a local dev.json


def make_evaluator(config, model, tokenizer):
    """Categorical accuracy on held-out problems, logged as eval/<task>_categorical_acc."""
    from aquainterp.evaluate import evaluate
    from aquainterp.tasks.synthetic import SyntheticTask

    sets = {}
    if config.eval_synthetic > 0:
        sets["synthetic"] = SyntheticTask(seed=config.synthetic_seed, split="eval",
                                           difficulty=config.synthetic_difficulty or None).problems(config.eval_synthetic)
    if config.eval_aqua:
        from aquainterp.tasks.aqua import load_aqua
        from training.overlap import sft_eval_aqua

        # refused, or trimmed with a warning, when the training mixture holds the same problems
        sets["aqua"] = sft_eval_aqua(config, load_aqua(config.eval_aqua, split="validation"))

    def run_eval(step: int) -> dict:
        out = {}
        was_training = model.training
        model.eval()
        for name, problems in sets.items():
            out[f"eval/{name}_categorical_acc"] = evaluate(model, tokenizer, problems, mode="categorical").accuracy
        model.train(was_training)
        return out

    return run_eval


def run(config: SFTConfig) -> dict:
    lock = claim_run_dir(config)  # refuses an earlier run's run_dir (or a running one) before anything is touched
    dist = setup_distributed(config.device)
    try:
        seed_everything(config.seed)
        model, wrapped, tokenizer, optimizers, ckpt_dir, start, position, prev = finetune_setup(config, dist)
        seq_len = model.config.sequence_len
        chats = build_mixture(mixture_spec(config))
        encoded = [tokenizer.render_conversation(c, max_tokens=seq_len) for c in chats]
        batches = ConversationBatches(encoded, config.examples_per_step, config.device_batch_size, dist.rank,
                                      dist.world_size, pad_id=tokenizer.encode_special("<|assistant_end|>"))
        if position is not None:
            batches.load_state(position)
        num_steps = config.max_steps if config.max_steps > 0 else \
            max(1, config.num_epochs * len(chats) // config.examples_per_step)
        bf16 = resolve_flag(config.bf16, dist.device, "bf16")
        logger = open_logger(Path(config.run_dir), config, dist, config.wandb, config.run_name,
                             truncate_from=start + 1 if config.resume else None)  # rows after the checkpoint go
        if dist.is_main:
            print(f"sft: {len(chats):,} conversations, {num_steps} steps of {config.examples_per_step} examples, "
                  f"device {dist.device}" + (f", resuming at step {start}" if start else ""))
        spec = LoopSpec(stage="sft", num_steps=num_steps, ckpt_dir=ckpt_dir, save_every=config.save_every,
                        eval_every=config.eval_every, skip_nonfinite=config.skip_nonfinite, bf16=bf16,
                        momentum_warmup=False,
                        meta={"config": vars(config).copy(), "num_steps": num_steps,
                              "init_from": {"path": config.init_from, "step": prev["step"]}})
        schedule = lambda s: 1.0 - s / num_steps
        try:
            return train(spec, model=wrapped, optimizers=optimizers, batches=batches, lr_multiplier=schedule,
                         dist=dist, logger=logger, start_step=start, tokenizer=tokenizer,
                         evaluate=make_evaluator(config, model, tokenizer))
        finally:
            logger.finish()
    finally:
        teardown_distributed()
        if lock is not None:
            lock.release()


def main(argv: list[str] | None = None) -> None:
    stage_main(run, SFTConfig, __doc__, "training.sft", argv)


if __name__ == "__main__":
    main()
