"""GRPO reinforcement learning on multiple-choice math (synthetic or AQuA-RAT), nanochat's chat_rl made
measurable.

Each step: `examples_per_step` prompts (sharded over ranks), `num_samples` completions each from the
KV-cache Engine, reward = right letter (+ optional format bonus), advantage = reward − group mean
(optionally ÷ std), token-level policy-gradient loss over completion tokens (training/grpo.py), one
optimizer step per PPO epoch (default 1 epoch = on-policy nanochat), learning rate decaying linearly
to 0. Every `eval_every` steps: categorical and generative accuracy plus pass@k on held-out problems.
Probes (probes/) attach through the model's hooks and see a frozen pre-RL reference.

    python -m training.rl --checkpoint runs/sft/checkpoints --task synthetic --max-steps 100
    torchrun --nproc_per_node=2 -m training.rl --depth 2 --task aqua --data ../shared/data/aqua_rat/dev.json

Determinism: every example's sampling seed is a function of (seed, step, global example index), so a
run is reproducible for a seed on CPU, independent of the number of ranks, and `--resume` continues
exactly where the last checkpoint left off.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from aquainterp.checkpoint import latest_step, load_checkpoint, load_optimizers, save_checkpoint
from aquainterp.engine import Engine
from aquainterp.logger import Logger
from aquainterp.tasks import LETTERS, MCProblem, conversation, extract_letter
from training.grpo import completion_reward, group_advantages, pass_at_k, policy_loss, token_logprobs
from training.optim import apply_schedule, build_optimizers

PROBE_NAMES = ("entropy", "option_mass", "margin", "kl", "counts")


@dataclass
class RLConfig:
    """Every knob of one RL run; `run(RLConfig(...))` is what the CLI and the demo call."""

    # where the policy and the data come from
    task: str = "synthetic"  # synthetic | aqua
    data: str | None = None  # AQuA: local JSON Lines path or hub id (default: the hub)
    checkpoint: str | None = None  # SFT checkpoint folder to start from
    step: int | None = None  # which step of --checkpoint (default: latest)
    depth: int | None = None  # fresh random model of this depth (smoke tests only)
    difficulty: int | None = None  # synthetic task difficulty (None = task default)
    eval_examples: int = 100  # held-out problems for eval
    # rollouts
    max_steps: int = 100
    examples_per_step: int = 16
    num_samples: int = 16
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_k: int | None = 50
    # reward / loss
    format_reward: float = 0.0
    std_normalize: bool = False
    kl_coef: float = 0.0
    ppo_epochs: int = 1
    clip_eps: float = 0.0  # 0 = no clipping (nanochat)
    device_batch_size: int = 8  # sequences per forward/backward
    # optimizer (nanochat chat_rl defaults)
    matrix_lr: float = 0.02
    embedding_lr: float = 0.2
    unembedding_lr: float = 0.004
    weight_decay: float = 0.0
    init_lr_frac: float = 0.05
    # eval / telemetry
    eval_every: int = 50
    pass_k: int = 8
    eval_temperature: float = 1.0
    probes: tuple[str, ...] = ()
    probe_every: int = 10
    probe_batch: int = 32
    table_every: int = 10
    table_rows: int = 8
    # run management
    out: str = "runs/rl"
    save_every: int = 0  # 0 = only at the end
    resume: bool = False
    device: str = "auto"
    seed: int = 0
    wandb: str = "disabled"  # online | offline | disabled
    run_name: str | None = None
    progress: bool = True
    extra: dict = field(default_factory=dict)  # free-form notes copied into the run config

    def validate(self) -> None:
        """Raise ValueError naming the option for anything that cannot work."""
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ValueError(f"training.rl: {msg}")

        need(self.task in ("synthetic", "aqua"), f"--task must be synthetic or aqua, got {self.task!r}")
        need((self.checkpoint is None) != (self.depth is None),
             "give exactly one of --checkpoint (start from SFT) or --depth (fresh model)")
        need(self.depth is None or self.depth >= 1, f"--depth must be >= 1, got {self.depth}")
        for name in ("max_steps", "examples_per_step", "num_samples", "max_new_tokens", "ppo_epochs",
                     "device_batch_size", "eval_examples", "pass_k", "probe_batch", "table_rows"):
            need(getattr(self, name) >= 1, f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        for name in ("eval_every", "probe_every", "table_every", "save_every"):
            need(getattr(self, name) >= 0, f"--{name.replace('_', '-')} must be >= 0 (0 = off), got "
                                           f"{getattr(self, name)}")
        need(self.temperature >= 0, f"--temperature must be >= 0, got {self.temperature}")
        need(self.top_k is None or self.top_k >= 1, f"--top-k must be >= 1, got {self.top_k}")
        need(0 <= self.clip_eps < 1, f"--clip-eps must be in [0, 1), got {self.clip_eps}")
        need(self.kl_coef >= 0, f"--kl-coef must be >= 0, got {self.kl_coef}")
        need(math.isfinite(self.format_reward), f"--format-reward must be finite, got {self.format_reward}")
        need(0 < self.init_lr_frac <= 1, f"--init-lr-frac must be in (0, 1], got {self.init_lr_frac}")
        need(self.wandb in ("online", "offline", "disabled"), f"--wandb must be online|offline|disabled, "
                                                              f"got {self.wandb!r}")
        unknown = [p for p in self.probes if p not in PROBE_NAMES]
        need(not unknown, f"--probes: unknown {unknown}; choose from {','.join(PROBE_NAMES)}")


# ---------------------------------------------------------------------------------------------- data


def load_problems(config: RLConfig) -> tuple[list[MCProblem], list[MCProblem]]:
    """(train pool, held-out eval problems). Synthetic: train and eval splits by seed. AQuA: a file or
    hub split, shuffled once with the run seed; the last `eval_examples` rows are held out."""
    if config.task == "synthetic":
        from aquainterp.tasks.synthetic import SyntheticTask

        n_train = config.max_steps * config.examples_per_step
        train = SyntheticTask(seed=config.seed, split="train", difficulty=config.difficulty).problems(n_train)
        held = SyntheticTask(seed=config.seed, split="eval", difficulty=config.difficulty).problems(
            config.eval_examples)
        return train, held
    from aquainterp.tasks.aqua import load_aqua

    rows = load_aqua(config.data) if config.data else load_aqua()
    if len(rows) < 2:
        raise ValueError(f"training.rl: AQuA source {config.data!r} has {len(rows)} rows; need at least 2")
    rows = list(rows)
    random.Random(config.seed).shuffle(rows)
    n_eval = min(config.eval_examples, len(rows) // 2)
    return rows[n_eval:], rows[:n_eval]


def example_index(step: int, i: int, examples_per_step: int) -> int:
    """Global index of the i-th example of a step in the (cycled) training pool."""
    return step * examples_per_step + i


def sample_seed(seed: int, step: int, global_example: int) -> int:
    """A sampling seed that depends only on (run seed, step, example), never on the rank layout."""
    return (seed * 1_000_003 + step * 10_007 + global_example) % (2**31 - 1)


# ------------------------------------------------------------------------------------------ rollouts


@dataclass
class Rollout:
    """One prompt's group of sampled completions and what they earned."""

    problem: MCProblem
    prompt: list[int]
    completions: list[list[int]]
    texts: list[str]
    predicted: list[str | None]
    rewards: list[float]
    finished: list[bool]


