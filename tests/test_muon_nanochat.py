"""Our optimizers against nanochat's own optimizer code, two steps on identical weights and gradients.

tests/golden/optim/nanochat-<commit>.safetensors were written by nanochat's code at that commit
(tests/golden/optim/make_reference.py; provenance in the .json next to each): a tiny nanochat GPT off its
init, nanochat's optimizer setup with weight decay 0.2, two steps. Step 2 checks the momentum and NorMuon
state the first step left. Every parameter is compared, AdamW's as well as Muon's.
"""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from aquainterp.checkpoints.nanochat import config_from_nanochat, state_from_nanochat
from aquainterp.model.gpt import GPT
from training.optim import build_optimizers

GOLDEN = Path(__file__).parent / "golden" / "optim"


def _load(commit: str):
    tensors = load_file(str(GOLDEN / f"nanochat-{commit}.safetensors"))
    provenance = json.loads((GOLDEN / f"nanochat-{commit}.json").read_text())
    sets: dict[str, dict] = {}
    for key, value in tensors.items():
        kind, name = key.split(".", 1)
        sets.setdefault(kind, {})[name] = value
    return {kind: state_from_nanochat(s) for kind, s in sets.items()}, provenance


def _our_two_steps(commit: str, optimizer: str = "auto", ns_dtype=None):
    sets, provenance = _load(commit)
    config = config_from_nanochat(provenance["model_config"], sets["params0"], commit)
    model = GPT(config)
    model.load_state_dict(sets["params0"], strict=False)
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), sets["params0"][name]), name
    args = provenance["optimizer_arguments"]
    optimizers = build_optimizers(model, d_model=config.n_embd, matrix_lr=args["matrix_lr"],
                                  embedding_lr=args["embedding_lr"], unembedding_lr=args["unembedding_lr"],
                                  weight_decay=args["weight_decay"], optimizer=optimizer, ns_dtype=ns_dtype)
    results = []
    for step in (1, 2):
        for name, p in model.named_parameters():
            p.grad = sets[f"grad{step}"][name].clone()
        for opt in optimizers:
            opt.step()
        results.append({name: p.detach().clone() for name, p in model.named_parameters()})
    return sets, results


def _update_errors(sets, results, suffix=""):
    """Per step and parameter: max |ours - nanochat| / max |nanochat's update|."""
    errors = {}
    for step, ours in enumerate(results, 1):
        before, want = sets[f"params{step - 1}{suffix if step > 1 else ''}"], sets[f"params{step}{suffix}"]
        for name, got in ours.items():
            scale = (want[name] - before[name]).abs().max().item()
            errors[(step, name)] = (got - want[name]).abs().max().item() / scale
    return errors


@pytest.mark.parametrize("commit", ["92d63d4", "2c4473d"])
def test_equals_nanochat_in_fp32(commit):
    """fp32 orthogonalisation (our default where bf16 is not native): nanochat HEAD runs it in fp32 on CPU itself; for 2c4473d
    the reference is its code with its one bf16 cast replaced by float() (make_reference.py --fp32-ns)."""
    sets, results = _our_two_steps(commit, ns_dtype=torch.float32)
    errors = _update_errors(sets, results, "" if commit == "92d63d4" else "_fp32ns")
    assert len(errors) == 2 * len(sets["params0"])
    worst = max(errors, key=errors.get)
    assert errors[worst] < 1e-5, f"{worst}: {errors[worst]:.2e}"  # fp32 rounding; a wrong constant is >1e-3


def test_equals_nanochat_2c4473d_in_bf16():
    """bf16 orthogonalisation, as nanochat 2c4473d runs it on every device: the same numbers up to bf16
    rounding of differently ordered (and, across CPU vendors, differently blocked) bf16 matmuls."""
    sets, results = _our_two_steps("2c4473d", ns_dtype=torch.bfloat16)
    errors = _update_errors(sets, results)
    worst = max(errors, key=errors.get)
    assert errors[worst] < 0.03, f"{worst}: {errors[worst]:.2e}"
    fp32 = _update_errors(sets, _our_two_steps("2c4473d", ns_dtype=torch.float32)[1])  # fp32 against the bf16 reference: further off
    assert max(fp32.values()) > 3 * errors[worst]


@pytest.mark.parametrize("commit,other", [("92d63d4", "nanochat-2025-10"), ("2c4473d", "nanochat-2026-07")])
def test_the_other_recipe_is_far_off(commit, other):
    """The comparison tells the two recipes apart (MuonEq, Muon+, NorMuon beta2, AdamW groups)."""
    sets, results = _our_two_steps(commit, optimizer=other)
    errors = _update_errors(sets, results, "" if commit == "92d63d4" else "_fp32ns")
    assert max(errors.values()) > 0.05
