"""torch.optim.Muon against a plain re-implementation of nanochat's Muon, plus the schedules."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from training.optim import (
    apply_schedule,
    build_optimizers,
    dmodel_lr_scale,
    lr_multiplier,
    muon_momentum,
    split_parameters,
)


def naive_newton_schulz(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Keller Jordan's quintic iteration written out term by term, as nanochat's muon.py does, but in
    float64: the exact value that torch's bf16 iteration approximates."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.double()
    tall = g.size(0) > g.size(1)
    if tall:
        x = x.T
    x = x / (x.norm() + 1e-7)
    for _ in range(steps):
        gram = x @ x.T
        poly = b * gram + c * (gram @ gram)
        x = a * x + poly @ x
    return x.T if tall else x


def naive_muon_step(p, g, buf, lr, momentum, nesterov=True, shape_scale=True):
    buf.mul_(momentum).add_(g, alpha=1 - momentum)  # == buf.lerp_(g, 1 - momentum)
    update = (1 - momentum) * g + momentum * buf if nesterov else buf
    o = naive_newton_schulz(update).to(p.dtype)
    scale = max(1.0, p.size(0) / p.size(1)) ** 0.5 if shape_scale else 1.0
    p.sub_(lr * scale * o)


def _relative_step_errors(shape, **variant):
    """Per step: |torch update - naive update| / |naive update|, from the same parameters and gradient."""
    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(shape))
    buf = torch.zeros(shape)
    opt = torch.optim.Muon([p], lr=0.02, momentum=0.95, nesterov=True, weight_decay=0.0, adjust_lr_fn="original")
    errors = []
    for _ in range(6):
        g = torch.randn(shape)
        before = p.detach().clone()
        reference = before.clone()
        naive_muon_step(reference, g, buf.clone(), 0.02, 0.95, **variant)
        naive_muon_step(before.clone(), g, buf, 0.02, 0.95)  # advance the reference buffer
        p.grad = g.clone()
        opt.step()
        want = reference - before
        errors.append(((p.detach() - before - want).norm() / want.norm()).item())
        assert torch.allclose(opt.state[p]["momentum_buffer"], buf, atol=1e-6)
    return errors


@pytest.mark.parametrize("shape", [(16, 16), (48, 16), (16, 48), (64, 256)])
def test_torch_muon_matches_naive(shape):
    # torch runs Newton-Schulz in bf16: ~1.5% off the exact float64 value; a wrong algorithm is far off
    assert max(_relative_step_errors(shape)) < 0.04


def test_naive_comparison_detects_wrong_variants():
    assert max(_relative_step_errors((48, 16), shape_scale=False)) > 0.3
    assert max(_relative_step_errors((32, 32), nesterov=False)) > 0.1


@settings(max_examples=15, deadline=None)
@given(rows=st.integers(4, 64), cols=st.integers(4, 64), seed=st.integers(0, 1000))
def test_newton_schulz_roughly_orthogonalises(rows, cols, seed):
    """Singular values of the Muon update land near 1 (Keller: roughly in [0.5, 1.5]), whatever the input scale."""
    g = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * 10 ** (seed % 7 - 3)
    s = torch.linalg.svdvals(naive_newton_schulz(g).float())
    assert s.max() < 1.3
    assert s.min() > 0.25 or min(rows, cols) > 0.8 * max(rows, cols)  # near-square random matrices have tiny modes
    assert s.median() > 0.6


class _Toy(nn.Module):
    def __init__(self, d=32, vocab=50):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList([nn.Linear(d, 4 * d, bias=False), nn.Linear(4 * d, d, bias=False)])
        self.lm_head = nn.Linear(d, vocab, bias=False)


def test_split_and_lr_scaling():
    model = _Toy(d=3072)
    muon, adam = build_optimizers(model, d_model=3072)
    assert isinstance(muon, torch.optim.Muon) and isinstance(adam, torch.optim.AdamW)
    assert len(muon.param_groups[0]["params"]) == 2
    head, emb = adam.param_groups
    assert head["params"][0] is model.lm_head.weight and emb["params"][0] is model.wte.weight
    assert dmodel_lr_scale(768) == 1.0
    assert math.isclose(head["lr"], 0.004 * 0.5) and math.isclose(emb["lr"], 0.2 * 0.5)
    assert muon.param_groups[0]["lr"] == 0.02  # Muon is not width-scaled; its shape scale is inside the step


def test_split_rejects_non_matrix_block_params():
    model = _Toy()
    model.blocks.append(nn.LayerNorm(32))
    with pytest.raises(ValueError, match=r"block parameter 'blocks.2.weight' has shape \(32,\)"):
        split_parameters(model)


def test_schedules():
    # 100 steps, 20% warmdown: flat through step 80, then linear to 0 at step 100
    assert [lr_multiplier(s, 100) for s in (0, 50, 80)] == [1.0, 1.0, 1.0]
    assert math.isclose(lr_multiplier(90, 100), 0.5) and lr_multiplier(100, 100) == 0.0
    assert math.isclose(lr_multiplier(90, 100, final_lr_frac=0.1), 0.55)
    assert [lr_multiplier(s, 100, warmup_ratio=0.1) for s in (0, 4, 9)] == [0.1, 0.5, 1.0]
    assert muon_momentum(0) == 0.85 and muon_momentum(300) == 0.95 and muon_momentum(5000) == 0.95
    assert math.isclose(muon_momentum(150), 0.90)
    model = _Toy()
    opts = build_optimizers(model, d_model=768)
    lr = apply_schedule(opts, 0.5, 0.9)
    assert lr == 0.01 and opts[0].param_groups[0]["momentum"] == 0.9
    assert math.isclose(opts[1].param_groups[1]["lr"], 0.1)