def rollout(engine: Engine, tokenizer, problem: MCProblem, config: RLConfig, seed: int, stop_tokens) -> Rollout:
    prompt = tokenizer.render_for_completion(conversation(problem, "reasoning"))
    gen = engine.generate(prompt, num_samples=config.num_samples, max_new_tokens=config.max_new_tokens,
                          temperature=config.temperature, top_k=config.top_k, stop_tokens=stop_tokens, seed=seed)
    texts, predicted, rewards = [], [], []
    for comp, done in zip(gen.completions, gen.finished):
        body = comp[:-1] if done and comp and comp[-1] in stop_tokens else comp
        text = tokenizer.decode(body)
        letter = extract_letter(text)
        texts.append(text)
        predicted.append(letter)
        rewards.append(completion_reward(letter, problem.correct, well_formed=done and letter is not None,
                                         format_reward=config.format_reward))
    return Rollout(problem, prompt, [list(c) for c in gen.completions], texts, predicted, rewards,
                   list(gen.finished))


def pack_sequences(rollouts: list[Rollout], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) [N, T] for every completion: targets are −1 on the prompt and the padding, so
    only sampled completion tokens (stop token included) carry loss."""
    seqs, starts = [], []
    for r in rollouts:
        for comp in r.completions:
            seqs.append(r.prompt + comp)
            starts.append(len(r.prompt) - 1)  # first position whose target is a completion token
    T = max(len(s) for s in seqs) - 1
    inputs = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    targets = torch.full((len(seqs), T), -1, dtype=torch.long)
    for b, (s, start) in enumerate(zip(seqs, starts)):
        ids = torch.tensor(s, dtype=torch.long)
        inputs[b, : len(s) - 1] = ids[:-1]
        targets[b, start : len(s) - 1] = ids[start + 1 :]
    return inputs, targets


# ------------------------------------------------------------------------------------------ training


def sequence_logprobs(model, inputs: torch.Tensor, targets: torch.Tensor, autocast) -> torch.Tensor:
    """Per-token log p(target) [B, T] under `model` at temperature 1 (0 on ignored positions)."""
    with autocast:
        logits = model(inputs)
    return token_logprobs(logits, targets)


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def sync_gradients(model) -> None:
    """Sum gradients over ranks: each rank's loss is already divided by the GLOBAL token count."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    for p in model.parameters():
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)


