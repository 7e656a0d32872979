"""`aquainterp patch --checkpoint-series`: the same pairs on every selected step of a tiny run, a step x cell
view whose rows change exactly where a checkpoint changed, metrics the "Circuit drift" template draws."""

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from tasks_tokenizer import trained_tokenizer
from test_patching import random_gpt

from aquainterp.checkpoints.native import save_checkpoint
from aquainterp.cli.main import main
from aquainterp.patching.series import select_steps
from dashboards.template import get_template

ARGS = ["--task", "synthetic", "--n-pairs", "2", "--batch-size", "64", "--sweeps", "resid_pre,attn_out,z",
        "--decision", "prompt"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """Checkpoints at steps 0, 5 and 10: 0 and 5 hold the same weights, 10 has one attention head's output
    projection scaled (a deliberately changed checkpoint)."""
    tok = trained_tokenizer()
    model = random_gpt(n_layer=2, vocab=tok.vocab_size, seed=5)
    root = tmp_path_factory.mktemp("series") / "checkpoints"
    save_checkpoint(root, 0, model, None, {"note": "series test"}, tokenizer=tok)
    save_checkpoint(root, 5, model, None, {"note": "series test"}, tokenizer=tok)
    with torch.no_grad():
        model.blocks[1].attn.c_proj.weight[:, :32] *= 3.0  # head 0 of layer 1 writes three times as much
    save_checkpoint(root, 10, model, None, {"note": "series test"}, tokenizer=tok)
    return root


def tensors(path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()["axes"])


def test_steps_shapes_and_the_changed_checkpoint_changes_its_row(run_dir, tmp_path, capsys):
    out = tmp_path / "drift"
    code = main(["patch", "--checkpoint-series", str(run_dir), "--every", "5", *ARGS, "--out", str(out)])
    printed, err = capsys.readouterr()
    assert code == 0, err
    assert "2 pairs on 3 steps [0, 5, 10]" in printed
    t, axes = tensors(out / "series.safetensors")
    assert t["steps"].tolist() == [0, 5, 10]
    assert axes["denoise/z"] == ["step", "layer", "head"] and axes["denoise/resid_pre"] == ["step", "layer", "pos"]
    z = t["denoise/z/normalized"]
    n_pos = int(t["denoise/resid_pre/normalized"].shape[-1])
    assert z.shape == (3, 2, 2) and t["denoise/resid_pre/normalized"].shape == (3, 2, n_pos)
    assert t["denoise/z/logit_diff"].shape == (3, 2, 2, 2) and t["clean_logit_diff"].shape == (3, 2)
    for key in ("denoise/z/normalized", "denoise/resid_pre/logit_diff", "denoise/attn_out/logit_diff",
                "clean_logit_diff", "corrupted_logit_diff"):
        # exact on any CPU: the same weights and pairs through the same kernels on the same shapes
        assert torch.equal(t[key][0], t[key][1]), key  # same weights, same pairs: the same row
    assert (t["denoise/z/logit_diff"][2] - t["denoise/z/logit_diff"][1]).abs().max() > 1e-3
    assert (t["clean_logit_diff"][2] - t["clean_logit_diff"][1]).abs().max() > 1e-3
    # the pairs are the same token sequences at every step: the newest step's report shows them
    summary = json.loads((out / "summary.json").read_text())
    assert summary["step"] == 10 and summary["series"]["steps"] == [0, 5, 10] and summary["series"]["failed"] == {}
    page = (out / "patching.html").read_text()
    assert page.count("class='aq-panel series'") == 3 and "<h2>Across checkpoints</h2>" in page
    assert page.index("<h2>Heatmaps</h2>") < page.index("<h2>Across checkpoints</h2>") < page.index("<h2>Pairs</h2>")
    # one metrics.jsonl row per step, against patch/step, the names the Circuit drift template reads
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 5, 10] and [r["patch/step"] for r in rows] == [0, 5, 10]
    assert rows[0]["patch/denoise/z/layer1/head0"] == pytest.approx(float(z[0, 1, 0]))
    assert rows[2]["patch/denoise/attn_out/decision/layer1"] == pytest.approx(
        float(t["denoise/attn_out/normalized"][2, 1, -1]))
    template = get_template("circuit_drift")
    names = sorted(rows[0])
    for panel in template.panels:
        if panel.regex is not None and "mlp_out" not in panel.regex:  # mlp_out was not swept here
            assert panel.matches(names), panel.title
        assert panel.x in (None, "patch/step")
    assert set(template.panels[0].metrics) <= set(names)


