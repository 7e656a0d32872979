"""The real-data path's traps (issue 27), one test each: a document field other than "text"
(--text-field, tokenizer and base), base validation on a held-out slice of its own data, an SFT or RL
evaluation set the model trained on (refused, or trimmed with a warning naming it), and an export into
the nanochat folder its kind of model is read from (base_checkpoints, chatsft_checkpoints, chatrl_checkpoints)."""

import json
from pathlib import Path

import pytest
import torch

from aquainterp.checkpoints.load import load_model
from aquainterp.checkpoints.native import load_checkpoint
from aquainterp.cli.main import main
from aquainterp.tasks.aqua import load_aqua
from aquainterp.tasks.synthetic import SyntheticTask, document
from training import rl
from training.base import BaseConfig, validation_split
from training.base import run as run_base
from training.common import parse_config
from training.overlap import check_overlap, rl_held_out, sft_eval_aqua
from training.sft import SFTConfig
from training.sft import run as run_sft
from training.tok_train import TokTrainConfig
from training.tok_train import run as run_tok

CPU = dict(device="cpu", compile="off", bf16="off")


@pytest.fixture(scope="module")
def body_file(tmp_path_factory) -> Path:
    """600 synthetic documents in a JSON Lines file whose text field is "body", not "text"."""
    path = tmp_path_factory.mktemp("data") / "docs.jsonl"
    problems = SyntheticTask(seed=0, split="train").problems(600)
    path.write_text("".join(json.dumps({"id": i, "body": document(p)}) + "\n" for i, p in enumerate(problems)))
    return path


