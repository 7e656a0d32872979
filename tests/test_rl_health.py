"""GRPO health metrics (training/rl_health.py) on hand-made batches whose values are known, and what
train_on_rollouts logs from them."""

import math

import pytest
import torch
from torch import nn

from aquainterp.model.gpt import GPT, GPTConfig
from aquainterp.tasks import MCProblem
from training import rl
from training.common import Dist
from training.optim import build_optimizers
from training.rl_health import entropy_sum, grad_norm, group_counts, group_metrics

CPU = Dist(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
PROBLEM = MCProblem("1+1?", ("1", "2", "3", "4", "5"), "1+1 = 2", "B", "test:0")


def test_entropy_of_known_distributions():
    # row 0: uniform over 4 tokens (ln 4), a near-one-hot (~0), then padding; row 1: two equal logits of 4
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [50.0, 0.0, 0.0, 0.0], [9.0, 1.0, 2.0, 3.0]],
                           [[0.0, 0.0, -1e4, -1e4], [1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 0.0, 0.0]]])
    targets = torch.tensor([[1, 0, -1], [2, -1, -1]])
    assert entropy_sum(logits, targets).item() == pytest.approx(math.log(4) + math.log(2), abs=1e-6)
    assert entropy_sum(logits, torch.full((2, 3), -1)).item() == 0.0


def test_group_counts_ties_std_truncation():
    rewards = [[1.0, 1.0, 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0], [1.0]]
    finished = [[True, True, False], [True, True, True], [False, False, True], [True]]
    counts = group_counts(rewards, finished)
    assert counts.tolist() == pytest.approx([3, math.sqrt(2 / 9), 4, 3, 10])
    metrics = group_metrics(counts + counts)  # two ranks with the same rollouts: same fractions
    assert metrics == pytest.approx({"rl/tied_groups_frac": 0.75, "rl/reward_std": math.sqrt(2 / 9) / 4,
                                     "rl/truncated_frac": 0.3})


def test_grad_norm_of_known_gradients():
    model = nn.Sequential(nn.Linear(2, 1, bias=False), nn.Linear(1, 1, bias=False), nn.Linear(3, 3))
    model[0].weight.grad = torch.tensor([[3.0, 0.0]])
    model[1].weight.grad = torch.tensor([[4.0]])  # model[2] has no gradient: counts as 0
    assert grad_norm(model) == pytest.approx(5.0)


def _tiny_gpt(vocab=32):
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_depth(1, vocab_size=vocab, sequence_len=64))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 1.0 if p is model.wte.weight else p.shape[-1] ** -0.5)
    return model


def test_train_on_rollouts_logs_the_health_of_its_batch():
    """Two prompts: one group tied (all reward 0, one truncated), one mixed. Entropy and gradient norm
    equal an independent computation: the plain forward of each prompt + completion, and the gradient
    of the same GRPO loss written out by hand."""
    model = _tiny_gpt()
    prompts = [[1, 2, 3], [4, 5]]
    completions = [[[6, 7], [8, 9, 10], [17]], [[11], [12, 13], [14, 15, 16]]]
    rewards = [[0.0, 0.0, 0.0], [1.0, 0.0, 0.5]]
    finished = [[True, False, True], [True, True, True]]
    rollouts = [rl.Rollout(PROBLEM, p, c, [""] * len(c), [None] * len(c), r, f)
                for p, c, r, f in zip(prompts, completions, rewards, finished)]

    entropy, n_tokens = 0.0, 0
    expected_loss = 0.0
    for prompt, comps, group in zip(prompts, completions, rewards):
        mean = sum(group) / len(group)
        for comp, reward in zip(comps, group):
            seq = torch.tensor([prompt + comp])
            logp = torch.log_softmax(model(seq[:, :-1]).float(), dim=-1)[0, len(prompt) - 1:]
            entropy += -(logp.exp() * logp).sum().item()
            n_tokens += len(comp)
            expected_loss = expected_loss - (reward - mean) * logp.gather(-1, torch.tensor(comp)[:, None]).sum()
    model.zero_grad()
    (expected_loss / n_tokens).backward()
    want_norm = torch.stack([p.grad.norm() for p in model.parameters() if p.grad is not None]).norm().item()
    model.zero_grad()

    optimizers = build_optimizers(model, d_model=model.config.n_embd)
    stats = rl.train_on_rollouts(model, optimizers, rollouts, rl.RLConfig(depth=1, device_batch_size=2), CPU,
                                 pad_id=0)
    assert stats["rl/num_tokens"] == n_tokens == 12
    assert stats["rl/entropy"] == pytest.approx(entropy / n_tokens, rel=1e-5)
    assert 0.5 < stats["rl/entropy"] < math.log(32)
    assert stats["rl/grad_norm"] == pytest.approx(want_norm, rel=1e-4)
    assert stats["rl/tied_groups_frac"] == 0.5
    assert stats["rl/truncated_frac"] == pytest.approx(1 / 6)
    assert stats["rl/reward_std"] == pytest.approx((0.0 + math.sqrt(1 / 6)) / 2)
