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

Reads top to bottom like nanochat's chat_rl.py: the settings (RLConfig), the setup (problems, the policy
RL starts from), the parts of one step (rollouts, the GRPO update, telemetry and probes, eval), the step
loop (`run` → `_run`), and the command line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as torch_dist

from aquainterp.cli import settings
from aquainterp.cli.args import SEED, Number, count_int, data_source, device_name, existing_path, positive_int
from aquainterp.cli.rundir import output_path
from aquainterp.cli.settings import check_settings, setting
from aquainterp.logger import Logger
from aquainterp.model.engine import Engine
from aquainterp.model.scoring import completion_logits, completion_targets
from aquainterp.tasks import LETTERS, MCProblem, conversation, extract_letter
from probes.suite import DECISIONS, PROBE_NAMES, parse_probes
from training import common
from training.common import Dist
from training.grpo import completion_reward, group_advantages, policy_loss, token_logprobs
from training.optim import apply_schedule, build_optimizers
from training.rl_health import entropy_sum, grad_norm, group_counts, group_metrics

# ------------------------------------------------------------------------------------------ settings


def _existing_dir(text: str) -> str:
    return str(existing_path("dir")(text))


_existing_dir.__name__ = "path"
_LR = Number(float, 0.0, 1e3, lo_open=True)


