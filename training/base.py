"""Base pretraining: next-token prediction on packed text, nanochat's recipe.

    python -m training.base --depth 20 --data hf:HuggingFaceFW/fineweb-edu:sample-10BT
    torchrun --nproc_per_node=8 -m training.base --depth 20 ...
    python -m training.base --depth 2 --seq-len 128 --max-steps 200 --device cpu   # toy, synthetic text

Without --max-steps the step count comes from nanochat's Chinchilla rule: tokens = 20 × parameters.
Validation reports bits per byte on held-out documents (the first --val-docs of the source unless
--val-data is given), which, unlike loss, does not depend on the tokenizer's vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from training.common import (
    Dist,
    LearningRates,
    RunSettings,
    all_reduce_sum,
    autocast,
    claim_run_dir,
    clean_stale_temp,
    open_logger,
    resolve_flag,
    resume,
    seed_everything,
    setup_distributed,
    stage_main,
    teardown_distributed,
)
from training.data import PackedBatches, PackedRows, documents, text_encoder
from training.loop import LoopSpec, train
from training.optim import base_momentum, base_weight_decay, build_optimizers, lr_multiplier


@dataclass
class BaseConfig(LearningRates, RunSettings):
    """Every flag of `python -m training.base` (its own, then the optimizer's and the run's, training.common)."""

    run_dir: str = "runs/base"
    tokenizer_dir: str = "runs/tokenizer"
    data: str = "synthetic"
    text_field: str = "text"
    val_data: str | None = None
    val_docs: int = 256
    depth: int = 20
    # nanochat-2026-07 (nanochat HEAD's GPT, the default for new runs) or nanochat-2025-10 (what HF NanoChat
    # and TransformerLens's bridge can represent: pick it when the model is to be exported to HF)
    architecture: str = "nanochat-2026-07"
    aspect_ratio: int = 64
    head_dim: int = 128
    seq_len: int = 2048
    device_batch_size: int = 32
    total_batch_tokens: int = 524288
    max_steps: int = -1  # -1: target_param_data_ratio × params tokens
    target_param_data_ratio: float = 20.0
    warmup_ratio: float = 0.0
    warmdown_ratio: float = 0.2
    final_lr_frac: float = 0.0
    eval_every: int = 250


def build_model(config, vocab_size: int, device):
    from aquainterp.model.gpt import GPT, GPTConfig

    gpt_config = GPTConfig.from_depth(config.depth, vocab_size=vocab_size, sequence_len=config.seq_len,
                                      aspect_ratio=config.aspect_ratio, head_dim=config.head_dim,
                                      architecture=config.architecture)
    with torch.device(device):
        model = GPT(gpt_config)
    model.init_weights()
    return model


def wrap_model(model, dist: Dist, compile_on: bool):
    """torch.compile (by flag) and DDP (under torchrun); checkpoints always see the plain model."""
    if compile_on:
        model = torch.compile(model)
    if dist.enabled:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(model, device_ids=[dist.local_rank] if dist.device.type == "cuda" else None)
    return model


@torch.no_grad()
def evaluate_bpb(model, tokenizer, texts: list[str], seq_len: int, batch_size: int, dist: Dist, bf16: bool) -> float:
    """Bits per byte of `texts`: every token after the first is a target except the BOS separators,
    so the targets spell out exactly the documents' UTF-8 bytes."""
    bos = tokenizer.bos_token_id
    stream: list[int] = []
    for ids in tokenizer.encode_batch(texts):
        stream += [bos, *ids]
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    n_rows = math.ceil((len(stream) - 1) / seq_len)
    stream += [-1] * (n_rows * seq_len + 1 - len(stream))
    s = torch.tensor(stream)
    rows = [i for i in range(n_rows) if i % dist.world_size == dist.rank]
    nats = torch.zeros((), dtype=torch.float64, device=dist.device)
    was_training = model.training
    model.eval()
    for i in range(0, len(rows), batch_size):
        idx = torch.tensor(rows[i:i + batch_size])[:, None] * seq_len + torch.arange(seq_len)
        x, y = s[idx], s[idx + 1].clone()
        y[y == bos] = -1
        x = x.clamp(min=0)  # padding positions are never targets
        with autocast(dist.device, bf16):
            nats += model(x.to(dist.device), y.to(dist.device), loss_reduction="sum").double()
    model.train(was_training)
    all_reduce_sum(nats, dist)
    return nats.item() / (math.log(2) * n_bytes)


def same_source(a: str, b: str) -> bool:
    """Two --data values that name the same documents (the same path, however it is spelled)."""
    if a == b:
        return True
    pa, pb = Path(a), Path(b)
    return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()


