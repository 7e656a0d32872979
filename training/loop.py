"""The optimisation loop that base, mid and SFT share; they differ in data, schedule and evaluation.

One step: set the scheduled learning rates (and Muon momentum), take this rank's micro-batches,
count the trained-on targets over the whole global batch (all ranks), then for each micro-batch
backpropagate sum-of-nats × world_size / global_count. With DDP averaging gradients over ranks, the
gradient is exactly the mean loss over every target of the global batch, however the batch is split
into processes and micro-batches (so 2 processes == 1 process). Then check the loss is finite, step
the optimizers, log, and checkpoint every `save_every` steps and at the end.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from training.common import Dist, Progress, all_reduce_sum, autocast, check_finite, grads_finite, save
from training.optim import apply_schedule, muon_momentum


@dataclass
class LoopSpec:
    stage: str
    num_steps: int
    ckpt_dir: Path
    save_every: int
    eval_every: int = 0  # 0: only at the end
    skip_nonfinite: bool = False
    bf16: bool = False
    momentum_warmup: bool = True
    # base training's own Muon momentum and weight decay schedules (training.optim.base_*), None = the defaults
    momentum: Callable[[int], float] | None = None
    weight_decay: Callable[[int], float] | None = None
    meta: dict = field(default_factory=dict)  # stored in each checkpoint (config, sources, ...)


def train(spec: LoopSpec, *, model, optimizers: list, batches, lr_multiplier: Callable[[int], float],
          dist: Dist, logger, start_step: int = 0, tokenizer=None,
          evaluate: Callable[[int], dict] | None = None) -> dict:
    """Run steps start_step+1 .. num_steps (step s = s updates done). Returns the last logged metrics."""
    progress = Progress(start_step, spec.num_steps, dist, spec.stage)
    last: dict = {}
    ddp = dist.enabled
    try:
        for step in range(start_step, spec.num_steps):
            lrm = lr_multiplier(step)
            momentum = spec.momentum or (muon_momentum if spec.momentum_warmup else None)
            lr = apply_schedule(optimizers, lrm, momentum(step) if momentum else None,
                                spec.weight_decay(step) if spec.weight_decay else None)
            micro = batches.next_step(dist.device)
            counts = torch.tensor([sum(int((y != -1).sum()) for _, y in micro),
                                   sum(x.numel() for x, _ in micro)], dtype=torch.float64, device=dist.device)
            all_reduce_sum(counts, dist)
            n_targets, n_tokens = counts.tolist()
            if n_targets == 0:
                raise ValueError(f"{spec.stage} step {step + 1}: the global batch has no target tokens (all masked); "
                                 "conversations longer than the sequence length lose their assistant part")
            nats = torch.zeros((), dtype=torch.float64, device=dist.device)
            for i, (x, y) in enumerate(micro):
                sync = contextlib.nullcontext() if not ddp or i == len(micro) - 1 else model.no_sync()
                with sync:
                    with autocast(dist.device, spec.bf16):
                        loss_sum = model(x, y, loss_reduction="sum")
                    (loss_sum * (dist.world_size / n_targets)).backward()
                nats += loss_sum.detach().double()
            all_reduce_sum(nats, dist)
            loss = (nats / n_targets).item()
            applied = check_finite(loss, step + 1, spec.skip_nonfinite, spec.ckpt_dir, grads_finite(model))
            if applied:
                for opt in optimizers:
                    opt.step()
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
            done = step + 1
            dt = progress.tick()
            last = {"train/loss": loss, "train/lr": lr, "train/lrm": lrm, "train/tokens_per_sec": n_tokens / dt}
            if not applied:
                last["train/skipped_nonfinite"] = 1
            at_end = done == spec.num_steps
            if evaluate is not None and (at_end or (spec.eval_every and done % spec.eval_every == 0)):
                last.update(evaluate(done))
            logger.log(last, step=done)
            progress.update(loss, n_tokens / dt, lr=lr)
            if at_end or (spec.save_every and done % spec.save_every == 0):
                save(spec.ckpt_dir, done, model, optimizers,
                     {**spec.meta, "stage": spec.stage, "data_position": batches.state()}, dist, tokenizer)
            progress.tick()  # evaluation and checkpoint time do not count against the next step's tokens/s
    finally:
        progress.close()
    return last
