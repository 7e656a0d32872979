"""NaN/inf in the loss (a poisoned batch) or only in the gradients (the loss stays finite): the run
stops with a clear message naming the step and the last good checkpoint, which stays loadable and
finite; with --skip-nonfinite the bad update is skipped (the weights after that step equal the ones
before it) and the run reaches its end. The faults come from hooks on the real model, at step 3."""

import pytest
import torch

import training.base
import training.rl
import training.sft
from aquainterp.checkpoints.native import available_steps, load_checkpoint
from aquainterp.logger import read_metrics
from reliability.conftest import base_config, record, rl_config, run_stage, sft_config
from training.common import NonFiniteLossError

BAD_STEP = 3


def poison_batch(model, value: float) -> None:
    """The 3rd training forward pass gets `value` in its token embeddings (a poisoned batch)."""
    calls = [0]

    def hook(module, args, out):
        if not module.training:
            return out
        calls[0] += 1
        return out * value if calls[0] == BAD_STEP else out

    model.wte.register_forward_hook(hook)


def poison_gradient(model, value: float) -> None:
    """The 3rd optimizer step's gradients get `value` in one weight; the loss itself stays finite.

    A step may run several backward passes (gradient accumulation, one per RL prompt); the first
    of a step is the one that finds `.grad` cleared (zero_grad(set_to_none=True)), so steps are
    counted there and every backward of the bad step is poisoned."""
    steps = [0]
    param = model.lm_head.weight

    def hook(grad):
        if param.grad is None:
            steps[0] += 1
        if steps[0] == BAD_STEP:
            grad = grad.clone()
            grad[0, 0] = value
        return grad

    param.register_hook(hook)


def with_fault(monkeypatch, module, name: str, fault, value: float) -> None:
    """Wrap the stage's model builder so the model it returns carries the fault."""
    real = getattr(module, name)

    def build(*args, **kwargs):
        out = real(*args, **kwargs)
        fault(out[0] if isinstance(out, tuple) else out, value)
        return out

    monkeypatch.setattr(module, name, build)


def assert_good_checkpoints(ckpt_dir, expected_steps) -> None:
    assert available_steps(ckpt_dir) == expected_steps
    for s in expected_steps:
        state = load_checkpoint(ckpt_dir, s).model_state
        assert all(torch.isfinite(v).all() for v in state.values()), f"step {s} holds non-finite weights"


CASES = {
    # stage: (config maker, module, model builder, fault)
    "sft-loss": (lambda tmp, tok, base: sft_config(tmp, base), training.mid, "init_from", poison_batch),
    "base-grad": (lambda tmp, tok, base: base_config(tmp, tok, max_steps=5), training.base, "build_model",
                  poison_gradient),
    "rl-grad": (lambda tmp, tok, base: rl_config(tmp, base, max_steps=5), training.rl, "start_model",
                poison_gradient),
}


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("case", list(CASES))
def test_nonfinite_stops_with_the_last_good_checkpoint(case, value, tmp_path, tokenizer_dir, base_ckpt, monkeypatch):
    make, module, builder, fault = CASES[case]
    with_fault(monkeypatch, module, builder, fault, value)
    config = make(tmp_path / "run", tokenizer_dir, base_ckpt)
    kind = "loss" if fault is poison_batch else "gradients"
    shown = BAD_STEP - 1 if case.startswith("rl") else BAD_STEP  # RL numbers its steps from 0, as it logs them
    with pytest.raises(NonFiniteLossError, match=rf"(?i)step {shown}\b.*{kind}.*(nan|inf).*stopped before applying "
                                                 rf"the update, the last good checkpoint is .*step_00000{BAD_STEP - 1}"):
        run_stage(config)
    assert_good_checkpoints(tmp_path / "run" / "checkpoints", list(range(1, BAD_STEP)))
    record(f"non-finite {kind} ({case.split('-')[0]}), stop", True, 0)


@pytest.mark.parametrize("case", ["sft-loss", "base-grad"])
def test_skip_nonfinite_skips_the_update_and_finishes(case, tmp_path, tokenizer_dir, base_ckpt, monkeypatch):
    make, module, builder, fault = CASES[case]
    with_fault(monkeypatch, module, builder, fault, float("nan"))
    config = make(tmp_path / "run", tokenizer_dir, base_ckpt)
    config.skip_nonfinite = True
    run_stage(config)
    ckpt = tmp_path / "run" / "checkpoints"
    assert_good_checkpoints(ckpt, list(range(1, config.max_steps + 1)))
    before, after = load_checkpoint(ckpt, BAD_STEP - 1).model_state, load_checkpoint(ckpt, BAD_STEP).model_state
    # exact by construction: a skipped step writes no weight
    assert all(torch.equal(before[k], after[k]) for k in before)  # the bad step changed nothing
    rows = read_metrics(tmp_path / "run")
    assert [r["step"] for r in rows if r.get("train/skipped_nonfinite")] == [BAD_STEP]
    record(f"non-finite {'loss' if fault is poison_batch else 'gradients'} ({case.split('-')[0]}), "
           "--skip-nonfinite", True, 0)
