"""Our Muon against a plain float64 re-implementation of nanochat's maths, its DDP split, the recipes' split
of parameters into groups, and the schedules. (Against nanochat's own code: tests/test_muon_nanochat.py.)"""

import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from training.muon import MUON_RECIPES, Muon
from training.optim import (
    apply_schedule,
    build_optimizers,
    dmodel_lr_scale,
    lr_multiplier,
    muon_momentum,
    split_parameters,
)
from training.orthogonalize import POLAR_EXPRESS, orthogonalize, orthogonalize_dtype


def naive_polar_express(u: torch.Tensor, margin: float, row_equilibrate: bool) -> torch.Tensor:
    """One matrix in float64, term by term: MuonEq (optional), scale, five Polar Express steps on X X^T."""
    x = u.double()
    if row_equilibrate:
        x = x * (x.norm() / x.size(0) ** 0.5) / x.norm(dim=1, keepdim=True)
    tall = x.size(0) > x.size(1)
    if tall:
        x = x.T
    x = x / (x.norm() * margin + 1e-6)
    for a, b, c in POLAR_EXPRESS:
        gram = x @ x.T
        x = a * x + b * gram @ x + c * gram @ gram @ x
    return x.T if tall else x


def naive_muon_step(p, g, buf, second, recipe, lr, mu, wd):
    """nanochat's Muon step for one matrix in float64; buf and second (per row or column) updated in place."""
    buf.mul_(mu).add_((1 - mu) * g)
    u = (1 - mu) * g + mu * buf
    x = naive_polar_express(u, recipe.spectral_margin, recipe.row_equilibrate)
    if recipe.renormalize:
        x = x * min(x.shape) ** 0.5 / x.norm()
    dim = 1 if p.size(0) >= p.size(1) else 0  # per row for square and tall matrices, per column for wide
    second.mul_(recipe.beta2).add_((1 - recipe.beta2) * x.square().mean(dim=dim, keepdim=True))
    y = x / second.sqrt()
    y = y * x.norm() / y.norm()
    step = lr * max(1.0, p.size(0) / p.size(1)) ** 0.5
    p.sub_(step * (y + wd * p * ((y * p) >= 0)))


def _run_against_naive(shapes, recipe_name, wd=0.1, steps=3, seed=0, naive=None):
    gen = torch.Generator().manual_seed(seed)
    params = [nn.Parameter(torch.randn(s, generator=gen) / s[1] ** 0.5) for s in shapes]
    ref = [p.detach().double().clone() for p in params]
    bufs = [torch.zeros_like(r) for r in ref]
    seconds = [torch.zeros(r.size(0), 1, dtype=torch.float64) if r.size(0) >= r.size(1)
               else torch.zeros(1, r.size(1), dtype=torch.float64) for r in ref]
    opt = Muon(params, recipe=recipe_name, lr=0.02, momentum=0.95, weight_decay=wd, ns_dtype=torch.float32)
    errors = []
    for _ in range(steps):
        grads = [torch.randn(s, generator=gen) * 0.01 for s in shapes]
        before = [r.clone() for r in ref]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        for i, g in enumerate(grads):
            naive_muon_step(ref[i], g.double(), bufs[i], seconds[i], MUON_RECIPES[naive or recipe_name], 0.02, 0.95, wd)
            want = ref[i] - before[i]
            errors.append(((params[i].detach().double() - ref[i]).norm() / want.norm()).item())
    return errors


SHAPES = [(32, 32), (32, 32), (16, 32), (128, 32), (32, 128), (1, 12)]


@pytest.mark.parametrize("recipe", sorted(MUON_RECIPES))
def test_muon_matches_naive_float64(recipe):
    # fp32 against float64, over 3 steps of momentum and NorMuon state, every shape kind nanochat has
    assert max(_run_against_naive(SHAPES, recipe)) < 1e-4


def test_naive_comparison_tells_the_recipes_apart():
    """Each recipe's optimizer against the other recipe's maths is far off: the check has teeth."""
    assert min(_run_against_naive(SHAPES, "nanochat-2025-10", naive="nanochat-2026-07")) > 0.01
    assert min(_run_against_naive(SHAPES, "nanochat-2026-07", naive="nanochat-2025-10")) > 0.01


def test_orthogonalize_bf16_is_close_to_fp32_and_dtype_rule():
    g = torch.randn(3, 64, 48, generator=torch.Generator().manual_seed(2))
    fp32 = orthogonalize(g, dtype=torch.float32)
    bf16 = orthogonalize(g, dtype=torch.bfloat16)
    assert fp32.dtype == torch.float32 and bf16.dtype == torch.bfloat16
    rel = ((bf16.float() - fp32).norm() / fp32.norm()).item()
    assert 1e-4 < rel < 0.05  # bf16 really ran, and computes the same thing
    assert orthogonalize_dtype(torch.device("cpu")) == torch.float32
    with pytest.raises(ValueError, match="steps must be 1..5"):
        orthogonalize(g, steps=6)