def train_on_rollouts(model, optimizers, rollouts: list[Rollout], config: RLConfig, device, autocast,
                      pad_id: int, reference=None, step: int = 0) -> dict[str, float]:
    """PPO epochs over this rank's rollouts; one optimizer step per epoch. Returns global stats."""
    inputs, targets = pack_sequences(rollouts, pad_id)
    rewards = torch.tensor([r.rewards for r in rollouts], dtype=torch.float32)
    advantages = group_advantages(rewards, std_normalize=config.std_normalize).flatten()
    mask = (targets >= 0).float()
    num_valid = all_reduce_sum(mask.sum().to(device)).item()
    if num_valid == 0:
        raise RuntimeError("training.rl: no completion tokens in this step on any rank (max_new_tokens?)")
    chunks = [slice(i, i + config.device_batch_size) for i in range(0, inputs.size(0), config.device_batch_size)]
    old, ref = [None] * len(chunks), [None] * len(chunks)
    if reference is not None:
        with torch.no_grad():
            for c, sl in enumerate(chunks):
                ref[c] = sequence_logprobs(reference, inputs[sl].to(device), targets[sl].to(device), autocast)
    totals = torch.zeros(4, dtype=torch.float64)  # loss, pg_sum, kl_sum, clipped
    for epoch in range(config.ppo_epochs):
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        epoch_loss = 0.0
        for c, sl in enumerate(chunks):
            x, y = inputs[sl].to(device), targets[sl].to(device)
            logp = sequence_logprobs(model, x, y, autocast)
            if epoch == 0:
                old[c] = logp.detach()  # the policy that sampled (up to numerics): ratio ≡ 1 on epoch 0
            loss, stats = policy_loss(logp, old[c], advantages[sl].to(device), mask[sl].to(device), num_valid,
                                      clip_eps=config.clip_eps, ref_logprobs=ref[c], kl_coef=config.kl_coef)
            loss.backward()
            epoch_loss += loss.item()
            if epoch == config.ppo_epochs - 1:
                totals += torch.tensor([0.0, stats.pg_sum, stats.kl_sum, stats.clipped_tokens], dtype=torch.float64)
        totals[0] = epoch_loss
        sync_gradients(model)
        global_loss = all_reduce_sum(torch.tensor(epoch_loss, dtype=torch.float64, device=device)).item()
        if not math.isfinite(global_loss):
            raise FloatingPointError(f"training.rl: non-finite loss {global_loss} at step {step} (PPO epoch "
                                     f"{epoch}); stopped before the optimizer step, weights are unchanged")
        for opt in optimizers:
            opt.step()
    totals = all_reduce_sum(totals.to(device)).cpu()
    return {
        "rl/loss": totals[0].item(),
        "rl/kl_penalty_mean": totals[2].item() / num_valid,
        "rl/clip_frac": totals[3].item() / num_valid,
        "rl/num_tokens": num_valid,
    }


# ---------------------------------------------------------------------------------------- telemetry


