"""nanochat checkpoint folders in every command: load_model, import-nanochat, export --format nanochat
(round trip to identical tensors), eval/patch/rl on them, and one-line refusals of hostile or broken
files (a foreign global in tokenizer.pkl, a truncated .pt, a meta that disagrees with the tensors)."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from aquainterp.checkpoints.load import load_model
from aquainterp.checkpoints.nanochat_tokenizer import read_encoding_state
from aquainterp.checkpoints.native import CheckpointError
from aquainterp.cli.main import main

FIXTURES = Path(os.environ.get("AQUAINTERP_SHARED_FIXTURES",
                               Path(__file__).resolve().parents[2] / "shared" / "fixtures")) / "nanochat"


def fixture(name: str) -> Path:
    path = FIXTURES / name
    if not path.is_dir():
        pytest.fail(f"nanochat fixture {path} not found (set AQUAINTERP_SHARED_FIXTURES)")
    return path


def copy_fixture(name: str, tmp_path: Path) -> Path:
    dst = tmp_path / name
    shutil.copytree(fixture(name), dst)
    return dst


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err and "\n" not in err, err
    assert "Traceback" not in err
    return err


@pytest.mark.parametrize("name, sub", [("nanochat-head-d4", "base_checkpoints/d4"), ("nanochat-2026-01-d2", "")])
def test_load_model_opens_nanochat_folders(name, sub):
    """The checkpoint folder itself or its base folder; the tokenizer found two levels up."""
    model, tokenizer, meta = load_model(fixture(name) / sub)
    ref = load_file(str(fixture(name) / "reference.safetensors"))
    with torch.no_grad():
        assert (model(ref["input_ids"]) - ref["logits"]).abs().max().item() <= 1e-4
    assert tokenizer is not None and meta["step"] in (300, 700)
    with pytest.raises(CheckpointError, match=r"no model_000001.pt; steps here: \[(300|700)\]"):
        load_model(fixture(name) / sub, step=1)


def test_tokenizer_ids_equal_nanochat():
    """The fixture's prompt ids are what nanochat's tokenizer gave; token_bytes.pt lengths agree."""
    path = fixture("nanochat-head-d4")
    _, tokenizer, _ = load_model(path)
    prompt = load_file(str(path / "reference.safetensors"))["prompt"].tolist()
    text = " Question: how many apples? Options: A) 3 B) 4 C) 5 D) 6 E) 7 Answer:"
    assert tokenizer.encode(text, prepend="<|bos|>") == prompt
    lengths = torch.load(path / "tokenizer" / "token_bytes.pt", weights_only=True).tolist()
    assert lengths == [len(tokenizer.token_bytes(i)) for i in range(tokenizer.vocab_size - 9)] + [0] * 9


@pytest.mark.parametrize("name", ["nanochat-head-d4", "nanochat-2026-01-d2"])
def test_import_then_export_gives_nanochat_identical_tensors(name, tmp_path, capsys):
    src = fixture(name)
    assert main(["import-nanochat", str(src), str(tmp_path / "ours")]) == 0
    ours, tok_ours, _ = load_model(tmp_path / "ours")
    theirs, tok_theirs, _ = load_model(src)
    ids = load_file(str(src / "reference.safetensors"))["input_ids"]
    with torch.no_grad():
        # exact on any CPU: the imported and the original weights are equal tensors through the same kernels
        assert torch.equal(ours(ids), theirs(ids))
    assert tok_ours.fingerprint() == tok_theirs.fingerprint()
    assert main(["export", str(tmp_path / "ours"), str(tmp_path / "back"), "--format", "nanochat"]) == 0
    (orig_pt,) = src.glob("base_checkpoints/*/model_*.pt")
    back_pt = tmp_path / "back" / orig_pt.relative_to(src)
    a, b = torch.load(orig_pt, weights_only=True), torch.load(back_pt, weights_only=True)
    assert a.keys() == b.keys()
    for k in a:
        # exact by construction: export copies tensors, no arithmetic
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    meta_name = orig_pt.name.replace("model_", "meta_").replace(".pt", ".json")
    assert json.loads((back_pt.parent / meta_name).read_text()) == json.loads((orig_pt.parent / meta_name).read_text())
    assert read_encoding_state(tmp_path / "back/tokenizer/tokenizer.pkl") == \
        read_encoding_state(src / "tokenizer/tokenizer.pkl")
    # exact by construction: integer token lengths, copied
    assert torch.equal(torch.load(tmp_path / "back/tokenizer/token_bytes.pt", weights_only=True),
                       torch.load(src / "tokenizer/token_bytes.pt", weights_only=True))


def test_eval_and_patch_run_on_a_nanochat_checkpoint(tmp_path, capsys):
    src = fixture("nanochat-head-d4")
    assert main(["eval", "--checkpoint", str(src), "--n", "6", "--json", str(tmp_path / "eval.json")]) == 0
    assert "categorical" in json.dumps(json.loads((tmp_path / "eval.json").read_text()))
    assert main(["patch", "--checkpoint", str(src), "--n-pairs", "2", "--sweeps", "resid_pre", "--decision", "prompt",
                 "--corruption", "permute", "--keep-all-pairs",  # a tiny fixture model: patch whatever it answers
                 "--out", str(tmp_path / "patch")]) == 0
    assert (tmp_path / "patch" / "patching.safetensors").is_file()


class _Boom:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_foreign_global_in_tokenizer_pkl_is_refused_without_running(tmp_path, capsys, monkeypatch):
    src = copy_fixture("nanochat-head-d4", tmp_path)
    (src / "tokenizer/tokenizer.pkl").write_bytes(pickle.dumps(_Boom()))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match=r"refuses global (posix|os)\.system"):
        load_model(src)
    assert main(["eval", "--checkpoint", str(src), "--n", "2"]) == 1
    assert "refuses global" in one_line_error(capsys)
    assert not (tmp_path / "PWNED").exists()


def test_legacy_torch_save_format_loads(tmp_path):
    """A model_<step>.pt written without the zip container (older torch.save) cannot be memory-mapped; it is
    read the plain way, still weights_only."""
    src = copy_fixture("nanochat-2026-01-d2", tmp_path)
    (pt,) = src.glob("base_checkpoints/d2/model_*.pt")
    torch.save(torch.load(pt, weights_only=True), pt, _use_new_zipfile_serialization=False)
    model, _, _ = load_model(src)
    ref = load_file(str(src / "reference.safetensors"))
    with torch.no_grad():
        assert (model(ref["input_ids"]) - ref["logits"]).abs().max().item() <= 1e-4


def test_truncated_pt_is_one_line(tmp_path, capsys):
    src = copy_fixture("nanochat-head-d4", tmp_path)
    (pt,) = src.glob("base_checkpoints/d4/model_*.pt")
    pt.write_bytes(pt.read_bytes()[: pt.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_model(src)
    assert main(["export", str(src), str(tmp_path / "out"), "--format", "nanochat"]) == 1
    assert "model_000700.pt: cannot read" in one_line_error(capsys)


@pytest.mark.parametrize("change, message", [
    ({"n_layer": 5}, r"disagrees with model_000700.pt: missing blocks\.0\.attn\.ve_gate\.weight; .* more"),
    ({"n_kv_head": 2}, r"blocks\.0\.attn\.c_k\.weight is \(64, 128\), meta implies \(128, 128\)"),
    ({"n_embd": 16384, "n_head": 128}, r"c_q\.weight is \(128, 128\), meta implies \(16384, 16384\)"),  # 52 GB if built
    ({"window_pattern": "SSL", "n_layer": "4"}, r"n_layer = '4' is not an int"),
])
def test_meta_disagreeing_with_tensors_is_one_line_and_allocates_nothing(tmp_path, capsys, change, message):
    src = copy_fixture("nanochat-head-d4", tmp_path)
    meta_path = src / "base_checkpoints/d4/meta_000700.json"
    meta = json.loads(meta_path.read_text())
    meta["model_config"].update(change)
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=message):
        load_model(src)
    assert main(["eval", "--checkpoint", str(src), "--n", "2"]) == 1
    assert "meta_000700.json" in one_line_error(capsys)


def test_2025_meta_on_2026_tensors_and_back_are_refused(tmp_path):
    src = copy_fixture("nanochat-2026-01-d2", tmp_path)
    meta_path = src / "base_checkpoints/d2/meta_000300.json"
    meta = json.loads(meta_path.read_text())
    meta["model_config"]["window_pattern"] = "SSSL"
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="window_pattern 'SSSL' but the tensors are the nanochat-2025-10"):
        load_model(src)


@pytest.mark.slow
def test_rl_two_steps_with_probes_on_a_nanochat_checkpoint(tmp_path):
    from training.rl import main as rl_main

    code = rl_main(["--checkpoint", str(fixture("nanochat-head-d4")), "--max-steps", "2", "--num-samples", "2",
                    "--max-new-tokens", "8", "--eval-examples", "4", "--probe-every", "1", "--probe-batch", "4",
                    "--probes", "entropy,option_mass,margin,kl,counts,logit_lens", "--probe-decision", "direct",
                    "--out", str(tmp_path / "rl"), "--wandb", "disabled"])
    assert code in (0, None)
    rows = [json.loads(line) for line in (tmp_path / "rl" / "metrics.jsonl").read_text().splitlines()]
    probed = [r for r in rows if "attn/entropy_mean" in r]
    assert probed and all(0 < r["attn/entropy_mean"] for r in probed)
    assert any("probe/logit_lens_gold_margin/layer3" in r for r in rows)
    assert (tmp_path / "rl" / "checkpoints" / "step_000002").is_dir()


@pytest.mark.parametrize("architecture", ["nanochat-2025-10", "nanochat-2026-07"])
def test_our_models_write_nanochat_checkpoints_that_read_back(tmp_path, architecture):
    """An aquainterp-trained model (unpadded vocabulary 100 for 2025-10) written in nanochat's layout gets
    nanochat's 64-row padding and reads back to the same logits."""
    from aquainterp.checkpoints.nanochat import save_nanochat
    from aquainterp.model.gpt import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=64, vocab_size=100, n_layer=2, n_head=2, n_kv_head=2, n_embd=64,
                          architecture=architecture)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    folder = save_nanochat(model, tmp_path / "nc", step=12)
    state = torch.load(folder / "model_000012.pt", weights_only=True)
    assert state["transformer.wte.weight"].shape == (128, 64) and state["lm_head.weight"].shape == (128, 64)
    back, tokenizer, meta = load_model(tmp_path / "nc")
    assert tokenizer is None and meta["step"] == 12 and back.config.architecture == architecture
    ids = torch.randint(0, 100, (2, 30))
    with torch.no_grad():
        if architecture == "nanochat-2025-10":  # nanochat 2c4473d's bf16 tables come back with the import
            back.set_rotary_dtype("float32")
        # exact on any CPU: the saved and loaded weights are equal tensors through the same kernels on the same shapes
        assert torch.equal(back(ids), model(ids))
