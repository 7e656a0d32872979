"""Checkpoint round trips, atomicity and the error messages for broken checkpoints."""

import json
import random

import numpy as np
import pytest
import torch
from torch import nn

from aquainterp.checkpoints.native import (
    MODEL_FILE,
    OPTIM_FILE,
    CheckpointError,
    available_steps,
    latest_step,
    load_checkpoint,
    load_optimizers,
    load_state_into,
    rng_state,
    save_checkpoint,
    set_rng_state,
)


def _tiny():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(11, 8), nn.Linear(8, 16, bias=False), nn.Linear(16, 11, bias=False))
    muon = torch.optim.Muon([model[1].weight, model[2].weight], lr=0.02, momentum=0.95, weight_decay=0.0)
    adam = torch.optim.AdamW([model[0].weight], lr=1e-2, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.0)
    return model, [muon, adam]


def _train(model, opts, steps, seed=1):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randint(0, 11, (4, 5), generator=g)
        loss = nn.functional.cross_entropy(model(x).flatten(0, 1), x.flatten())
        loss.backward()
        for o in opts:
            o.step()
        model.zero_grad(set_to_none=True)


def test_round_trip_resumes_exactly(tmp_path):
    model, opts = _tiny()
    _train(model, opts, 3)
    save_checkpoint(tmp_path, 3, model, opts, {"data_position": {"doc": 7, "offset": 2}})
    _train(model, opts, 2, seed=2)
    want = {k: v.clone() for k, v in model.state_dict().items()}

    model2, opts2 = _tiny()
    ckpt = load_checkpoint(tmp_path)
    assert ckpt.meta["step"] == 3 and ckpt.meta["data_position"] == {"doc": 7, "offset": 2}
    load_state_into(model2, ckpt.model_state, ckpt.path)
    load_optimizers(opts2, ckpt)
    assert opts2[1].param_groups[0]["betas"] == (0.8, 0.95)
    _train(model2, opts2, 2, seed=2)
    for k, v in model2.state_dict().items():
        # exact on any CPU: the resumed run does the same ops on the same shapes as the straight one (single thread)
        assert torch.equal(v, want[k]), k


def test_latest_step_and_ignores_temp_dirs(tmp_path):
    assert latest_step(tmp_path / "nothing") is None
    model, opts = _tiny()
    for s in (5, 20, 10):
        save_checkpoint(tmp_path, s, model, opts, {})
    (tmp_path / ".tmp_step_000030_1").mkdir()  # a write that was killed before its rename
    (tmp_path / "step_000040").mkdir()  # a folder without meta.json is not a checkpoint
    assert available_steps(tmp_path) == [5, 10, 20]
    assert latest_step(tmp_path) == 20
    # re-saving a step replaces it whole
    save_checkpoint(tmp_path, 20, model, None, {"again": True})
    assert load_checkpoint(tmp_path, 20).meta["again"] is True
    assert load_checkpoint(tmp_path, 20).optim_state is None


def test_rng_state_round_trip():
    torch.manual_seed(3)
    random.seed(3)
    np.random.seed(3)
    state = json.loads(json.dumps(rng_state()))
    a = (torch.rand(3), random.random(), np.random.rand())
    set_rng_state(state)
    b = (torch.rand(3), random.random(), np.random.rand())
    # exact by construction: the restored RNG state draws the same bits
    assert torch.equal(a[0], b[0]) and a[1:] == b[1:]


def test_errors_name_file_and_problem(tmp_path):
    model, opts = _tiny()
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing")
    with pytest.raises(CheckpointError, match="holds no complete checkpoint"):
        load_checkpoint(tmp_path)
    path = save_checkpoint(tmp_path, 1, model, opts, {})
    with pytest.raises(CheckpointError, match=r"no checkpoint for step 2; available steps: \[1\]"):
        load_checkpoint(tmp_path, 2)

    data = (path / MODEL_FILE).read_bytes()
    (path / MODEL_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model.safetensors: truncated or altered"):
        load_checkpoint(tmp_path)
    (path / MODEL_FILE).write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(CheckpointError, match=r"model.safetensors: corrupt: sha256"):
        load_checkpoint(tmp_path)
    (path / MODEL_FILE).write_bytes(data)
    (path / OPTIM_FILE).unlink()
    with pytest.raises(CheckpointError, match=r"optim.safetensors: missing"):
        load_checkpoint(tmp_path)

    path = save_checkpoint(tmp_path, 2, model, opts, {})
    (path / "meta.json").write_text('{"files": ')
    with pytest.raises(CheckpointError, match=r"meta.json: not valid JSON"):
        load_checkpoint(tmp_path, 2)


def test_wrong_shape_and_wrong_optimizer(tmp_path):
    model, opts = _tiny()
    save_checkpoint(tmp_path, 1, model, opts, {})
    other = nn.Sequential(nn.Embedding(11, 8), nn.Linear(8, 32, bias=False), nn.Linear(32, 11, bias=False))
    ckpt = load_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match=r"'1.weight' has shape \(16, 8\), the model expects \(32, 8\)"):
        load_state_into(other, ckpt.model_state, ckpt.path / MODEL_FILE)
    with pytest.raises(CheckpointError, match="holds 2 optimizers, the run has 1"):
        load_optimizers(opts[:1], ckpt)
    swapped = [torch.optim.AdamW(model.parameters()), opts[1]]
    with pytest.raises(CheckpointError, match="optimizer 0 is Muon, the run uses AdamW"):
        load_optimizers(swapped, ckpt)


def test_meta_must_be_json(tmp_path):
    model, _ = _tiny()
    with pytest.raises(CheckpointError, match="not JSON-able"):
        save_checkpoint(tmp_path, 1, model, None, {"bad": float("nan")})
    assert latest_step(tmp_path) is None
    assert not list(tmp_path.iterdir())