def test_cpu_bf16_is_native_only_with_bf16_units_at_torch_avx512_level(monkeypatch):
    import training.orthogonalize as ortho

    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    for capability, units, want in (("AVX512", True, True), ("AVX512", False, False), ("AVX2", True, False)):
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda c=capability: c)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda u=units: u)
        assert ortho.cpu_bf16_native() is want, (capability, units)
        # 2025-10 (nanochat 2c4473d: bf16 on every device) takes bf16 where native; 2026-07 (HEAD) fp32 on CPU
        assert ortho.orthogonalize_dtype(torch.device("cpu"), bf16_on_cpu=True) == (torch.bfloat16 if want
                                                                                      else torch.float32)
        assert ortho.orthogonalize_dtype(torch.device("cpu"), bf16_on_cpu=False) == torch.float32


@pytest.mark.parametrize("recipe", sorted(MUON_RECIPES))
def test_muon_orthogonalises_in_its_recipes_dtype(monkeypatch, recipe):
    import training.muon as muon_module

    seen = []
    real = muon_module.orthogonalize
    monkeypatch.setattr(muon_module, "orthogonalize", lambda x, steps, dtype, *a: seen.append(dtype) or
                        real(x, steps, dtype, *a))
    p = nn.Parameter(torch.randn(8, 4))
    p.grad = torch.randn(8, 4)
    Muon([p], recipe=recipe).step()
    assert seen == [orthogonalize_dtype(p.device, MUON_RECIPES[recipe].bf16_on_cpu)]
    Muon([p], recipe=recipe, ns_dtype=torch.float64).step()  # an explicit dtype wins
    assert seen[-1] == torch.float64


def test_demo_numerics_orthogonalise_in_fp32():
    """The demo caps torch at AVX2 (training.demo.pin_numerics) for numbers that repeat across machines: its
    2025-10 Muon then runs fp32 even on a CPU with bf16 units (this one has AMX), in a fresh process as the
    demo's."""
    import os
    import subprocess
    import sys

    code = ("from training.demo import pin_numerics; pin_numerics(1); import torch; "
            "from training.orthogonalize import orthogonalize_dtype; "
            "print(orthogonalize_dtype(torch.device('cpu'), bf16_on_cpu=True))")
    env = {k: v for k, v in os.environ.items() if k not in ("ATEN_CPU_CAPABILITY", "MKL_CBWR")}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "torch.float32"


@settings(max_examples=15, deadline=None)
@given(rows=st.integers(4, 64), cols=st.integers(4, 64), seed=st.integers(0, 1000))
def test_polar_express_orthogonalises(rows, cols, seed):
    """Singular values of the update land near 1 whatever the input scale (Polar Express with 2% safety)."""
    g = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * 10 ** (seed % 7 - 3)
    s = torch.linalg.svdvals(orthogonalize(g, margin=1.02, row_equilibrate=False).double())
    assert s.max() < 1.25
    assert s.median() > 0.7
    assert s.min() > 0.2 or min(rows, cols) > 0.8 * max(rows, cols)  # near-square random matrices have tiny modes


def test_muon_groups_by_shape_and_refuses_what_it_cannot_train():
    a, b, c = (nn.Parameter(torch.randn(8, 4)) for _ in range(3))
    d = nn.Parameter(torch.randn(4, 8))
    opt = Muon([a, d, b, c])
    assert [g["params"] for g in opt.param_groups] == [[d], [a, b, c]]  # by shape, in a fixed order
    with pytest.raises(ValueError, match=r"2D parameters only, got shapes \[\(4,\)\]"):
        Muon([nn.Parameter(torch.zeros(4))])
    with pytest.raises(ValueError, match="recipe must be one of"):
        Muon([a], recipe="nanochat-1999")
    a.grad = torch.zeros_like(a)
    d.grad = torch.zeros_like(d)
    with pytest.raises(ValueError, match=r"2 of 3 parameters of shape \(8, 4\) have no gradient"):
        opt.step()


def _ddp_worker(rank: int, world: int, init_file: str, out: str, recipe: str):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        torch.save(_three_steps(recipe), f"{out}/rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _three_steps(recipe):
    gen = torch.Generator().manual_seed(5)
    shapes = [(32, 16)] * 5 + [(16, 32)] * 2 + [(8, 8)]  # 5 and 2 and 1 matrices: uneven shares, an idle rank
    params = [nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    opt = Muon(params, recipe=recipe, weight_decay=0.2)
    for _ in range(3):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
    return [p.detach() for p in params], opt.state_dict()


@pytest.mark.slow
@pytest.mark.parametrize("recipe", sorted(MUON_RECIPES))
def test_ddp_split_equals_one_process(tmp_path, recipe):
    """Two gloo ranks, each orthogonalising its share: both end with one process's parameters and state."""
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path), recipe), nprocs=2, join=True)
    single_params, single_state = _three_steps(recipe)
    for rank in (0, 1):
        params, state = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        for got, want in zip(params, single_params):
            assert torch.allclose(got, want, rtol=0, atol=1e-6)
        for key, value in single_state["state"].items():
            for name, tensor in value.items():
                assert torch.allclose(state["state"][key][name], tensor, rtol=0, atol=1e-6), (key, name)