@pytest.fixture(scope="module")
def tokenizer_dir(body_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tok")
    report = run_tok(TokTrainConfig(data=str(body_file), text_field="body", out_dir=str(out), vocab_size=512,
                                    max_chars=200_000, eval_docs=20))
    assert report["synthetic"] > 1.5  # trained on the "body" texts, it compresses the task's text
    return out


def tiny_base(run_dir, tokenizer_dir, data, **kw) -> BaseConfig:
    cfg = dict(run_dir=str(run_dir), tokenizer_dir=str(tokenizer_dir), data=str(data), text_field="body", depth=2,
               aspect_ratio=32, head_dim=32, seq_len=256, device_batch_size=2, total_batch_tokens=512, max_steps=1,
               eval_every=0, save_every=1, val_docs=8, **CPU)
    cfg.update(kw)
    return BaseConfig(**cfg)


@pytest.fixture(scope="module")
def base_ckpt(tmp_path_factory, tokenizer_dir, body_file) -> Path:
    run_dir = tmp_path_factory.mktemp("base")
    run_base(tiny_base(run_dir, tokenizer_dir, body_file))
    return run_dir / "checkpoints"


def test_text_field_names_the_document_field_of_tokenizer_and_base_data(body_file, tokenizer_dir, tmp_path, capsys):
    assert parse_config(TokTrainConfig, ["--data", str(body_file), "--text-field", "body"], "").text_field == "body"
    assert parse_config(BaseConfig, ["--data", str(body_file), "--text-field", "body", "--tokenizer-dir",
                                     str(tokenizer_dir)], "").text_field == "body"
    with pytest.raises(ValueError, match=r"has no string field 'text' \(fields: \['body', 'id'\]\); name the text "
                                         r"field with --text-field"):
        run_tok(TokTrainConfig(data=str(body_file), out_dir=str(tmp_path / "tok"), vocab_size=512, eval_docs=5))
    result = run_base(tiny_base(tmp_path / "base", tokenizer_dir, body_file))
    assert 0 < result["val/bpb"] < 20
    with pytest.raises(ValueError, match="has no string field 'text'"):
        run_base(tiny_base(tmp_path / "base_text", tokenizer_dir, body_file, text_field="text"))


def test_base_validates_on_a_held_out_slice_of_its_own_data(body_file, tokenizer_dir, tmp_path, capsys):
    """By default the first --val-docs documents of --data validate and training starts after them; a
    --val-data naming the same file (spelled another way) is held out the same way; another source
    validates while training reads --data from its start. The console says which."""
    cfg = tiny_base(tmp_path / "a", tokenizer_dir, body_file)
    assert validation_split(cfg)[:2] == (str(body_file), 8)
    same = tiny_base(tmp_path / "a", tokenizer_dir, body_file, val_data=str(body_file.parent / "." / body_file.name))
    assert validation_split(same)[:2] == (str(body_file), 8)
    assert validation_split(tiny_base(tmp_path / "a", tokenizer_dir, body_file, val_data="synthetic"))[:2] == \
        ("synthetic", 0)

    run_base(cfg)
    assert (f"validation on the first 8 documents of --data {body_file}, held out of training (training starts "
            "at document 8)") in capsys.readouterr().out
    run_base(tiny_base(tmp_path / "b", tokenizer_dir, body_file, val_data="synthetic"))
    assert "validation on the first 8 documents of --val-data synthetic (training reads --data" in \
        capsys.readouterr().out
    run_base(same.__class__(**{**vars(same), "run_dir": str(tmp_path / "c")}))
    assert "--val-data names the same source as --data, so it is held out the same way" in capsys.readouterr().out
    # what the held-out run trained on: the file without its first 8 documents, exactly
    tail = tmp_path / "tail.jsonl"
    tail.write_text("".join(body_file.read_text().splitlines(keepends=True)[8:]))
    run_base(tiny_base(tmp_path / "d", tokenizer_dir, tail, val_data="synthetic"))
    held, other, spelled, cut = (load_checkpoint(tmp_path / r / "checkpoints") for r in ("a", "b", "c", "d"))
    assert held.meta["data_position"] == spelled.meta["data_position"] == cut.meta["data_position"]
    for name, weight in held.model_state.items():
        # exact by construction: the same documents through the same kernels in one process
        assert torch.equal(weight, cut.model_state[name]) and torch.equal(weight, spelled.model_state[name]), name
    assert any(not torch.equal(w, other.model_state[n]) for n, w in held.model_state.items())  # it read docs 0-7


def test_sft_refuses_to_evaluate_on_its_own_training_problems_and_trims_a_small_overlap(
        base_ckpt, tmp_path, shared_data, capsys):
    dev = shared_data / "aqua_rat" / "dev.json"
    rows = load_aqua(dev)
    sft = dict(init_from=str(base_ckpt), synthetic=64, aqua=str(dev), eval_aqua=str(dev), eval_synthetic=0,
               device_batch_size=8, examples_per_step=8, max_steps=1, eval_every=0, save_every=1, **CPU)
    with pytest.raises(ValueError, match=rf"training.sft: {len(rows)} of the {len(rows)} problems of --eval-aqua "
                                         rf"{dev} are also in the training mixture \(--aqua {dev}\)"):
        run_sft(SFTConfig(run_dir=str(tmp_path / "all"), **sft))
    # ten rows trained on: the eval keeps the other rows and says which ten it dropped
    kept = sft_eval_aqua(SFTConfig(**{**sft, "aqua_limit": 10}), rows)
    out = capsys.readouterr().out
    assert len(kept) == len(rows) - 10 and {p.source for p in kept}.isdisjoint(p.source for p in rows[:10])
    assert f"warning: training.sft: 10 of the {len(rows)} problems of --eval-aqua {dev} are also in" in out
    assert f"({rows[0].source}, {rows[1].source}, {rows[2].source}, ...)" in out
    # the same problem under another name is the same problem: spacing and case do not hide it
    twin = rows[0].__class__(f"  {rows[0].question.upper()} ", rows[0].options, "", rows[0].correct, "copy:1")
    with pytest.raises(ValueError, match="1 of the 1 problems of x are also in y"):
        check_overlap([twin], rows[:1], "x", "y", "stage")


def test_rl_refuses_held_out_problems_its_sft_checkpoint_trained_on(base_ckpt, tmp_path, shared_data, capsys):
    dev = shared_data / "aqua_rat" / "dev.json"
    sft = dict(init_from=str(base_ckpt), synthetic=16, aqua=str(dev), device_batch_size=8, examples_per_step=8,
               max_steps=1, eval_every=0, eval_synthetic=0, save_every=1, **CPU)
    run_sft(SFTConfig(run_dir=str(tmp_path / "sft_all"), **sft))  # trained on every dev.json row
    run_sft(SFTConfig(run_dir=str(tmp_path / "sft_10"), aqua_limit=10, **sft))  # on its first ten rows
    config = rl.RLConfig(task="aqua", data=str(dev), checkpoint=str(tmp_path / "sft_all" / "checkpoints"),
                         eval_examples=100, max_steps=1, out=str(tmp_path / "rl"), device="cpu")
    with pytest.raises(ValueError, match=r"training.rl: 100 of the 100 problems of the RL held-out problems are "
                                         r"also in the data of checkpoint .*sft_all/checkpoints \(its --aqua"):
        rl.run(config)
    assert not (tmp_path / "rl" / "metrics.jsonl").exists()  # refused before anything ran
    config.checkpoint = str(tmp_path / "sft_10" / "checkpoints")
    _, held_out = rl.load_problems(config)
    trained = {p.question for p in load_aqua(dev)[:10]}
    shared = [p for p in held_out if p.question in trained]
    assert 0 < len(shared) < 50  # the seed-0 shuffle holds out some of the ten
    kept = rl_held_out(config, held_out)
    assert kept == [p for p in held_out if p.question not in trained]
    assert f"warning: training.rl: {len(shared)} of the 100 problems of the RL held-out problems" in \
        capsys.readouterr().out


@pytest.fixture(scope="module")
def sft_dir(base_ckpt, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("sft")
    run_sft(SFTConfig(init_from=str(base_ckpt), run_dir=str(run_dir), synthetic=16, device_batch_size=8,
                      examples_per_step=8, max_steps=1, eval_every=0, eval_synthetic=0, save_every=1, **CPU))
    return run_dir


@pytest.mark.parametrize("kind, folder", [(None, "chatsft_checkpoints"), ("rl", "chatrl_checkpoints"),
                                          ("base", "base_checkpoints")])
def test_export_nanochat_writes_the_folder_of_its_kind(sft_dir, tmp_path, capsys, kind, folder):
    """An SFT checkpoint goes to chatsft_checkpoints/ (its recorded stage) unless --kind says otherwise, so
    nanochat's chat_cli -i sft|rl finds it; the weights read back equal."""
    capsys.readouterr()
    out = tmp_path / "nanochat"
    assert main(["export", str(sft_dir / "checkpoints"), str(out), "--format", "nanochat",
                 *(["--kind", kind] if kind else [])]) == 0
    why = "the checkpoint's stage 'sft'" if kind is None else "--kind"
    assert f"kind {kind or 'sft'} from {why}: chat_cli -i {kind or 'sft'}" in capsys.readouterr().out
    (pt,) = out.glob("*/*/model_*.pt")
    assert pt.parent.parent.name == folder and pt.parent.name == "d2"
    assert main(["import-nanochat", str(pt.parent), str(tmp_path / "back")]) == 0
    ours, back = load_model(sft_dir / "checkpoints")[0], load_model(tmp_path / "back")[0]
    for (name, a), (_, b) in zip(ours.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), name  # exact by construction: export and import copy tensors
    assert main(["export", str(sft_dir / "checkpoints"), str(tmp_path / "hf"), "--kind", "rl"]) == 2
    assert "--kind names nanochat's checkpoint folder; it applies to --format nanochat only" in capsys.readouterr().err