def rollout_metrics(rollouts: list[Rollout], device) -> dict[str, float]:
    """rl/acc, rl/mean_reward, rl/avg_completion_len, rl/letter_pred_counts/A..E over ALL ranks."""
    counts = torch.zeros(len(LETTERS) + 4, dtype=torch.float64)
    for r in rollouts:
        for letter, reward, comp in zip(r.predicted, r.rewards, r.completions):
            if letter is not None:
                counts[LETTERS.index(letter)] += 1
            counts[5] += float(letter == r.problem.correct)
            counts[6] += reward
            counts[7] += len(comp)
            counts[8] += 1
    counts = all_reduce_sum(counts.to(device)).cpu()
    n = counts[8].item()
    out = {"rl/acc": counts[5].item() / n, "rl/mean_reward": counts[6].item() / n,
           "rl/avg_completion_len": counts[7].item() / n}
    for i, letter in enumerate(LETTERS):
        out[f"rl/letter_pred_counts/{letter}"] = counts[i].item()
    return out


def run_probes(suite, logger: Logger, step: int, rollouts: list[Rollout] | None) -> dict[str, float]:
    """Probe metrics on the fixed probe set (rank 0), sequence KL along this step's sampled completions.

    The probe set's letter counts are renamed rl/probe_letter_pred_counts/*: the design name
    rl/letter_pred_counts/* is taken by the rollout counts, which are logged every step.
    """
    pairs = None
    if rollouts is not None:
        pairs = [(r.prompt, c) for r in rollouts for c in r.completions if c][: suite.kl_sequences]
    metrics = suite.run(step, completions=pairs or None)
    metrics = {k.replace("rl/letter_pred_counts/", "rl/probe_letter_pred_counts/"): v for k, v in metrics.items()}
    if metrics:
        logger.log(metrics, step=step)
        suite.log_raw(logger, step)
    return metrics


def table_rows(rollouts: list[Rollout], tokenizer, n: int) -> list[list]:
    rows = []
    for r in rollouts:
        for text, letter, reward in zip(r.texts, r.predicted, r.rewards):
            if len(rows) >= n:
                return rows
            rows.append([tokenizer.decode(r.prompt), text, letter or "", r.problem.correct, reward])
    return rows


# --------------------------------------------------------------------------------------------- eval


def eval_metric_names(task: str) -> tuple[str, str]:
    """(categorical, generative) metric names: DESIGN's eval/aqua_* for AQuA, eval/* for synthetic."""
    if task == "aqua":
        return "eval/aqua_categorical_acc", "eval/aqua_acc"
    return "eval/categorical_acc", "eval/generative_acc"


@torch.no_grad()
def evaluate_policy(model, engine: Engine, tokenizer, problems: list[MCProblem], config: RLConfig,
                    stop_tokens, device, autocast) -> dict[str, float]:
    """Categorical accuracy (argmax over the five letter logits at the decision position), generative
    accuracy (greedy completion, extracted letter) and pass@k (k samples at eval_temperature) on the
    held-out problems, sharded over ranks and summed."""
    from aquainterp.tasks import decision_prompt

    rank, world = dist_rank_world()
    mine = list(range(rank, len(problems), world))
    counts = torch.zeros(4, dtype=torch.float64)  # categorical hits, generative hits, pass@k sum, n
    for idx in mine:
        problem = problems[idx]
        ids, letter_ids = decision_prompt(tokenizer, problem)
        with autocast:
            logits = model(torch.tensor([ids], dtype=torch.long, device=device))[0, -1].float()
        counts[0] += float(LETTERS[int(logits[letter_ids].argmax())] == problem.correct)
        prompt = tokenizer.render_for_completion(conversation(problem, "reasoning"))
        greedy = engine.generate(prompt, num_samples=1, max_new_tokens=config.max_new_tokens, temperature=0.0,
                                 stop_tokens=stop_tokens)
        counts[1] += float(extract_letter(tokenizer.decode(_strip_stop(greedy.completions[0], stop_tokens)))
                           == problem.correct)
        sampled = engine.generate(prompt, num_samples=config.pass_k, max_new_tokens=config.max_new_tokens,
                                  temperature=config.eval_temperature, top_k=config.top_k, stop_tokens=stop_tokens,
                                  seed=sample_seed(config.seed + 1, 0, idx))
        correct = sum(extract_letter(tokenizer.decode(_strip_stop(c, stop_tokens))) == problem.correct
                      for c in sampled.completions)
        counts[2] += pass_at_k(config.pass_k, correct, config.pass_k)
        counts[3] += 1
    counts = all_reduce_sum(counts.to(device)).cpu()
    n = max(counts[3].item(), 1.0)
    cat_name, gen_name = eval_metric_names(config.task)
    return {cat_name: counts[0].item() / n, gen_name: counts[1].item() / n, "rl/pass@k": counts[2].item() / n}


