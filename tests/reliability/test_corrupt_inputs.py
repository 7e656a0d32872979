"""Corrupt inputs: each gives one error naming the file (and the line, key or field) that is wrong, and
loading never unpickles: a pickle bomb where a checkpoint is expected is refused without running."""

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from aquainterp.checkpoints.load import load_model
from aquainterp.checkpoints.native import CheckpointError, load_checkpoint
from aquainterp.tasks.aqua import load_aqua
from aquainterp.tasks.rows import RowError
from aquainterp.tokenizer import Tokenizer
from reliability.conftest import base_config, record, rl_config, run_stage


@pytest.fixture
def ckpt_copy(tmp_path, base_ckpt) -> Path:
    """A private copy of the tiny base model's checkpoint folder to damage."""
    dst = tmp_path / "checkpoints"
    shutil.copytree(base_ckpt, dst)
    return dst


def test_truncated_safetensors_is_named(ckpt_copy):
    f = ckpt_copy / "step_000004" / "model.safetensors"
    size = f.stat().st_size
    f.write_bytes(f.read_bytes()[: size // 3])
    with pytest.raises(CheckpointError, match=rf"{f}: truncated or altered: {size // 3} bytes, meta.json says {size}"):
        load_model(ckpt_copy)
    # the same damage with the manifest updated to match: the safetensors reader itself refuses the file
    meta_path = ckpt_copy / "step_000004" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["files"]["model.safetensors"]["bytes"] = size // 3
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=rf"{f}: cannot read safetensors"):
        load_checkpoint(ckpt_copy, verify_hash=False)
    record("truncated safetensors", True, 0)


def test_flipped_byte_is_caught_by_the_hash(ckpt_copy):
    f = ckpt_copy / "step_000004" / "optim.safetensors"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=rf"{f}: corrupt: sha256 differs"):
        load_checkpoint(ckpt_copy)
    record("one flipped byte in a checkpoint file", True, 0)


def test_checkpoint_config_that_does_not_fit_the_model(tmp_path, tokenizer_dir, ckpt_copy):
    # resuming a depth-1 run's checkpoints with a depth-2 model: the error names the file, key and shapes
    run_dir = tmp_path / "run"
    shutil.copytree(ckpt_copy, run_dir / "checkpoints")
    with pytest.raises(CheckpointError, match=r"step_000004: keys do not match the model: missing \['blocks\.1\."):
        run_stage(base_config(run_dir, tokenizer_dir, depth=2, max_steps=6, resume=True))
    with pytest.raises(CheckpointError, match=r"step_000004: '[\w.]+' has shape \(\d+, 64\), the model expects "
                                              r"\(\d+, 128\) \(wrong model config\?\)"):
        run_stage(base_config(run_dir, tokenizer_dir, aspect_ratio=128, head_dim=32, max_steps=6, resume=True))
    # meta.json's model config edited: load_model compares it with the weights' header before building it
    meta_path = ckpt_copy / "step_000004" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["model_config"]["n_embd"] *= 2
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"step_000004/meta.json: model_config does not match model.safetensors: "
                                              r".* shape would be \[\d+, 128\] but the file holds \[\d+, 64\]"):
        load_model(ckpt_copy)
    record("checkpoint config does not match the model", True, 0)


@pytest.fixture(scope="module")
def other_tokenizer(tmp_path_factory, shared_data) -> Path:
    """Same vocabulary size as the session tokenizer, trained on other text (AQuA): another fingerprint."""
    out = tmp_path_factory.mktemp("other_tok")
    rows = [json.loads(line) for line in (shared_data / "aqua_rat" / "dev.json").read_text().splitlines()]
    tok = Tokenizer.train_from_iterator([r["question"] + "\n" + r["rationale"] for r in rows], vocab_size=512)
    assert tok.vocab_size == 512
    tok.save(out)
    return out


def test_tokenizer_fingerprint_differs_from_the_checkpoint(tmp_path, tokenizer_dir, other_tokenizer, ckpt_copy,
                                                          monkeypatch):
    theirs = Tokenizer.load(other_tokenizer)
    assert theirs.fingerprint() != Tokenizer.load(tokenizer_dir).fingerprint()
    # resuming a run with another --tokenizer-dir: same vocab size, so only the fingerprint can tell
    run_dir = tmp_path / "run"
    shutil.copytree(ckpt_copy, run_dir / "checkpoints")
    with pytest.raises(CheckpointError, match=rf"tokenizer fingerprint {theirs.fingerprint()[:12]} differs from "
                                              r".*step_000004/meta.json's [0-9a-f]{12}: this run's tokenizer"):
        run_stage(base_config(run_dir, other_tokenizer, max_steps=6, resume=True))
    # a checkpoint whose tokenizer/ folder was swapped (and its manifest made to match)
    step = ckpt_copy / "step_000004"
    shutil.rmtree(step / "tokenizer")
    shutil.copytree(other_tokenizer, step / "tokenizer")
    meta = json.loads((step / "meta.json").read_text())
    for name in list(meta["files"]):
        if name.startswith("tokenizer/"):
            meta["files"][name]["bytes"] = (step / name).stat().st_size
    (step / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"step_000004/tokenizer/[\w.]+: corrupt: sha256 differs"):
        load_model(ckpt_copy)
    # with the hash check switched off (load_model has no flag for it: patched), the fingerprint still refuses it
    import aquainterp.checkpoints.load as load

    real = load.load_checkpoint
    monkeypatch.setattr(load, "load_checkpoint", lambda d, s=None, device="cpu": real(d, s, device,
                                                                                           verify_hash=False))
    with pytest.raises(CheckpointError, match=r"step_000004/tokenizer: fingerprint [0-9a-f]{12} differs from meta's"):
        load_model(ckpt_copy)
    record("tokenizer fingerprint differs from the checkpoint's", True, 0)


