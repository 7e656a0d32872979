"""GRPO math against closed forms on a hand-made 2-token policy (logits = a learnable 2-vector)."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from training.grpo import (
    completion_reward,
    group_advantages,
    kl_k3,
    policy_loss,
    token_logprobs,
)


class TwoTokenPolicy(torch.nn.Module):
    """A "policy" over a 2-token vocabulary that ignores its input: logits are one learnable 2-vector."""

    def __init__(self, a: float, b: float):
        super().__init__()
        self.theta = torch.nn.Parameter(torch.tensor([a, b], dtype=torch.float64))

    def forward(self, targets):  # [B, T] -> logits [B, T, 2]
        return self.theta.expand(*targets.shape, 2)


def _loss_on(policy, tokens, advantages, old=None, clip_eps=0.0):
    targets = torch.tensor(tokens).unsqueeze(1)  # one token per sample
    logp = token_logprobs(policy(targets), targets)
    old = logp.detach() if old is None else old
    mask = torch.ones_like(logp)
    return policy_loss(logp, old, torch.tensor(advantages, dtype=torch.float64), mask, mask.sum().item(), clip_eps)


def test_loss_and_gradient_equal_closed_form():
    policy = TwoTokenPolicy(0.3, -0.4)
    tokens, adv = [0, 1, 0, 1], [0.5, -0.5, 0.25, -0.25]
    loss, stats = _loss_on(policy, tokens, adv)
    loss.backward()
    p = torch.softmax(torch.tensor([0.3, -0.4], dtype=torch.float64), 0)
    # on-policy: ratio = 1, so loss = −mean(A) = 0 here and ∇ = −(1/N) Σ A_i (e_{y_i} − p)
    assert loss.item() == pytest.approx(-sum(adv) / 4, abs=1e-12)
    expected = -sum(a * (torch.eye(2, dtype=torch.float64)[y] - p) for y, a in zip(tokens, adv)) / 4
    torch.testing.assert_close(policy.theta.grad, expected, rtol=0, atol=1e-12)
    assert stats.clipped_tokens == 0 and stats.ratio_max == 0.0
    # the gradient of Σ A log π(y) itself (REINFORCE) is the same vector with the opposite sign
    theta = torch.tensor([0.3, -0.4], dtype=torch.float64, requires_grad=True)
    logp = torch.log_softmax(theta, 0)
    (-(sum(a * logp[y] for y, a in zip(tokens, adv))) / 4).backward()
    torch.testing.assert_close(policy.theta.grad, theta.grad, rtol=0, atol=1e-12)


@pytest.mark.parametrize("rewarded", [0, 1])
def test_positive_advantage_raises_rewarded_sample_logprob(rewarded):
    policy = TwoTokenPolicy(0.0, 0.0)
    rewards = torch.tensor([[1.0 if y == rewarded else 0.0 for y in (0, 1, 1, 0)]])
    adv = group_advantages(rewards)[0]
    before = torch.log_softmax(policy.theta.detach(), 0)[rewarded].item()
    opt = torch.optim.SGD(policy.parameters(), lr=0.5)
    loss, _ = _loss_on(policy, [0, 1, 1, 0], adv.tolist())
    loss.backward()
    opt.step()
    after = torch.log_softmax(policy.theta.detach(), 0)[rewarded].item()
    assert after > before
    # closed form of one SGD step from uniform: ∇θ_rewarded = −(1/4)(Σ_{y=r} A(1−½) + Σ_{y≠r} A(−½)) = −¼
    assert policy.theta.detach()[rewarded].item() == pytest.approx(0.5 * 0.25, abs=1e-12)


def test_negative_advantage_lowers_logprob():
    policy = TwoTokenPolicy(1.0, -1.0)
    before = torch.log_softmax(policy.theta.detach(), 0)[0].item()
    loss, _ = _loss_on(policy, [0], [-1.0])
    loss.backward()
    with torch.no_grad():
        policy.theta -= 0.1 * policy.theta.grad
    assert torch.log_softmax(policy.theta.detach(), 0)[0].item() < before


@pytest.mark.parametrize(
    "ratio,adv,clipped",
    [
        (1.5, 1.0, True),  # A > 0, ρ > 1+ε: objective capped at (1+ε)A, zero gradient
        (1.1, 1.0, False),  # inside the trust region
        (0.5, 1.0, False),  # A > 0, ρ < 1−ε: min() keeps the unclipped (smaller) term
        (0.5, -1.0, True),  # A < 0, ρ < 1−ε: capped at (1−ε)A, zero gradient
        (1.5, -1.0, False),  # A < 0, ρ > 1+ε: unclipped term is smaller (more negative), kept
    ],
)
def test_ppo_clipping_closed_form(ratio, adv, clipped):
    eps = 0.2
    policy = TwoTokenPolicy(0.2, -0.1)
    p0 = torch.softmax(policy.theta.detach(), 0)[0].item()
    old = torch.tensor([[math.log(p0 / ratio)]], dtype=torch.float64)  # so that π/π_old = ratio
    loss, stats = _loss_on(policy, [0], [adv], old=old, clip_eps=eps)
    loss.backward()
    if clipped:
        bound = 1 + eps if adv > 0 else 1 - eps
        assert loss.item() == pytest.approx(-bound * adv, abs=1e-12)
        torch.testing.assert_close(policy.theta.grad, torch.zeros(2, dtype=torch.float64))
        assert stats.clipped_tokens == 1
    else:
        assert loss.item() == pytest.approx(-ratio * adv, abs=1e-12)
        # ∇(−ρA) = −ρ A (e_0 − p)
        p = torch.softmax(policy.theta.detach(), 0)
        expected = -ratio * adv * (torch.tensor([1.0, 0.0], dtype=torch.float64) - p)
        torch.testing.assert_close(policy.theta.grad, expected, rtol=0, atol=1e-12)
        assert stats.clipped_tokens == 0
    assert stats.ratio_max == pytest.approx(abs(ratio - 1), abs=1e-12)


def test_padding_and_prompt_tokens_do_not_count():
    # two completions of different length in one padded batch; the pad positions carry garbage
    logits = torch.randn(2, 4, 5, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([[-1, 3, 1, -1], [-1, 2, -1, -1]])
    logp = token_logprobs(logits, targets)
    assert (logp[targets == -1] == 0).all()
    mask = (targets >= 0).double()
    adv = torch.tensor([1.0, -2.0], dtype=torch.float64)
    loss, _ = policy_loss(logp, logp.detach(), adv, mask, num_valid_tokens=3)
    ref = -(1.0 * (logp[0, 1] + logp[0, 2]) - 2.0 * logp[1, 1]) / 3
    # value: on-policy ratio is 1, so loss = −ΣA·1/N; gradient equals that of the REINFORCE form
    assert loss.item() == pytest.approx(-(1.0 * 2 - 2.0 * 1) / 3, abs=1e-12)
    g1 = torch.autograd.grad(loss, logits, retain_graph=True)[0]
    g2 = torch.autograd.grad(ref, logits)[0]
    torch.testing.assert_close(g1, g2, rtol=0, atol=1e-12)
    assert (g1[0, 0] == 0).all() and (g1[0, 3] == 0).all() and (g1[1, 2:] == 0).all()


def test_microbatches_sum_to_full_batch():
    torch.manual_seed(0)
    logits = torch.randn(4, 3, 6, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([[1, 2, -1], [0, -1, -1], [5, 4, 3], [-1, -1, -1]])
    mask = (targets >= 0).double()
    adv = torch.tensor([0.5, -0.5, 1.5, 0.0], dtype=torch.float64)
    n = mask.sum().item()
    logp = token_logprobs(logits, targets)
    full = torch.autograd.grad(policy_loss(logp, logp.detach(), adv, mask, n)[0], logits)[0]
    parts = 0
    for sl in (slice(0, 1), slice(1, 4)):
        lp = token_logprobs(logits[sl], targets[sl])
        parts = parts + torch.autograd.grad(policy_loss(lp, lp.detach(), adv[sl], mask[sl], n)[0], logits)[0]
    torch.testing.assert_close(parts, full, rtol=0, atol=1e-12)


def test_kl_penalty_closed_form_and_gradient():
    policy = TwoTokenPolicy(0.7, -0.2)
    targets = torch.tensor([[0], [1]])
    logp = token_logprobs(policy(targets), targets)
    ref = torch.log(torch.tensor([[0.5], [0.5]], dtype=torch.float64))
    mask = torch.ones_like(logp)
    beta = 0.3
    loss, stats = policy_loss(logp, logp.detach(), torch.zeros(2, dtype=torch.float64), mask, 2.0,
                              ref_logprobs=ref, kl_coef=beta)
    p = torch.softmax(policy.theta.detach(), 0)
    k3 = [float(0.5 / p[y] - math.log(0.5 / p[y]) - 1) for y in (0, 1)]
    assert loss.item() == pytest.approx(beta * sum(k3) / 2, abs=1e-12)
    assert stats.kl_sum == pytest.approx(sum(k3), abs=1e-12)
    loss.backward()
    # d/dθ of k3 = (1 − π_ref/π) ∇log π, with ∇log π(y) = e_y − p
    expected = sum((1 - 0.5 / p[y]) * (torch.eye(2, dtype=torch.float64)[y] - p) for y in (0, 1)) * beta / 2
    torch.testing.assert_close(policy.theta.grad, expected, rtol=0, atol=1e-12)


def test_kl_is_zero_for_identical_policies():
    lp = torch.log(torch.tensor([0.1, 0.6, 0.3]))
    # exact by construction: exp(0) - 0 - 1 = 0 in any floating point
    assert torch.equal(kl_k3(lp, lp), torch.zeros(3))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.sampled_from([0.0, 1.0, 0.5, 1.5]), min_size=4, max_size=4), min_size=1, max_size=5),
       st.booleans())
def test_group_advantages_properties(groups, std_normalize):
    r = torch.tensor(groups)
    adv = group_advantages(r, std_normalize=std_normalize)
    torch.testing.assert_close(adv.sum(1), torch.zeros(len(groups)), rtol=0, atol=1e-5)
    for row, a in zip(r, adv):
        if torch.all(row == row[0]):
            assert torch.all(a == 0)
        elif std_normalize:
            assert a.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-4)
        # ranking of rewards is preserved
        order_r = torch.argsort(row, stable=True)
        assert torch.all(a[order_r][1:] >= a[order_r][:-1])


def test_reward_values_and_bad_input():
    assert completion_reward("C", "C", well_formed=True) == 1.0
    assert completion_reward("B", "C", well_formed=True) == 0.0
    assert completion_reward(None, "C", well_formed=False, format_reward=0.1) == 0.0
    assert completion_reward("B", "C", well_formed=True, format_reward=0.1) == pytest.approx(0.1)
    assert completion_reward("C", "C", well_formed=True, format_reward=0.1) == pytest.approx(1.1)
    with pytest.raises(ValueError, match="gold letter"):
        completion_reward("C", "F", well_formed=True)


def test_bad_shapes_and_arguments_name_the_problem():
    lp = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="advantages must be"):
        policy_loss(lp, lp, torch.zeros(3), torch.ones(2, 3), 6)
    with pytest.raises(ValueError, match="same \\[B, T\\] shape"):
        policy_loss(lp, torch.zeros(2, 4), torch.zeros(2), torch.ones(2, 3), 6)
    with pytest.raises(ValueError, match="num_valid_tokens"):
        policy_loss(lp, lp, torch.zeros(2), torch.ones(2, 3), 0)
    with pytest.raises(ValueError, match="needs ref_logprobs"):
        policy_loss(lp, lp, torch.zeros(2), torch.ones(2, 3), 6, kl_coef=0.1)
    with pytest.raises(ValueError, match="clip_eps"):
        policy_loss(lp, lp, torch.zeros(2), torch.ones(2, 3), 6, clip_eps=-0.1)
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(torch.zeros(4))