class _Toy(nn.Module):
    def __init__(self, d=32, vocab=50):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList([nn.Linear(d, 4 * d, bias=False), nn.Linear(4 * d, d, bias=False)])
        self.lm_head = nn.Linear(d, vocab, bias=False)


def test_split_and_lr_scaling():
    model = _Toy(d=3072)
    muon, adam = build_optimizers(model, d_model=3072, weight_decay=0.3)
    assert isinstance(muon, Muon) and isinstance(adam, torch.optim.AdamW)
    assert muon.recipe.name == "nanochat-2025-10"  # a model without a config: the 2025-10 recipe
    assert sum(len(g["params"]) for g in muon.param_groups) == 2
    head, emb = adam.param_groups
    assert head["params"][0] is model.lm_head.weight and emb["params"][0] is model.wte.weight
    assert dmodel_lr_scale(768) == 1.0
    assert math.isclose(head["lr"], 0.004 * 0.5) and math.isclose(emb["lr"], 0.2 * 0.5)
    assert head["betas"] == (0.8, 0.95) and head["weight_decay"] == 0.0  # 2c4473d: no AdamW weight decay
    assert all(g["lr"] == 0.02 and g["weight_decay"] == 0.3 for g in muon.param_groups)  # wd is Muon's
    muon, adam = build_optimizers(model, d_model=3072, optimizer="nanochat-2026-07")
    head, emb = adam.param_groups
    assert muon.recipe.name == "nanochat-2026-07"
    assert (head["betas"], head["weight_decay"], emb["betas"], emb["weight_decay"]) == ((0.8, 0.96), 0.01,
                                                                                        (0.8, 0.995), 0.001)
    with pytest.raises(ValueError, match="optimizer must be auto or one of"):
        build_optimizers(model, d_model=3072, optimizer="adam")


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
    assert lr == 0.01 and all(g["momentum"] == 0.9 for g in opts[0].param_groups)
    assert math.isclose(opts[1].param_groups[1]["lr"], 0.1)


def test_base_schedules_per_recipe():
    from training.optim import base_momentum, base_weight_decay

    old, new = "nanochat-2025-10", "nanochat-2026-07"
    assert [base_momentum(s, old, 1000, 0.2) for s in (0, 150, 300, 900)] == [0.85, muon_momentum(150), 0.95, 0.95]
    # HEAD: 0.85 -> 0.97 over 400 steps, 0.97, then 0.97 -> 0.90 over the warmdown (the last 200 of 1000)
    assert [base_momentum(s, new, 1000, 0.2) for s in (0, 400, 799, 800)] == [0.85, 0.97, 0.97, 0.97]
    assert math.isclose(base_momentum(200, new, 1000, 0.2), 0.91)
    assert math.isclose(base_momentum(900, new, 1000, 0.2), 0.935)
    assert [base_weight_decay(s, old, 100) for s in (0, 50, 100)] == [1.0, 0.5, 0.0]
    assert base_weight_decay(0, new, 100) == 1.0 and math.isclose(base_weight_decay(50, new, 100), 0.5)
    assert math.isclose(base_weight_decay(25, new, 100), 0.5 * (1 + math.cos(math.pi / 4)))
    opts = build_optimizers(_Toy(), d_model=768, weight_decay=0.2)
    apply_schedule(opts, 1.0, None, 0.25)
    assert all(math.isclose(g["weight_decay"], 0.05) for g in opts[0].param_groups)
    assert all(g["weight_decay"] == 0.0 for g in opts[1].param_groups)  # AdamW's is the recipe's, unscheduled


def test_state_dict_is_per_parameter_and_round_trips():
    gen = torch.Generator().manual_seed(8)
    make = lambda: [nn.Parameter(torch.randn(s, generator=torch.Generator().manual_seed(9))) for s in SHAPES]  # noqa: E731
    a, b = make(), make()
    opt_a = Muon(a, weight_decay=0.1)
    grads = [[torch.randn(s, generator=gen) for s in SHAPES] for _ in range(3)]
    for step in grads[:2]:
        for p, g in zip(a, step):
            p.grad = g.clone()
        opt_a.step()
    sd = opt_a.state_dict()
    assert len(sd["state"]) == len(SHAPES)
    for group, params in zip(sd["param_groups"], opt_a.param_groups):  # per parameter, its (or a factored) shape
        for pid, p in zip(group["params"], params["params"]):
            rows, cols = p.shape
            assert sd["state"][pid]["momentum_buffer"].shape == (rows, cols)
            assert sd["state"][pid]["second_moment"].shape == ((rows, 1) if rows >= cols else (1, cols))
    with torch.no_grad():
        for p, q in zip(a, b):
            q.copy_(p)
    opt_b = Muon(b, weight_decay=0.1)
    opt_b.load_state_dict(sd)
    for opt, params in ((opt_a, a), (opt_b, b)):
        for p, g in zip(params, grads[2]):
            p.grad = g.clone()
        opt.step()
    for p, q in zip(a, b):
        assert torch.equal(p, q)