def validation_split(config) -> tuple[str, int, str]:
    """(validation source, first training document, what the run validates on, in words). By default the
    first --val-docs documents of --data are held out of training and validate it; a --val-data naming the
    same source as --data is held out the same way (validating on documents it also trains on would read
    training loss as validation)."""
    if config.val_data is None or same_source(config.val_data, config.data):
        note = (f"validation on the first {config.val_docs} documents of --data {config.data}, held out of training "
                f"(training starts at document {config.val_docs})")
        if config.val_data is not None:
            note += "; --val-data names the same source as --data, so it is held out the same way"
        return config.data, config.val_docs, note
    return (config.val_data, 0, f"validation on the first {config.val_docs} documents of --val-data {config.val_data} "
            f"(training reads --data {config.data} from its first document)")


def num_steps_for(config, num_params: int) -> int:
    if config.max_steps > 0:
        return config.max_steps
    return max(1, round(config.target_param_data_ratio * num_params / config.total_batch_tokens))


def run(config: BaseConfig) -> dict:
    """Train (or resume) a base model; returns the final metrics (train/loss, val/bpb, ...)."""
    from aquainterp.tokenizer import Tokenizer

    lock = claim_run_dir(config)  # refuses an earlier run's run_dir (or a running one) before anything is touched
    dist = setup_distributed(config.device)
    try:
        seed_everything(config.seed)
        run_dir, ckpt_dir = Path(config.run_dir), Path(config.run_dir) / "checkpoints"
        tokenizer = Tokenizer.load(config.tokenizer_dir)
        model = build_model(config, tokenizer.vocab_size, dist.device)
        optimizers = build_optimizers(model, d_model=model.config.n_embd, matrix_lr=config.matrix_lr,
                                      embedding_lr=config.embedding_lr, unembedding_lr=config.unembedding_lr,
                                      weight_decay=config.weight_decay, optimizer=config.optimizer)
        recipe = optimizers[0].recipe.name
        if config.total_batch_tokens % config.seq_len:
            raise ValueError(f"--total-batch-tokens {config.total_batch_tokens} is not a multiple of "
                             f"--seq-len {config.seq_len}")
        val_source, train_start, val_note = validation_split(config)
        rows = PackedRows(lambda start: documents(config.data, train_start + start, config.text_field),
                          text_encoder(tokenizer), config.seq_len + 1, name=f"--data {config.data}")
        batches = PackedBatches(rows, config.total_batch_tokens // config.seq_len, config.device_batch_size,
                                dist.rank, dist.world_size)
        val_texts = [t for _, t in zip(range(config.val_docs), documents(val_source, 0, config.text_field))]
        if len(val_texts) < config.val_docs:
            raise ValueError(f"--val-docs {config.val_docs}: the validation source {val_source} holds only "
                             f"{len(val_texts)} documents")
        if dist.is_main:
            print(f"base: {val_note}")
        num_steps = num_steps_for(config, model.num_params())

        clean_stale_temp(ckpt_dir, dist)
        start = 0
        if config.resume:
            restored = resume(ckpt_dir, model, optimizers, dist.device, tokenizer)
            if restored is not None:
                start, meta = restored
                batches.load_state(meta["data_position"])
        bf16 = resolve_flag(config.bf16, dist.device, "bf16")
        wrapped = wrap_model(model, dist, resolve_flag(config.compile, dist.device, "compile"))
        logger = open_logger(run_dir, config, dist, config.wandb, config.run_name,
                             truncate_from=start + 1 if config.resume else None)  # rows after the checkpoint go
        if dist.is_main:
            print(f"base: {model.num_params():,} parameters, {num_steps} steps of {config.total_batch_tokens:,} "
                  f"tokens ({batches.accum} micro-steps × {dist.world_size} processes), device {dist.device}"
                  + (f", resuming at step {start}" if start else ""))

        def evaluate(step: int) -> dict:
            return {"val/bpb": evaluate_bpb(wrapped, tokenizer, val_texts, config.seq_len,
                                            config.device_batch_size, dist, bf16)}

        spec = LoopSpec(stage="base", num_steps=num_steps, ckpt_dir=ckpt_dir, save_every=config.save_every,
                        eval_every=config.eval_every, skip_nonfinite=config.skip_nonfinite, bf16=bf16,
                        momentum=lambda s: base_momentum(s, recipe, num_steps, config.warmdown_ratio),
                        weight_decay=lambda s: base_weight_decay(s, recipe, num_steps),
                        meta={"config": vars(config).copy(), "num_steps": num_steps})
        schedule = lambda s: lr_multiplier(s, num_steps, config.warmup_ratio, config.warmdown_ratio,
                                           config.final_lr_frac)
        try:
            return train(spec, model=wrapped, optimizers=optimizers, batches=batches, lr_multiplier=schedule,
                         dist=dist, logger=logger, start_step=start, tokenizer=tokenizer, evaluate=evaluate)
        finally:
            logger.finish()
    finally:
        teardown_distributed()
        if lock is not None:
            lock.release()


def main(argv: list[str] | None = None) -> None:
    stage_main(run, BaseConfig, __doc__, "training.base", argv)


if __name__ == "__main__":
    main()