def _strip_stop(completion: list[int], stop_tokens) -> list[int]:
    return completion[:-1] if completion and completion[-1] in stop_tokens else completion


# ------------------------------------------------------------------------------------ process setup


def dist_rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"training.rl: --device {name} asked for CUDA but torch sees no GPU")
    return device


def setup_distributed(device: torch.device) -> tuple[bool, torch.device]:
    """Join the torchrun process group when WORLD_SIZE > 1 (gloo on CPU, NCCL on GPU).
    Returns (whether this call created the group, the device of this rank)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or (dist.is_available() and dist.is_initialized()):
        return False, device
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return True, device


def autocast_for(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


# ----------------------------------------------------------------------------------- model and data


def build_fresh(config: RLConfig, train: list[MCProblem], device):
    """A random-init model of --depth and a small tokenizer trained on the task's text (smoke runs)."""
    from aquainterp.tokenizer import Tokenizer

    from aquainterp.model import GPT, GPTConfig
    from aquainterp.tasks.synthetic import corpus, document

    texts = list(corpus(2000, seed=config.seed)) + [document(p) for p in train[:2000]]
    tokenizer = Tokenizer.train_from_iterator(texts, vocab_size=FRESH_VOCAB_SIZE)
    gpt_config = GPTConfig.from_depth(config.depth, vocab_size=tokenizer.vocab_size, sequence_len=FRESH_SEQ_LEN)
    torch.manual_seed(config.seed)
    with torch.device(device):
        model = GPT(gpt_config)
    model.init_weights()
    return model, tokenizer


FRESH_VOCAB_SIZE = 1024
FRESH_SEQ_LEN = 1024


def start_model(config: RLConfig, train: list[MCProblem], device):
    """(model, tokenizer, source meta) of the policy RL starts from."""
    if config.checkpoint is not None:
        from aquainterp.checkpoint import load_model

        model, tokenizer, meta = load_model(config.checkpoint, config.step, device=device)
        if tokenizer is None:
            raise ValueError(f"training.rl: checkpoint {config.checkpoint} has no tokenizer/ folder; RL needs it "
                             "to render prompts")
        return model, tokenizer, {"checkpoint": str(config.checkpoint), "checkpoint_step": meta.get("step")}
    model, tokenizer = build_fresh(config, train, device)
    return model, tokenizer, {"depth": config.depth}


# ---------------------------------------------------------------------------------------------- run


def run(config: RLConfig) -> dict:
    """Run GRPO as configured; returns {"before", "after" (eval dicts), "steps", "minutes", "history"}."""
    config.validate()
    device = resolve_device(config.device)
    created_group, device = setup_distributed(device)
    try:
        return _run(config, device)
    finally:
        if created_group:
            dist.destroy_process_group()


