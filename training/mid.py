"""Mid-training: teach the base model the chat format on a conversation mixture, packed like base.

    python -m training.mid --init-from runs/base/checkpoints --synthetic 20000 \
        --aqua deepmind/aqua_rat --gsm8k openai/gsm8k

Conversations are rendered with Tokenizer.render_conversation and concatenated into rows of
seq_len + 1 tokens; only assistant tokens are targets (the chat mask). Without --max-steps the run is
one pass over the mixture. Learning rates as base, flat then a linear warmdown over the last 20%.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from training.common import (
    LearningRates,
    RunSettings,
    claim_run_dir,
    clean_stale_temp,
    init_from,
    open_logger,
    resolve_flag,
    resume,
    seed_everything,
    setup_distributed,
    stage_main,
    teardown_distributed,
)
from training.data import PackedBatches, PackedRows, conversation_encoder
from training.loop import LoopSpec, train
from training.mixture import MixtureSettings, build_mixture, mixture_spec
from training.optim import build_optimizers, lr_multiplier


@dataclass
class MidConfig(MixtureSettings, LearningRates, RunSettings):
    """Every flag of `python -m training.mid` (its own, then the mixture's, the optimizer's and the run's)."""

    init_from: str = "runs/base/checkpoints"
    run_dir: str = "runs/mid"
    device_batch_size: int = 32
    total_batch_tokens: int = 524288
    max_steps: int = -1  # -1: one pass over the mixture
    init_lr_frac: float = 1.0
    warmdown_ratio: float = 0.2


def finetune_setup(config, dist):
    """Model + tokenizer from --init-from, nanochat's optimizers, and the checkpoint folder (resumed if asked)."""
    from training.base import wrap_model

    model, tokenizer, prev_meta = init_from(Path(config.init_from), dist.device)
    optimizers = build_optimizers(model, d_model=model.config.n_embd, matrix_lr=config.matrix_lr,
                                  embedding_lr=config.embedding_lr, unembedding_lr=config.unembedding_lr,
                                  weight_decay=config.weight_decay, init_lr_frac=config.init_lr_frac,
                                  optimizer=config.optimizer)
    ckpt_dir = Path(config.run_dir) / "checkpoints"
    clean_stale_temp(ckpt_dir, dist)
    start, position = 0, None
    if config.resume:
        restored = resume(ckpt_dir, model, optimizers, dist.device, tokenizer)
        if restored is not None:
            start, position = restored[0], restored[1]["data_position"]
    wrapped = wrap_model(model, dist, resolve_flag(config.compile, dist.device, "compile"))
    return model, wrapped, tokenizer, optimizers, ckpt_dir, start, position, prev_meta


def run(config: MidConfig) -> dict:
    lock = claim_run_dir(config)  # refuses an earlier run's run_dir (or a running one) before anything is touched
    dist = setup_distributed(config.device)
    try:
        seed_everything(config.seed)
        model, wrapped, tokenizer, optimizers, ckpt_dir, start, position, prev = finetune_setup(config, dist)
        seq_len = model.config.sequence_len
        chats = build_mixture(mixture_spec(config))
        encode = conversation_encoder(tokenizer, max_tokens=seq_len)
        if config.total_batch_tokens % seq_len:
            raise ValueError(f"--total-batch-tokens {config.total_batch_tokens} is not a multiple of the model's "
                             f"sequence length {seq_len}")
        total_rows = config.total_batch_tokens // seq_len
        if config.max_steps > 0:
            num_steps = config.max_steps
        else:
            n_tokens = sum(len(ids) for ids, _ in encode(chats))
            num_steps = max(1, n_tokens // config.total_batch_tokens)
        rows = PackedRows(lambda s: (chats[i % len(chats)] for i in range(s, 1 << 62)), encode, seq_len + 1,
                          position, name="mid mixture")
        batches = PackedBatches(rows, total_rows, config.device_batch_size, dist.rank, dist.world_size)
        bf16 = resolve_flag(config.bf16, dist.device, "bf16")
        logger = open_logger(Path(config.run_dir), config, dist, config.wandb, config.run_name,
                             truncate_from=start + 1 if config.resume else None)  # rows after the checkpoint go
        if dist.is_main:
            print(f"mid: {len(chats):,} conversations, {num_steps} steps of {config.total_batch_tokens:,} tokens, "
                  f"device {dist.device}" + (f", resuming at step {start}" if start else ""))
        spec = LoopSpec(stage="mid", num_steps=num_steps, ckpt_dir=ckpt_dir, save_every=config.save_every,
                        skip_nonfinite=config.skip_nonfinite, bf16=bf16,
                        meta={"config": vars(config).copy(), "num_steps": num_steps,
                              "init_from": {"path": config.init_from, "step": prev["step"]}})
        schedule = lambda s: lr_multiplier(s, num_steps, 0.0, config.warmdown_ratio, 0.0)
        try:
            return train(spec, model=wrapped, optimizers=optimizers, batches=batches, lr_multiplier=schedule,
                         dist=dist, logger=logger, start_step=start, tokenizer=tokenizer)
        finally:
            logger.finish()
    finally:
        teardown_distributed()
        if lock is not None:
            lock.release()


def main(argv: list[str] | None = None) -> None:
    stage_main(run, MidConfig, __doc__, "training.mid", argv)


if __name__ == "__main__":
    main()