@dataclass
class RLConfig:
    """Every knob of one RL run, each declared once: `run(RLConfig(...))` is what the demo calls, and the
    command line's flags, their ranges and help are generated from these fields (aquainterp.cli.settings)."""

    # where the policy and the data come from
    task: str = setting("synthetic", "problem source", choices=("synthetic", "aqua"))
    data: str | None = setting(None, "AQuA: local JSON Lines file or hub id (default deepmind/aqua_rat)",
                               type=data_source)
    checkpoint: str | None = setting(None, "SFT checkpoint folder to start from", type=_existing_dir)
    step: int | None = setting(None, "step of --checkpoint (default: latest)", type=count_int())
    depth: int | None = setting(None, "start from a fresh random model of this depth (smoke runs)",
                                type=positive_int(1024))
    difficulty: int | None = setting(None, "synthetic difficulty 1..3 (default: mixed)", type=int, choices=(1, 2, 3))
    skip_bad_rows: bool = setting(False, "AQuA: skip malformed rows (counted) instead of failing")
    eval_examples: int = setting(100, "held-out problems for eval", type=positive_int(1 << 24))
    # rollouts
    max_steps: int = setting(100, "RL steps (one optimizer step per PPO epoch each)", type=positive_int(1 << 30))
    examples_per_step: int = setting(16, "prompts per step, all ranks", type=positive_int(1 << 24))
    num_samples: int = setting(16, "completions per prompt (group size)", type=positive_int(1 << 16))
    max_new_tokens: int = setting(256, "longest completion, in tokens", type=positive_int(1 << 20))
    temperature: float = setting(1.0, "sampling temperature of the rollouts (> 0: greedy samples of a group "
                                      "are identical, so every advantage would be 0)",
                                 type=Number(float, 0.0, 100.0, lo_open=True))
    top_k: int | None = setting(50, "sample from the k most likely tokens (0 = no top-k)",
                                type=count_int(what="0 = no top-k"))
    rollout_prompts: int = setting(16, "prompts decoded together when sampling rollouts (KV cache rows = this "
                                       "x --num-samples)", type=positive_int(1 << 20))
    # reward / loss
    format_reward: float = setting(0.0, "bonus for a finished, parseable answer", type=Number(float, -1e6, 1e6))
    std_normalize: bool = setting(False, "divide advantages by the group std")
    kl_coef: float = setting(0.0, "KL penalty to the frozen pre-RL policy (0 = off)", type=Number(float, 0.0, 1e6))
    ppo_epochs: int = setting(1, "optimizer steps per batch of rollouts", type=positive_int(1 << 16))
    clip_eps: float = setting(0.0, "PPO ratio clip (0 = off, as nanochat)",
                              type=Number(float, 0.0, 1.0, hi_open=True))
    device_batch_size: int = setting(8, "completions (of one prompt) per forward/backward",
                                     type=positive_int(1 << 20))
    # optimizer (nanochat chat_rl defaults)
    matrix_lr: float = setting(0.02, "Muon learning rate of the matrices", type=_LR)
    embedding_lr: float = setting(0.2, "AdamW learning rate of the embedding", type=_LR)
    unembedding_lr: float = setting(0.004, "AdamW learning rate of lm_head", type=_LR)
    weight_decay: float = setting(0.0, "Muon's cautious weight decay (nanochat)", type=Number(float, 0.0, 10.0))
    optimizer: str = setting("auto", "optimizer recipe: auto = the architecture's (training/optim.py)",
                             choices=("auto", "nanochat-2025-10", "nanochat-2026-07"))
    init_lr_frac: float = setting(0.05, "fraction of the base learning rates",
                                  type=Number(float, 0.0, 1.0, lo_open=True))
    # eval / telemetry
    eval_every: int = setting(50, "evaluate every N steps (0 = only before and after)", type=count_int())
    pass_k: int = setting(8, "k of rl/pass@k (recorded in the run config)", type=positive_int(1 << 16))
    eval_temperature: float = setting(1.0, "temperature of the sampled eval (pass@k)",
                                      type=Number(float, 0.0, 100.0))
    probes: tuple[str, ...] = setting((), f"comma list of {','.join(PROBE_NAMES)} ('' or none = off)",
                                      type=parse_probes)
    probe_every: int = setting(10, "run the probes every N steps (0 = only at the end)", type=count_int())
    probe_batch: int = setting(32, "held-out problems in the fixed probe set", type=positive_int(1 << 20))
    probe_decision: str = setting(
        "completion", "where the letter and attention probes read: 'completion' = the answer step of the policy's "
        "own greedy completion (prompt + completion up to 'Answer:'), 'direct' = right after 'Answer:' in a prompt "
        "without rationale (for models trained to answer in one token), 'completion_or_last' = the answer step, "
        "or the completion's last token when it writes no 'Answer:' (counted in rl/probe_last_token_frac: there the "
        "letter logits are a preference after its last token, not a letter it chose)", choices=DECISIONS)
    faith_every: int = setting(1, "the 'faith' probes (is the rationale used? consistency, early answering, an inserted "
                                  "mistake, an option shuffle, a pre-reasoning probe) run on probe steps that are "
                                  "multiples of N (1 = every probe step, 0 = off; rollout consistency is logged every "
                                  "step while they are on)", type=count_int())
    probe_rollouts: int = setting(64, "on probe steps, the letter probes also read this many of the step's "
                                      "sampled completions (rl/rollout_*; 0 = none)", type=count_int())
    patch_every: int = setting(0, "activation-patch the policy's own completion decision every N steps: the same "
                                  "held-out pairs each time (built from its greedy completions, noise on question "
                                  "and options), patch/* metrics for the 'Circuit drift' dashboard (0 = off)",
                               type=count_int())
    patch_pairs: int = setting(8, "held-out problems --patch-every patches", type=positive_int(1 << 16))
    table_every: int = setting(10, "log a table of sampled completions every N steps (0 = none)", type=count_int())
    table_rows: int = setting(8, "rows of that table", type=positive_int(1 << 20))
    # run management
    out: str = setting("runs/rl", "run folder: metrics.jsonl, checkpoints/, summary.json", type=output_path("run"))
    save_every: int = setting(0, "save a checkpoint every N steps (0 = only at the end)", type=count_int())
    resume: bool = setting(False, "continue from the latest checkpoint in --out")
    overwrite: bool = setting(False, "replace the checkpoints and metrics of an earlier run in --out")
    device: str = setting("auto", "auto | cpu | cuda | mps", type=device_name)
    bf16: str = setting("auto", "bf16 autocast (auto = on with a GPU)", choices=("auto", "on", "off"))
    seed: int = setting(0, "seed of sampling, data order and model init", type=SEED)
    wandb: str = setting("disabled", "W&B logging", choices=("online", "offline", "disabled"))
    run_name: str | None = setting(None, "W&B run name")
    progress: bool = setting(True, "no progress bar", flag="--no-progress")

    def validate(self, policy_given: bool = False) -> None:
        """Raise ValueError naming the option for anything that cannot work: each field against its
        declared range and choices (aquainterp.cli.settings), then the rules that tie fields together."""
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ValueError(f"training.rl: {msg}")

        check_settings(self, "training.rl")
        if policy_given:
            need(self.checkpoint is None and self.depth is None,
                 "run(config, policy=...) starts from the given policy; leave --checkpoint and --depth unset")
        else:
            need((self.checkpoint is None) != (self.depth is None),
                 "give exactly one of --checkpoint (start from SFT) or --depth (fresh model)")
        need(self.top_k is None or self.top_k >= 1, f"--top-k must be >= 1 (or 0 on the command line = none), "
                                                    f"got {self.top_k}")
        unknown = [p for p in self.probes if p not in PROBE_NAMES]
        need(not unknown, f"--probes: unknown {unknown}; choose from {','.join(PROBE_NAMES)}")