def _run(config: RLConfig, device: torch.device) -> dict:
    rank, world = dist_rank_world()
    if config.examples_per_step % world:
        raise ValueError(f"training.rl: --examples-per-step {config.examples_per_step} must be divisible by the "
                         f"number of ranks {world}")
    t0 = time.time()
    random.seed(config.seed)
    torch.manual_seed(config.seed)
    autocast = autocast_for(device)
    out = Path(config.out)
    ckpt_dir = out / "checkpoints"

    train, held_out = load_problems(config)
    model, tokenizer, source = start_model(config, train, device)
    reference = None
    if config.kl_coef > 0 or "kl" in config.probes:
        from probes.reference import freeze_reference

        reference = freeze_reference(model, device)
    optimizers = build_optimizers(model, d_model=model.config.n_embd, matrix_lr=config.matrix_lr,
                                  embedding_lr=config.embedding_lr, unembedding_lr=config.unembedding_lr,
                                  weight_decay=config.weight_decay, init_lr_frac=config.init_lr_frac)
    start_step, before = 0, None
    resume_from = latest_step(ckpt_dir) if config.resume else None
    if resume_from is not None:
        ckpt = load_checkpoint(ckpt_dir, resume_from, device=device)
        model.load_state_dict_checked(ckpt.model_state, str(ckpt.path))
        load_optimizers(optimizers, ckpt)
        start_step, before = ckpt.meta["rl_step"], ckpt.meta["before"]

    engine = Engine(model)
    stop_tokens = {tokenizer.encode_special("<|assistant_end|>"), tokenizer.bos_token_id}
    pad_id = tokenizer.encode_special("<|assistant_end|>")
    run_config = {**dataclasses.asdict(config), "pass@k_k": config.pass_k, "world_size": world, **source,
                  "train_pool": len(train), "held_out": len(held_out), "stage": "rl"}
    logger = Logger(out, run_name=config.run_name, mode=config.wandb, config=run_config, rank=rank)
    suite = None
    if config.probes:
        from probes.suite import ProbeSuite

        suite = ProbeSuite(model, tokenizer, held_out[: config.probe_batch], probes=config.probes,
                           reference_model=reference, batch_size=config.device_batch_size)

    if before is None:
        before = evaluate_policy(model, engine, tokenizer, held_out, config, stop_tokens, device, autocast)
    if start_step == 0:
        logger.log(before, step=0)
    history = []
    bar = tqdm(range(start_step, config.max_steps), desc="rl", disable=rank != 0 or not config.progress,
               initial=start_step, total=config.max_steps)
    last_eval = before
    for step in bar:
        if step > 0 and config.eval_every and step % config.eval_every == 0:
            last_eval = evaluate_policy(model, engine, tokenizer, held_out, config, stop_tokens, device, autocast)
            logger.log(last_eval, step=step)
        matrix_lr = apply_schedule(optimizers, 1.0 - step / config.max_steps, None)  # nanochat: linear to 0
        rollouts = []
        for i in range(rank, config.examples_per_step, world):
            g = example_index(step, i, config.examples_per_step)
            rollouts.append(rollout(engine, tokenizer, train[g % len(train)], config,
                                    sample_seed(config.seed, step, g), stop_tokens))
        if suite is not None and config.probe_every and step % config.probe_every == 0:
            run_probes(suite, logger, step, rollouts)
        metrics = rollout_metrics(rollouts, device)
        stats = train_on_rollouts(model, optimizers, rollouts, config, device, autocast, pad_id, reference, step)
        metrics.update(stats)
        metrics["rl/lr"] = matrix_lr
        logger.log(metrics, step=step)
        history.append({"step": step, **metrics})
        if config.table_every and step % config.table_every == 0:
            logger.log_table("rl/samples", ["prompt", "completion", "predicted", "gold", "reward"],
                             table_rows(rollouts, tokenizer, config.table_rows), step=step)
        bar.set_postfix(acc=f"{metrics['rl/acc']:.3f}", reward=f"{metrics['rl/mean_reward']:.3f}")
        done = step + 1
        if (config.save_every and done % config.save_every == 0) or done == config.max_steps:
            save_rl_checkpoint(ckpt_dir, done, model, optimizers, tokenizer, config, before, rank)
    after = evaluate_policy(model, engine, tokenizer, held_out, config, stop_tokens, device, autocast)
    logger.log(after, step=config.max_steps)
    if suite is not None:
        run_probes(suite, logger, config.max_steps, None)
    logger.finish()
    summary = {"before": before, "after": after, "steps": config.max_steps - start_step,
               "minutes": (time.time() - t0) / 60, "history": history}
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "summary.json").write_text(json.dumps({k: v for k, v in summary.items() if k != "history"}, indent=1))
    return summary


def save_rl_checkpoint(ckpt_dir: Path, step: int, model, optimizers, tokenizer, config: RLConfig, before: dict,
                       rank: int) -> None:
    """Rank 0 writes; everyone waits so no rank races ahead of a checkpoint it may resume from."""
    if rank == 0:
        meta = {"stage": "rl", "rl_step": step, "before": before, "config": dataclasses.asdict(config)}
        save_checkpoint(ckpt_dir, step, model, optimizers, meta, tokenizer=tokenizer)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


