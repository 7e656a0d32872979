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
    claim_run_dir,
    clean_stale_temp,
    init_from,
    open_logger,
    parse_config,
    resolve_flag,
    resume,
    run_cli,
    seed_everything,
    setup_distributed,
    teardown_distributed,
)
from training.data import PackedBatches, PackedRows, conversation_encoder
from training.loop import LoopSpec, train
from training.mixture import MixtureSpec, build_mixture, parse_styles
from training.optim import build_optimizers, lr_multiplier


@dataclass
class MidConfig:
    init_from: str = "runs/base/checkpoints"
    run_dir: str = "runs/mid"
    synthetic: int = 20000
    synthetic_seed: int = 0
    synthetic_difficulty: int = 0  # 1-3; 0 = the task's mix of levels
    aqua: str | None = None
    aqua_split: str = "train"
    aqua_limit: int = -1
    gsm8k: str | None = None
    gsm8k_split: str = "train"
    gsm8k_limit: int = -1
    styles: str = "reasoning,direct"
    device_batch_size: int = 32
    total_batch_tokens: int = 524288
    max_steps: int = -1  # -1: one pass over the mixture
    matrix_lr: float = 0.02
    embedding_lr: float = 0.2
    unembedding_lr: float = 0.004
    weight_decay: float = 0.0
    init_lr_frac: float = 1.0
    warmdown_ratio: float = 0.2
    save_every: int = 1000
    device: str = "auto"
    bf16: str = "auto"
    compile: str = "auto"
    seed: int = 42
    resume: bool = False
    overwrite: bool = False  # replace an earlier run's checkpoints + metrics in run_dir
    skip_nonfinite: bool = False
    wandb: str = "disabled"
    run_name: str | None = None


def mixture_spec(config) -> MixtureSpec:
    return MixtureSpec(synthetic=config.synthetic, synthetic_seed=config.synthetic_seed,
                       synthetic_difficulty=config.synthetic_difficulty or None, aqua=config.aqua,
                       aqua_split=config.aqua_split, aqua_limit=None if config.aqua_limit < 0 else config.aqua_limit,
                       gsm8k=config.gsm8k, gsm8k_split=config.gsm8k_split,
                       gsm8k_limit=None if config.gsm8k_limit < 0 else config.gsm8k_limit,
                       styles=parse_styles(config.styles), seed=config.seed)


def finetune_setup(config, dist):
    """Model + tokenizer from --init-from, nanochat's optimizers, and the checkpoint folder (resumed if asked)."""
    from training.base import wrap_model

    model, tokenizer, prev_meta = init_from(Path(config.init_from), dist.device)
    optimizers = build_optimizers(model, d_model=model.config.n_embd, matrix_lr=config.matrix_lr,
                                  embedding_lr=config.embedding_lr, unembedding_lr=config.unembedding_lr,
                                  weight_decay=config.weight_decay, init_lr_frac=config.init_lr_frac)
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
    claim_run_dir(config)  # refuses an earlier run's run_dir before anything is touched
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
        logger = open_logger(Path(config.run_dir), config, dist, config.wandb, config.run_name)
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


def main(argv: list[str] | None = None) -> None:
    run_cli(run, parse_config(MidConfig, argv, __doc__.split("\n")[0], prog="python -m training.mid"),
            "python -m training.mid")


if __name__ == "__main__":
    main()