# ---------------------------------------------------------------------------------------------- data


def load_problems(config: RLConfig) -> tuple[list[MCProblem], list[MCProblem]]:
    """(train pool, held-out eval problems).

    synthetic: the task's train and eval splits (disjoint by construction), seeded by --seed.
    aqua, local file (e.g. the 254-row dev.json): shuffled once with --seed; the first `eval_examples`
    rows (at most half) are held out, RL trains on the rest. aqua, hub id: RL trains on the train split
    and evaluates on the first `eval_examples` rows of the validation split."""
    if config.task == "synthetic":
        from aquainterp.tasks.synthetic import SyntheticTask

        n_train = config.max_steps * config.examples_per_step
        train = SyntheticTask(seed=config.seed, split="train", difficulty=config.difficulty).problems(n_train)
        held = SyntheticTask(seed=config.seed, split="eval", difficulty=config.difficulty).problems(
            config.eval_examples)
        return train, held
    from aquainterp.tasks.aqua import HUB_ID, load_aqua

    source = config.data or HUB_ID
    if not Path(source).exists() and not Path(source).suffix:
        train = load_aqua(source, split="train", skip_bad_rows=config.skip_bad_rows)
        held = load_aqua(source, split="validation", skip_bad_rows=config.skip_bad_rows)[: config.eval_examples]
        return train, held
    rows = list(load_aqua(source, skip_bad_rows=config.skip_bad_rows))
    if len(rows) < 2:
        raise ValueError(f"training.rl: AQuA source {source} has {len(rows)} rows; need at least 2")
    random.Random(config.seed).shuffle(rows)
    n_eval = min(config.eval_examples, len(rows) // 2)
    return rows[n_eval:], rows[:n_eval]


def example_index(step: int, i: int, examples_per_step: int) -> int:
    """Global index of the i-th example of a step in the (cycled) training pool."""
    return step * examples_per_step + i


def sample_seed(seed: int, step: int, global_example: int) -> int:
    """A sampling seed that depends only on (run seed, step, example), never on the rank layout."""
    return (seed * 1_000_003 + step * 10_007 + global_example) % (2**31 - 1)


# ------------------------------------------------------------------------------------- the policy


def start_model(config: RLConfig, train: list[MCProblem], device):
    """(model, tokenizer, source meta) of the policy RL starts from."""
    if config.checkpoint is not None:
        from aquainterp.checkpoints.load import load_model

        model, tokenizer, meta = load_model(config.checkpoint, config.step, device=device)
        if tokenizer is None:
            raise ValueError(f"training.rl: checkpoint {config.checkpoint} has no tokenizer/ folder; RL needs it "
                             "to render prompts")
        return model, tokenizer, {"checkpoint": str(config.checkpoint), "checkpoint_step": meta.get("step")}
    model, tokenizer = build_fresh(config, train, device)
    return model, tokenizer, {"depth": config.depth}


FRESH_VOCAB_SIZE = 1024
FRESH_SEQ_LEN = 1024


def build_fresh(config: RLConfig, train: list[MCProblem], device):
    """A random-init model of --depth and a small tokenizer trained on the task's text (smoke runs)."""
    from aquainterp.model.gpt import GPT, GPTConfig
    from aquainterp.tasks.synthetic import corpus, document
    from aquainterp.tokenizer import Tokenizer

    texts = list(corpus(2000, seed=config.seed)) + [document(p) for p in train[:2000]]
    tokenizer = Tokenizer.train_from_iterator(texts, vocab_size=FRESH_VOCAB_SIZE)
    gpt_config = GPTConfig.from_depth(config.depth, vocab_size=tokenizer.vocab_size, sequence_len=FRESH_SEQ_LEN)
    torch.manual_seed(config.seed)
    with torch.device(device):
        model = GPT(gpt_config)
    model.init_weights()
    return model, tokenizer


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


def sample_rollouts(engine: Engine, tokenizer, problems: list[MCProblem], config: RLConfig, seeds: list[int],
                    stop_tokens) -> list[Rollout]:
    """A group of `num_samples` completions to the "reasoning" prompt of each problem, scored.

    `rollout_prompts` prompts are decoded together (Engine.generate_batch: one decode step serves every
    row). Problem i samples from its own generator, seeded with seeds[i], so its completions do not
    depend on how problems are grouped or sharded over ranks (up to the float rounding of batched
    kernels, which can flip a near-tie)."""
    out = []
    for start in range(0, len(problems), config.rollout_prompts):
        chunk = problems[start : start + config.rollout_prompts]
        prompts = [list(tokenizer.render_for_completion(conversation(p, "reasoning"))) for p in chunk]
        gens = engine.generate_batch(prompts, num_samples=config.num_samples, max_new_tokens=config.max_new_tokens,
                                     temperature=config.temperature, top_k=config.top_k, stop_tokens=stop_tokens,
                                     seeds=seeds[start : start + config.rollout_prompts])
        out.extend(score_rollout(problem, gen, tokenizer, config, stop_tokens) for problem, gen in zip(chunk, gens))
    return out


def score_rollout(problem: MCProblem, gen, tokenizer, config: RLConfig, stop_tokens) -> Rollout:
    """Decode each completion (stop token cut), extract its letter and compute its reward."""
    texts, predicted, rewards = [], [], []
    for comp, done in zip(gen.completions, gen.finished):
        body = comp[:-1] if done and comp and comp[-1] in stop_tokens else comp
        text = tokenizer.decode(body)
        letter = extract_letter(text)
        texts.append(text)
        predicted.append(letter)
        rewards.append(completion_reward(letter, problem.correct, well_formed=done and letter is not None,
                                         format_reward=config.format_reward))
    return Rollout(problem, gen.prompt, [list(c) for c in gen.completions], texts, predicted, rewards,
                   list(gen.finished))


def completion_logprobs(model, prompt: list[int], completions: list[list[int]], pad_id: int, bf16: bool,
                        entropies: list | None = None) -> torch.Tensor:
    """log p(token | prompt, earlier tokens) at temperature 1 for every completion token, [b, longest],
    0 on padding. The prompt runs once (aquainterp.model.scoring.completion_logits). `entropies`: a list that
    gets these tokens' summed policy entropy (training.rl_health.entropy_sum) from the same logits."""
    with common.autocast(model.wte.weight.device, bf16):
        logits, targets = completion_logits(model, prompt, completions, pad_id)
    if entropies is not None:
        entropies.append(entropy_sum(logits, targets))
    return token_logprobs(logits, targets)


def global_sum(value: torch.Tensor, ddp: Dist) -> torch.Tensor:
    """Sum of a small CPU tensor over all ranks (moved to the rank's device for NCCL and back)."""
    return common.all_reduce_sum(value.to(ddp.device), ddp).cpu()


GRAD_BUCKET_BYTES = 64 << 20  # gradients per all-reduce: a few collectives per step, not one per tensor


def gradient_buckets(params, bucket_bytes: int = GRAD_BUCKET_BYTES) -> list[list[torch.Tensor]]:
    """The parameters' gradients grouped in order into buckets of one dtype and device, each at most
    `bucket_bytes` (a single larger tensor gets a bucket of its own)."""
    buckets: list[list[torch.Tensor]] = []
    size = 0
    for p in params:
        g = p.grad
        last = buckets[-1][-1] if buckets else None
        if last is None or (g.dtype, g.device) != (last.dtype, last.device) or size + g.nbytes > bucket_bytes:
            buckets.append([])
            size = 0
        buckets[-1].append(g)
        size += g.nbytes
    return buckets


def sync_gradients(model, ddp: Dist) -> None:
    """Sum gradients over ranks: each rank's loss is already divided by the GLOBAL token count, so the
    sum is the gradient of the whole step's loss (every rank holds the full optimizer, as training.optim).

    Gradients travel flattened in buckets of GRAD_BUCKET_BYTES, as DDP buckets them: at depth 20 that is a
    handful of collectives per step instead of one per parameter tensor."""
    if not ddp.enabled:
        return
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    for bucket in gradient_buckets(params):
        flat = torch.cat([g.reshape(-1) for g in bucket])
        torch_dist.all_reduce(flat, op=torch_dist.ReduceOp.SUM)
        offset = 0
        for g in bucket:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()


def train_on_rollouts(model, optimizers, rollouts: list[Rollout], config: RLConfig, ddp: Dist, pad_id: int,
                      reference=None, step: int = 0, bf16: bool = False, ckpt_dir: Path | None = None
                      ) -> dict[str, float]:
    """PPO epochs over this rank's rollouts; one optimizer step per epoch. Returns global stats.

    Epoch 0 is on-policy (the stored old log-probs come from its own forward, so ratio ≡ 1 and the
    gradient is plain REINFORCE with the group baseline); later epochs reuse the same rollouts with
    the clipped ratio. A non-finite loss stops the run before any optimizer step of that epoch.
    """
    device = ddp.device
    rewards = torch.tensor([r.rewards for r in rollouts], dtype=torch.float32)
    advantages = group_advantages(rewards, std_normalize=config.std_normalize)
    # one micro-batch = up to device_batch_size completions of ONE prompt (the prompt is shared, see
    # completion_logprobs); its mask and advantages, computed once
    chunks = []
    for r, rollout in enumerate(rollouts):
        for i in range(0, len(rollout.completions), config.device_batch_size):
            samples = slice(i, i + config.device_batch_size)
            mask = (completion_targets(rollout.completions[samples]) >= 0).float().to(device)
            chunks.append((rollout, samples, mask, advantages[r, samples].to(device)))
    num_valid = global_sum(torch.tensor(float(sum(chunk[2].sum().item() for chunk in chunks))), ddp).item()
    if num_valid == 0:
        raise RuntimeError("training.rl: no completion tokens in this step on any rank (max_new_tokens?)")

    def logprobs(policy, rollout, samples, entropies=None):
        return completion_logprobs(policy, rollout.prompt, rollout.completions[samples], pad_id, bf16, entropies)

    old, ref = [None] * len(chunks), [None] * len(chunks)
    if reference is not None:
        with torch.no_grad():
            for c, (rollout, samples, _, _) in enumerate(chunks):
                ref[c] = logprobs(reference, rollout, samples)
    totals = torch.zeros(4, dtype=torch.float64)  # loss, pg_sum, kl_sum, clipped
    entropies: list[torch.Tensor] = []  # the sampling policy's (epoch 0), training.rl_health
    for epoch in range(config.ppo_epochs):
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        epoch_loss = 0.0
        for c, (rollout, samples, mask, adv) in enumerate(chunks):
            logp = logprobs(model, rollout, samples, entropies if epoch == 0 else None)
            if epoch == 0:
                old[c] = logp.detach()  # the policy that sampled (up to numerics): ratio ≡ 1 on epoch 0
            loss, stats = policy_loss(logp, old[c], adv, mask, num_valid, clip_eps=config.clip_eps,
                                      ref_logprobs=ref[c], kl_coef=config.kl_coef)
            loss.backward()
            epoch_loss += loss.item()
            if epoch == config.ppo_epochs - 1:
                totals += torch.tensor([0.0, stats.pg_sum, stats.kl_sum, stats.clipped_tokens], dtype=torch.float64)
        totals[0] = epoch_loss
        sync_gradients(model, ddp)
        norm = grad_norm(model)  # the whole step's gradient: summed over ranks, the same on each
        global_loss = global_sum(torch.tensor(epoch_loss, dtype=torch.float64), ddp).item()
        common.check_finite(global_loss, step, skip=False, ckpt_dir=ckpt_dir or Path(config.out) / "checkpoints",
                            grads_ok=common.grads_finite(model))
        for opt in optimizers:
            opt.step()
    totals = global_sum(totals, ddp)
    health = global_sum(torch.cat([group_counts(rewards.tolist(), [r.finished for r in rollouts]),
                                   torch.stack(entropies).sum()[None]]), ddp)
    return {
        **group_metrics(health[:5]),
        "rl/entropy": health[5].item() / num_valid,
        "rl/grad_norm": norm,
        "rl/loss": totals[0].item(),  # of the last PPO epoch
        "rl/kl_k3_mean": totals[2].item() / num_valid,  # k3 estimate of KL(policy || reference)
        "rl/clip_frac": totals[3].item() / num_valid,
        "rl/num_tokens": num_valid,
    }


# ---------------------------------------------------------------------------------------- telemetry


def rollout_consistency(rollouts: list[Rollout], ddp: Dist) -> dict[str, float]:
    """faith/rollout_consistency/*: does each sampled completion's letter follow what its rationale computed
    (probes.consistency; text only, every rollout of every rank)?"""
    from probes.consistency import classify, consistency_counts, consistency_metrics

    readings = [classify(r.problem, text, letter) for r in rollouts for text, letter in zip(r.texts, r.predicted)]
    counts = global_sum(torch.tensor(consistency_counts(readings), dtype=torch.float64), ddp)
    return consistency_metrics(counts.tolist(), prefix="faith/rollout_consistency")


def rollout_metrics(rollouts: list[Rollout], ddp: Dist) -> dict[str, float]:
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
    counts = global_sum(counts, ddp)
    n = counts[8].item()
    out = {"rl/acc": counts[5].item() / n, "rl/mean_reward": counts[6].item() / n,
           "rl/avg_completion_len": counts[7].item() / n}
    for i, letter in enumerate(LETTERS):
        out[f"rl/letter_pred_counts/{letter}"] = counts[i].item()
    return out


def run_probes(suite, logger: Logger, step: int, rollouts: list[Rollout] | None,
               figures: tuple[int, ...] = (), table: bool | None = None, faith: bool | None = None
               ) -> dict[str, float]:
    """Probe metrics on the fixed probe set (rank 0), sequence KL along this step's sampled completions,
    and the letter probes on this step's rollouts (rl/rollout_*; this rank's rollouts).

    The probe set's letter counts are renamed rl/probe_letter_pred_counts/*: the design name
    rl/letter_pred_counts/* is taken by the rollout counts, which are logged every step.
    `figures`: probe prompts whose layer×head attention patterns are logged as figures too.
    `table`: build the hardest-questions table (None = the suite's own cadence, table_every).
    `faith`: run the faith family (None = the suite's own cadence, faith_every; never when that is 0).
    """
    pairs = None
    if rollouts is not None:
        pairs = [(r.prompt, c) for r in rollouts for c in r.completions if c][: suite.kl_sequences]
    metrics = suite.run(step, completions=pairs or None, table=table, rollouts=rollouts, faith=faith)
    metrics = {k.replace("rl/letter_pred_counts/", "rl/probe_letter_pred_counts/"): v for k, v in metrics.items()}
    if metrics:
        logger.log(metrics, step=step)
        suite.log_raw(logger, step, figures=figures)
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


def evaluate_policy(model, tokenizer, problems: list[MCProblem], config: RLConfig) -> dict[str, float]:
    """Held-out eval through aquainterp.evaluate (sharded over ranks, summed): categorical accuracy
    (letter logits at the decision position), generative accuracy (one greedy completion, extracted
    letter), sampled accuracy and pass@k (k samples at eval_temperature, the same seeds at every eval).

    Names: eval/{task}_categorical_acc, eval/{task}_acc, eval/{task}_sampled_acc (task = aqua gives
    the design's eval/aqua_acc and eval/aqua_categorical_acc) and rl/pass@k (k = config pass_k)."""
    from aquainterp.evaluate import categorical_eval, generative_eval

    task = "aqua" if config.task == "aqua" else "synthetic"
    show = config.progress
    cat = categorical_eval(model, tokenizer, problems, batch_size=config.device_batch_size, progress=show)
    greedy = generative_eval(model, tokenizer, problems, num_samples=1, max_new_tokens=config.max_new_tokens,
                             temperature=0.0, progress=show)
    sampled = generative_eval(model, tokenizer, problems, num_samples=config.pass_k,
                              max_new_tokens=config.max_new_tokens, temperature=config.eval_temperature,
                              top_k=config.top_k, seed=sample_seed(config.seed, 0, 0) + 7, progress=show)
    return {**cat.metrics(task), f"eval/{task}_acc": greedy.accuracy,
            f"eval/{task}_sampled_acc": sampled.accuracy, "rl/pass@k": sampled.pass_at[config.pass_k]}


# ---------------------------------------------------------------------------------------------- run


def run(config: RLConfig, policy: tuple | None = None) -> dict:
    """Run GRPO as configured; returns {"before", "after" (eval dicts), "steps", "minutes", "history"}.

    Under torchrun every rank calls this; plain `python` (or the demo) runs one process. `policy` =
    (model, tokenizer) starts from an in-memory model instead of --checkpoint/--depth (the demo hands
    over its freshly trained SFT model this way); RL updates that model in place."""
    config.validate(policy_given=policy is not None)
    lock = common.claim_run_dir(config, config.out, "--out")  # before anything is touched; one writer per --out
    ddp = common.setup_distributed(config.device)
    try:
        return _run(config, ddp, policy)
    finally:
        common.teardown_distributed()
        if lock is not None:
            lock.release()


def _run(config: RLConfig, ddp: Dist, policy: tuple | None = None) -> dict:
    if config.examples_per_step % ddp.world_size:
        raise ValueError(f"training.rl: --examples-per-step {config.examples_per_step} must be divisible by the "
                         f"number of ranks {ddp.world_size}")
    t0 = time.time()
    common.seed_everything(config.seed)
    bf16 = common.resolve_flag(config.bf16, ddp.device, "bf16")
    device = ddp.device
    out = Path(config.out)
    ckpt_dir = out / "checkpoints"
    common.clean_stale_temp(ckpt_dir, ddp)

    train, held_out = load_problems(config)
    from training.overlap import rl_held_out

    held_out = rl_held_out(config, held_out)  # refused or trimmed when the starting checkpoint trained on them
    if policy is not None:
        model, tokenizer = policy
        model.to(device)
        source = {"policy": "in-memory"}
    else:
        model, tokenizer, source = start_model(config, train, device)
    reference = None
    if config.kl_coef > 0 or "kl" in config.probes:
        from probes.reference import freeze_reference

        reference = freeze_reference(model, device)  # the pre-RL policy, before any resume
    optimizers = build_optimizers(model, d_model=model.config.n_embd, matrix_lr=config.matrix_lr,
                                  embedding_lr=config.embedding_lr, unembedding_lr=config.unembedding_lr,
                                  weight_decay=config.weight_decay, init_lr_frac=config.init_lr_frac,
                                  optimizer=config.optimizer)
    start_step, before = 0, None
    resumed = common.resume(ckpt_dir, model, optimizers, device, tokenizer) if config.resume else None
    if resumed is not None:
        start_step, meta = resumed
        before = meta["before"]
        if meta.get("config", {}).get("seed") != config.seed:
            raise ValueError(f"training.rl: --resume from {ckpt_dir} was run with --seed "
                             f"{meta.get('config', {}).get('seed')}, this invocation has {config.seed}")

    engine = Engine(model)
    end_id = tokenizer.encode_special("<|assistant_end|>")
    stop_tokens = {end_id, tokenizer.bos_token_id}
    run_config = {**common.config_dict(config), "world_size": ddp.world_size,
                  **source, "train_pool": len(train), "held_out": len(held_out), "stage": "rl"}
    logger = common.open_logger(out, run_config, ddp, config.wandb, config.run_name,  # on --resume, rows from
                                truncate_from=start_step if config.resume else None)  # start_step on go aside
    suite = None
    if config.probes:
        from probes.suite import ProbeSuite

        suite = ProbeSuite(model, tokenizer, held_out[: config.probe_batch], probes=config.probes,
                           reference_model=reference, batch_size=config.device_batch_size,
                           decision=config.probe_decision, rollout_letters=config.probe_rollouts,
                           max_new_tokens=config.max_new_tokens, progress=config.progress,
                           faith_every=config.faith_every, seed=config.seed)

    patching = None
    if config.patch_every and ddp.is_main:
        from aquainterp.patching.series import TrainingPatcher

        patching = TrainingPatcher(tokenizer, held_out[: config.patch_pairs], max_new_tokens=config.max_new_tokens,
                                   batch_size=max(config.device_batch_size, 64), seed=config.seed)
    if before is None:
        before = evaluate_policy(model, tokenizer, held_out, config)
        logger.log(before, step=0)
    history = []
    progress = common.Progress(start_step, config.max_steps, ddp, "rl", enabled=config.progress)
    for step in range(start_step, config.max_steps):
        if step > 0 and config.eval_every and step % config.eval_every == 0:
            logger.log(evaluate_policy(model, tokenizer, held_out, config), step=step)
        matrix_lr = apply_schedule(optimizers, 1.0 - step / config.max_steps, None)  # nanochat: linear to 0
        mine = [example_index(step, i, config.examples_per_step)
                for i in range(ddp.rank, config.examples_per_step, ddp.world_size)]
        rollouts = sample_rollouts(engine, tokenizer, [train[g % len(train)] for g in mine], config,
                                   [sample_seed(config.seed, step, g) for g in mine], stop_tokens)
        if suite is not None and config.probe_every and step % config.probe_every == 0:
            run_probes(suite, logger, step, rollouts)
        metrics = rollout_metrics(rollouts, ddp)
        if "faith" in config.probes and config.faith_every:
            metrics.update(rollout_consistency(rollouts, ddp))
        metrics.update(train_on_rollouts(model, optimizers, rollouts, config, ddp, end_id, reference, step, bf16,
                                         ckpt_dir))
        metrics["rl/lr"] = matrix_lr
        logger.log(metrics, step=step)
        if patching is not None and step % config.patch_every == 0:
            logger.log(patching(model, step), step=step)
        history.append({"step": step, **metrics})
        if config.table_every and step % config.table_every == 0:
            logger.log_table("rl/samples", ["prompt", "completion", "predicted", "gold", "reward"],
                             table_rows(rollouts, tokenizer, config.table_rows), step=step)
        progress.update(metrics["rl/loss"], metrics["rl/num_tokens"] / progress.tick(), acc=metrics["rl/acc"],
                        reward=metrics["rl/mean_reward"])
        done = step + 1
        if (config.save_every and done % config.save_every == 0) or done == config.max_steps:
            common.save(ckpt_dir, done, model, optimizers, {"stage": "rl", "before": before,
                                                            "config": common.config_dict(config)},
                        ddp, tokenizer=tokenizer)
    progress.close()
    after = evaluate_policy(model, tokenizer, held_out, config)
    logger.log(after, step=config.max_steps)
    if suite is not None:
        # the final table and faith read, whatever max_steps is a multiple of
        run_probes(suite, logger, config.max_steps, None, figures=(0,), table=True, faith=True)
    logger.finish()
    summary = {"before": before, "after": after, "steps": config.max_steps - start_step,
               "minutes": (time.time() - t0) / 60, "history": history}
    if ddp.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "summary.json").write_text(json.dumps({k: v for k, v in summary.items() if k != "history"}, indent=1))
    return summary


# ---------------------------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    settings.add_arguments(parser, RLConfig)


def config_from_args(args: argparse.Namespace) -> RLConfig:
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(RLConfig)}
    if values["top_k"] == 0:  # the command line's "no top-k"
        values["top_k"] = None
    return RLConfig(**values)


def main(argv: list[str] | None = None) -> int:
    from aquainterp.cli.args import OneLineParser, pop_debug
    from aquainterp.cli.main import normalize_flag_spelling

    parser = OneLineParser(prog="python -m training.rl", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    argv, debug = pop_debug(list(sys.argv[1:] if argv is None else argv))
    args = parser.parse_args(normalize_flag_spelling(argv))
    config = config_from_args(args)
    try:
        config.validate()  # combinations of flags: one line, exit 2, before anything runs
    except ValueError as e:
        parser.error(str(e))
    # runtime failures (a corrupt checkpoint, a non-finite loss, ...): one line, exit 1 (common.run_cli)
    summary = common.run_cli(run, config, parser.prog, debug)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({k: v for k, v in summary.items() if k != "history"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
