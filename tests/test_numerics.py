"""The GPU path's pieces on CPU, on the nanochat fixtures: torch.compile (inductor) equals eager, and bf16
autocast stays close to nanochat's fp32 reference. nanochat's own bf16 tolerance is atol = rtol = 1e-2 for
one attention call (its tests/test_attention_fallback.py); through a whole model the bf16 rounding adds
up: measured max |logit error| 0.026 (2026-07 d4) and 0.037 (2026-01 d2) on logits of size up to 15, so
the logits are held to atol 5e-2 + rtol 1e-2 and the loss to 1e-2 relative. The fp32 path itself is
exact (tests/test_nanochat_fixtures.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from aquainterp.nanochat_import import load_nanochat

FIXTURES = Path(os.environ.get("AQUAINTERP_SHARED_FIXTURES",
                               Path(__file__).resolve().parents[2] / "shared" / "fixtures")) / "nanochat"
NAMES = ["nanochat-head-d4", "nanochat-2026-01-d2"]


def load(name):
    path = FIXTURES / name
    if not path.is_dir():
        pytest.fail(f"nanochat fixture {path} not found (set AQUAINTERP_SHARED_FIXTURES)")
    model, _, _ = load_nanochat(path)
    return model, load_file(str(path / "reference.safetensors"))


@pytest.mark.parametrize("name", NAMES)
def test_bf16_autocast_within_nanochat_tolerance(name):
    model, ref = load(name)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(ref["input_ids"])
        loss = model(ref["input_ids"], targets=ref["targets"])
    assert logits.dtype == torch.float32  # soft-cap and loss in fp32, as nanochat
    err = (logits - ref["logits"]).abs().max().item()
    assert 1e-4 < err  # bf16 really ran (the fp32 path is exact to the fixture)
    torch.testing.assert_close(logits, ref["logits"], atol=5e-2, rtol=1e-2)
    assert abs(loss.item() - ref["loss"].item()) <= 1e-2 * ref["loss"].item()


@pytest.mark.slow  # inductor compiles forward and backward: about 1-2 minutes per model on 2 CPU cores
@pytest.mark.parametrize("name", NAMES)
def test_torch_compile_equals_eager(name):
    # Start from an empty dynamo cache: after tests/test_model.py compiled another GPT with backend="eager"
    # (and with the per-test thread count toggling), inductor in the same process produced wrong logits
    # (off by ~5) or aborted with heap corruption; in a fresh process, or after this reset, it is exact.
    # Not isolated further (see the issue notes); compiling one model per process is what training does.
    torch._dynamo.reset()
    model, ref = load(name)
    compiled = torch.compile(model)
    with torch.no_grad():
        eager = model(ref["input_ids"])
        assert (compiled(ref["input_ids"]) - eager).abs().max().item() <= 1e-5
    loss = compiled(ref["input_ids"], targets=ref["targets"])
    assert abs(loss.item() - ref["loss"].item()) <= 1e-5
    loss.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()
    model(ref["input_ids"], targets=ref["targets"]).backward()
    for k, p in model.named_parameters():
        rel = ((grads[k] - p.grad).abs().max() / p.grad.abs().max()).item()
        assert rel <= 1e-4, f"{name} compiled grad {k}: {rel:.2e}"