def test_step_selection_and_a_step_with_nothing_to_restore(run_dir, tmp_path, capsys):
    assert select_steps(run_dir, 1) == [0, 5, 10]
    assert select_steps(run_dir, 10) == [0, 10] and select_steps(run_dir, 7) == [0, 10]  # the newest is kept
    with pytest.raises(ValueError, match="no saved checkpoints"):
        select_steps(tmp_path, 1)
    broken = tmp_path / "checkpoints"
    shutil.copytree(run_dir, broken)
    tok = trained_tokenizer()
    dead = random_gpt(n_layer=2, vocab=tok.vocab_size, seed=5)
    with torch.no_grad():
        dead.lm_head.weight.zero_()  # every logit 0: clean and corrupted runs agree, nothing to restore
    save_checkpoint(broken, 7, dead, None, {}, tokenizer=tok)
    code = main(["patch", "--checkpoint-series", str(broken), *ARGS, "--sweeps", "z", "--out", str(tmp_path / "o")])
    printed, err = capsys.readouterr()
    assert code == 0, err
    assert "nothing to restore at steps [7]" in printed
    t, _ = tensors(tmp_path / "o" / "series.safetensors")
    assert t["steps"].tolist() == [0, 5, 7, 10]
    assert torch.isnan(t["denoise/z/normalized"][2]).all() and not torch.isnan(t["denoise/z/normalized"][[0, 1, 3]]).any()
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert "nothing to restore" in summary["series"]["failed"]["7"]
    code = main(["patch", "--checkpoint-series", str(tmp_path / "none"), *ARGS, "--out", str(tmp_path / "p")])
    assert code == 2 and "does not exist" in capsys.readouterr().err


def test_training_patcher_keeps_its_pairs_and_restores_the_mode():
    from aquainterp.patching.series import TrainingPatcher
    from aquainterp.tasks import letter_token_ids
    from aquainterp.tasks.synthetic import SyntheticTask

    tok = trained_tokenizer()
    model = random_gpt(n_layer=2, vocab=tok.vocab_size, seed=3)
    problems = SyntheticTask(seed=0, split="eval", difficulty=1).problems(3)
    marker, _ = letter_token_ids(tok)
    calls = []

    def generate(m, prompts):  # the model's own greedy completions, with the marker written after them
        from aquainterp.patching.completion_pairs import greedy_completions

        calls.append(len(prompts))
        return [c + marker for c in greedy_completions(m, tok, prompts, max_new_tokens=4)]

    watcher = TrainingPatcher(tok, problems, sweeps=("z", "attn_out"), generate=generate)
    model.train()
    first = watcher(model, 0)
    assert model.training and calls == [3]
    assert first["patch/step"] == 0 and first["patch/pairs"] == 3 and first["patch/no_marker_frac"] == 0.0
    heads = {k for k in first if k.startswith("patch/denoise/z/")}
    assert heads == {f"patch/denoise/z/layer{la}/head{h}" for la in range(2) for h in range(2)}
    assert {"patch/denoise/attn_out/decision/layer0", "patch/clean_logit_diff"} <= set(first)
    pairs = watcher.pairs
    with torch.no_grad():
        model.blocks[1].attn.c_proj.weight.mul_(2.0)
    second = watcher(model, 5)
    assert calls == [3] and watcher.pairs is pairs  # the same pairs, no new completions
    assert second["patch/step"] == 5 and second["patch/clean_logit_diff"] != first["patch/clean_logit_diff"]
    # a model that writes no "Answer:" gives no pairs yet: counted, and tried again at the next call
    silent = TrainingPatcher(tok, problems, generate=lambda m, prompts: [[] for _ in prompts])
    assert silent(model, 0) == {"patch/step": 0, "patch/pairs": 0, "patch/no_marker_frac": 1.0}
    assert silent.pairs is None


def test_rl_patch_every_logs_patch_metrics_on_its_steps(tmp_path, shared_data):
    from test_rl import _policy, _smoke_config

    from training import rl

    config = _smoke_config(tmp_path, shared_data, task="synthetic", data=None, max_steps=3, patch_every=2,
                           patch_pairs=2, table_every=0)
    rl.run(config, policy=_policy())
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    patched = [r for r in rows if "patch/step" in r]
    assert [r["patch/step"] for r in patched] == [0, 2] and [r["step"] for r in patched] == [0, 2]
    # nanochat's init zeroes lm_head: the policy writes no "Answer:", so no pairs, counted
    assert all(r["patch/pairs"] == 0 and r["patch/no_marker_frac"] == 1.0 for r in patched)