def test_malformed_dataset_lines_are_named(tmp_path, shared_data, base_ckpt):
    good = (shared_data / "aqua_rat" / "dev.json").read_text().splitlines()[:12]
    bad = tmp_path / "aqua.jsonl"
    row = json.loads(good[0])
    lines = [*good[:3], '{"question": "cut off', *good[3:6],
             json.dumps({**row, "correct": "F"}), json.dumps({k: v for k, v in row.items() if k != "options"}),
             json.dumps({**row, "options": row["options"][:4]}), *good[6:]]
    bad.write_text("\n".join(lines) + "\n")
    with pytest.raises(RowError, match=rf"{bad}:4: "):
        load_aqua(bad)
    problems = load_aqua(bad, skip_bad_rows=True)
    assert len(problems) == 12  # every good row kept, the four bad ones skipped
    # the RL stage on that file: the same error, naming file and line, before any training
    with pytest.raises(RowError, match=rf"{bad}:4: "):
        run_stage(rl_config(tmp_path / "rl", base_ckpt, task="aqua", data=str(bad), max_steps=1))
    record("malformed dataset lines", True, 0)


class Bomb:
    """Unpickling this runs code: it writes the file named at pickling time."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (exec, (f"open({self.path!r}, 'w').write('pickle code ran')",))


def test_pickle_bomb_in_place_of_a_checkpoint_never_runs(tmp_path, tokenizer_dir, ckpt_copy):
    control, fired = tmp_path / "control", tmp_path / "fired"
    torch.save({"model": Bomb(control)}, tmp_path / "control.pt")
    torch.load(tmp_path / "control.pt", weights_only=False)  # the bomb is live: unpickling it runs code
    assert control.exists()

    bomb = pickle.dumps({"model": Bomb(fired)})
    step = ckpt_copy / "step_000004"
    # 1. a .pt file of the usual names, in a step folder with no manifest: not a checkpoint at all
    lone = ckpt_copy / "step_000009"
    lone.mkdir()
    (lone / "model.pt").write_bytes(bomb)
    torch.save({"model": Bomb(fired)}, ckpt_copy / "step_000009" / "checkpoint.pt")
    assert load_checkpoint(ckpt_copy).meta["step"] == 4
    # 2. the bomb under the safetensors name, the manifest made to match it: the reader refuses it
    (step / "model.safetensors").write_bytes(bomb)
    meta = json.loads((step / "meta.json").read_text())
    meta["files"]["model.safetensors"]["bytes"] = len(bomb)
    (step / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"model.safetensors: (cannot read safetensors|not a safetensors file|"
                                              r"corrupt: sha256)"):
        load_model(ckpt_copy)
    with pytest.raises(CheckpointError, match=r"model.safetensors: cannot read safetensors"):
        load_checkpoint(ckpt_copy, verify_hash=False)
    # 3. through a stage: resume and RL's --checkpoint
    run_dir = tmp_path / "run"
    shutil.copytree(ckpt_copy, run_dir / "checkpoints")
    with pytest.raises(CheckpointError, match="model.safetensors"):
        run_stage(base_config(run_dir, tokenizer_dir, max_steps=6, resume=True))
    with pytest.raises(CheckpointError, match="model.safetensors"):
        run_stage(rl_config(tmp_path / "rl", ckpt_copy, max_steps=1))
    assert not fired.exists(), "a checkpoint loader unpickled the file"
    record("pickle bomb where a checkpoint is expected", True, 0)


@pytest.mark.slow
def test_stage_cli_ends_with_one_clear_line_not_a_traceback(tmp_path, tokenizer_dir, ckpt_copy):
    """`python -m training.base --resume` on a truncated checkpoint: exit 1, one error line naming the file."""
    import os
    import subprocess
    import sys

    run_dir = tmp_path / "run"
    shutil.copytree(ckpt_copy, run_dir / "checkpoints")
    f = run_dir / "checkpoints" / "step_000004" / "optim.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    cfg = base_config(run_dir, tokenizer_dir, max_steps=6)
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in vars(cfg).items() if v is not None and not isinstance(v, bool)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "TQDM_DISABLE": "1",
           "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    done = subprocess.run([sys.executable, "-m", "training.base", *flags, "--resume"], env=env, capture_output=True,
                          text=True, timeout=180, cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 1, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last == f"python -m training.base: error: {f}: truncated or altered: 100 bytes, meta.json says " \
                   f"{ckpt_copy.joinpath('step_000004', 'optim.safetensors').stat().st_size}", last
    record("corrupt checkpoint through the stage CLI (one line, exit 1)", True, 0)