# ---------------------------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = RLConfig()
    a = parser.add_argument
    a("--task", choices=("synthetic", "aqua"), default=d.task, help="problem source")
    a("--data", default=None, help="AQuA: local JSON Lines file or hub id (default deepmind/aqua_rat)")
    a("--checkpoint", default=None, help="SFT checkpoint folder to start from")
    a("--step", type=int, default=None, help="step of --checkpoint (default: latest)")
    a("--depth", type=int, default=None, help="start from a fresh random model of this depth (smoke runs)")
    a("--difficulty", type=int, default=None, help="synthetic difficulty 1..3 (default: mixed)")
    a("--eval-examples", type=int, default=d.eval_examples, help="held-out problems for eval")
    a("--max-steps", type=int, default=d.max_steps)
    a("--examples-per-step", type=int, default=d.examples_per_step, help="prompts per step, all ranks")
    a("--num-samples", type=int, default=d.num_samples, help="completions per prompt (group size)")
    a("--max-new-tokens", type=int, default=d.max_new_tokens)
    a("--temperature", type=float, default=d.temperature)
    a("--top-k", type=int, default=d.top_k, help="0 = no top-k")
    a("--format-reward", type=float, default=d.format_reward, help="bonus for a finished, parseable answer")
    a("--std-normalize", action="store_true", help="divide advantages by the group std")
    a("--kl-coef", type=float, default=d.kl_coef, help="KL penalty to the frozen pre-RL policy (0 = off)")
    a("--ppo-epochs", type=int, default=d.ppo_epochs, help="optimizer steps per batch of rollouts")
    a("--clip-eps", type=float, default=d.clip_eps, help="PPO ratio clip (0 = off)")
    a("--device-batch-size", type=int, default=d.device_batch_size, help="sequences per forward/backward")
    a("--matrix-lr", type=float, default=d.matrix_lr)
    a("--embedding-lr", type=float, default=d.embedding_lr)
    a("--unembedding-lr", type=float, default=d.unembedding_lr)
    a("--weight-decay", type=float, default=d.weight_decay)
    a("--init-lr-frac", type=float, default=d.init_lr_frac, help="fraction of the base learning rates")
    a("--eval-every", type=int, default=d.eval_every, help="0 = only before and after")
    a("--pass-k", type=int, default=d.pass_k, help="k of rl/pass@k (recorded in the run config)")
    a("--eval-temperature", type=float, default=d.eval_temperature)
    a("--probes", default="", help=f"comma list of {','.join(PROBE_NAMES)} (empty = off)")
    a("--probe-every", type=int, default=d.probe_every)
    a("--probe-batch", type=int, default=d.probe_batch)
    a("--table-every", type=int, default=d.table_every, help="0 = no sample tables")
    a("--table-rows", type=int, default=d.table_rows)
    a("--out", default=d.out, help="run folder: metrics.jsonl, checkpoints/, summary.json")
    a("--save-every", type=int, default=d.save_every, help="0 = only at the end")
    a("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    a("--device", default=d.device, help="auto | cpu | cuda | cuda:N")
    a("--seed", type=int, default=d.seed)
    a("--wandb", choices=("online", "offline", "disabled"), default=d.wandb)
    a("--run-name", default=None)
    a("--no-progress", action="store_true", help="no progress bar")


def config_from_args(args: argparse.Namespace) -> RLConfig:
    fields = {f.name for f in dataclasses.fields(RLConfig)}
    values = {k: v for k, v in vars(args).items() if k in fields}
    values["probes"] = tuple(p.strip() for p in args.probes.split(",") if p.strip())
    values["top_k"] = None if args.top_k == 0 else args.top_k
    values["progress"] = not args.no_progress
    return RLConfig(**values)


def main(argv: list[str] | None = None) -> int:
    from aquainterp.cli import normalize_flag_spelling

    parser = argparse.ArgumentParser(prog="python -m training.rl", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    args = parser.parse_args(normalize_flag_spelling(list(sys.argv[1:] if argv is None else argv)))
    try:
        summary = run(config_from_args(args))
    except ValueError as e:
        parser.error(str(e))
    if dist_rank_world()[0] == 0:
        print(json.dumps({k: v for k, v in summary.items() if k != "history"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
