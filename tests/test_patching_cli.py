"""`aquainterp patch` end to end on a saved checkpoint and an HF export, and its errors for bad input."""

import json
import re

import pytest
import torch
from safetensors import safe_open
from tasks_tokenizer import trained_tokenizer
from test_patching import random_gpt

from aquainterp.checkpoints.huggingface import export_hf
from aquainterp.checkpoints.native import save_checkpoint
from aquainterp.cli.main import main

# a random model writes no "Answer:" of its own, so these runs patch the fixed-prompt decision
# a random model is wrong on most clean prompts: --keep-all-pairs patches its pairs anyway (the plumbing under test)
FAST = ["--task", "synthetic", "--n-pairs", "2", "--batch-size", "64", "--sweeps", "resid_pre,z", "--decision", "prompt",
        "--keep-all-pairs"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(checkpoint folder, HF export folder) of one small random GPT with the real tokenizer."""
    tok = trained_tokenizer()
    model = random_gpt(n_layer=1, vocab=tok.vocab_size, seed=5)
    root = tmp_path_factory.mktemp("patch_cli")
    save_checkpoint(root / "ckpt", 3, model, None, {"note": "patching test"}, tokenizer=tok)
    export_hf(model, tok, root / "hf")
    return root / "ckpt", root / "hf"


def run_cli(args, capsys):
    code = main(["patch", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


def test_checkpoint_to_tensors_json_and_html(saved, tmp_path, capsys):
    ckpt, _ = saved
    code, out, err = run_cli(["--checkpoint", ckpt, *FAST, "--out", tmp_path], capsys)
    assert code == 0, err
    assert "2 of 2 pairs in the headline (0 problems skipped)" in out
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["step"] == 3 and summary["n_pairs"] == 2 and summary["corruption"] == "permute"
    assert set(summary["sweeps"]) == {"denoise/resid_pre", "denoise/z"}
    with safe_open(str(tmp_path / "patching.safetensors"), "pt") as f:
        t = {k: f.get_tensor(k) for k in f.keys()}
        assert json.loads(f.metadata()["axes"])["denoise/z"] == ["layer", "head"]
    resid = t["denoise/resid_pre/normalized"]
    assert resid.shape == (1, len(summary["positions"])) == (1, int(t["lengths"].max()))
    ld = t["denoise/resid_pre/logit_diff"]
    expect = (ld.mean(-1) - t["corrupted_logit_diff"].mean()) / (t["clean_logit_diff"].mean() - t["corrupted_logit_diff"].mean())
    torch.testing.assert_close(resid, expect, atol=1e-5, rtol=1e-5)
    top = summary["sweeps"]["denoise/resid_pre"]["top_cells"][0]
    assert resid[top["layer"], top["pos"]].item() == pytest.approx(top["value"])
    assert top["token"] == summary["positions"][top["pos"]]
    html = (tmp_path / "patching.html").read_text()
    assert html.count("class='aq-panel'") == 2 and html.count("plotly.js v") == 1  # plotly.js inlined once
    assert html.count("Plotly.newPlot") == 2 + html.count("<details class='full'>")  # cropped + full behind toggles
    assert re.search(r"<script[^>]*\bsrc=", html) is None  # nothing fetched: works offline
    assert "0: " + summary["positions"][-1].split(": ", 1)[1] in html  # token labels on the axis


def test_hf_directory_gives_the_same_tensors(saved, tmp_path, capsys):
    ckpt, hf = saved
    assert run_cli(["--checkpoint", ckpt, *FAST, "--out", tmp_path / "a"], capsys)[0] == 0
    assert run_cli(["--hf-dir", hf, *FAST, "--out", tmp_path / "b"], capsys)[0] == 0
    with safe_open(str(tmp_path / "a" / "patching.safetensors"), "pt") as a, \
            safe_open(str(tmp_path / "b" / "patching.safetensors"), "pt") as b:
        for key in a.keys():
            torch.testing.assert_close(a.get_tensor(key), b.get_tensor(key), atol=1e-6, rtol=0)


def assert_clean_error(code, err, *needles, status=2):
    assert code == status  # 2: usage error, 1: runtime failure (a file that cannot be loaded)
    assert "Traceback" not in err and err.startswith("aquainterp patch: error: ")
    for needle in needles:
        assert needle in err, err


def test_missing_truncated_and_mismatched_checkpoints(saved, tmp_path, capsys):
    import shutil

    ckpt, hf = saved
    code, _, err = run_cli(["--checkpoint", tmp_path / "nowhere", *FAST, "--out", tmp_path / "o"], capsys)
    assert_clean_error(code, err, "nowhere", "does not exist")

    cut = tmp_path / "cut"
    shutil.copytree(ckpt, cut)
    weights = cut / "step_000003" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    code, _, err = run_cli(["--checkpoint", cut, *FAST, "--out", tmp_path / "o"], capsys)
    assert_clean_error(code, err, "model.safetensors", "truncated", status=1)

    other = tmp_path / "other"
    shutil.copytree(ckpt, other)
    meta_path = other / "step_000003" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["model_config"]["n_embd"] = 128
    meta_path.write_text(json.dumps(meta))
    code, _, err = run_cli(["--checkpoint", other, *FAST, "--out", tmp_path / "o"], capsys)
    assert_clean_error(code, err, "cannot load checkpoint", "shape", status=1)

    bad_hf = tmp_path / "bad_hf"
    shutil.copytree(hf, bad_hf)
    (bad_hf / "model.safetensors").write_bytes((hf / "model.safetensors").read_bytes()[:500])
    code, _, err = run_cli(["--hf-dir", bad_hf, *FAST, "--out", tmp_path / "o"], capsys)
    assert_clean_error(code, err, "cannot load HF directory", "bad_hf", status=1)
    assert not (tmp_path / "o").exists()


def test_bad_flags_and_unpairable_data(saved, tmp_path, capsys, shared_data):
    ckpt, _ = saved
    code, _, err = run_cli(["--checkpoint", ckpt, "--sweeps", "resid_pre,bogus", "--out", tmp_path], capsys)
    assert_clean_error(code, err, "--sweeps", "bogus")
    code, _, err = run_cli(["--checkpoint", ckpt, "--n-pairs", "0", "--out", tmp_path], capsys)
    assert_clean_error(code, err, "--n-pairs", "must be an integer >= 1")
    aqua = shared_data / "aqua_rat" / "dev.json"
    code, _, err = run_cli(["--checkpoint", ckpt, "--task", "aqua", "--data", aqua, "--corruption", "numbers",
                            "--decision", "prompt", "--out", tmp_path], capsys)
    assert_clean_error(code, err, "dev.json:1", "numbers")
    code, _, err = run_cli(["--checkpoint", ckpt, "--task", "aqua", "--data", tmp_path / "none.json",
                            "--out", tmp_path], capsys)
    assert_clean_error(code, err, "none.json")


def test_completion_decision_counts_completions_without_a_marker(saved, tmp_path, capsys):
    """The default decision is the model's own completion; a random model never writes "Answer:", so every
    problem is skipped, counted, and the command says so instead of patching anything."""
    ckpt, _ = saved
    args = ["--checkpoint", ckpt, "--n-pairs", "2", "--max-new-tokens", "4", "--sweeps", "z"]
    code, _, err = run_cli([*args, "--out", tmp_path / "o"], capsys)
    assert "greedy completions: 100%" in err  # the progress bar of the generation, then the error line
    assert_clean_error(code, err.rsplit("\r", 1)[-1].split("\n", 1)[1], "no noise pairs", "8 of the model's completions never wrote the answer marker")
    code, _, err = run_cli([*args, "--style", "checked", "--out", tmp_path / "o"], capsys)
    assert_clean_error(code, err, "--style", "--decision prompt")
    code, _, err = run_cli([*args, "--corruption", "numbers", "--out", tmp_path / "o"], capsys)
    assert_clean_error(code, err, "numbers changes the question")
    assert not (tmp_path / "o").exists()


def test_attribution_method_writes_the_same_outputs(saved, tmp_path, capsys):
    from aquainterp.checkpoints.load import load_model
    from aquainterp.patching.attribution import attribution_sweeps
    from aquainterp.patching.pairs import make_pairs
    from aquainterp.patching.patcher import Patcher
    from aquainterp.tasks.synthetic import SyntheticTask

    ckpt, _ = saved
    code, _, err = run_cli(["--checkpoint", ckpt, *FAST, "--method", "attribution", "--out", tmp_path], capsys)
    assert code == 0, err
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["method"] == "attribution" and summary["decision"] == "prompt"
    model, tok, _ = load_model(ckpt)
    pairs, _ = make_pairs(tok, SyntheticTask(seed=0, split="eval").problems(8)[:2], "permute", seed=0)
    (expect,) = attribution_sweeps(Patcher(model, pairs, align="end", progress=False), ["z"])
    with safe_open(str(tmp_path / "patching.safetensors"), "pt") as f:
        torch.testing.assert_close(f.get_tensor("denoise/z/normalized"), expect.normalized, atol=1e-6, rtol=0)


def test_library_entry_equals_the_command_line(saved, tmp_path, capsys):
    """run(PatchConfig(...)), what the demo calls, writes what `aquainterp patch` writes for the same
    settings; a config built in Python is checked like the flags, and is not modified."""
    from aquainterp.patching.command import PatchConfig, run

    ckpt, _ = saved
    code, _, err = run_cli(["--checkpoint", ckpt, *FAST, "--out", tmp_path / "cli"], capsys)
    assert code == 0, err
    config = PatchConfig(checkpoint=str(ckpt), task="synthetic", n_pairs=2, batch_size=64, sweeps="resid_pre,z",
                         decision="prompt", keep_all_pairs=True, out=tmp_path / "lib")
    assert run(config) == 0 and config.corruption is None  # the default was filled on a copy
    with safe_open(str(tmp_path / "cli" / "patching.safetensors"), "pt") as a, \
            safe_open(str(tmp_path / "lib" / "patching.safetensors"), "pt") as b:
        assert sorted(a.keys()) == sorted(b.keys())
        for k in a.keys():
            # exact on any CPU: the CLI and the library run the same sweep, the same kernels on the same shapes
            assert torch.equal(a.get_tensor(k), b.get_tensor(k)), k
    summaries = [json.loads((tmp_path / d / "summary.json").read_text()) for d in ("cli", "lib")]
    assert summaries[0] == summaries[1]
    capsys.readouterr()
    assert run(PatchConfig(checkpoint=ckpt, n_pairs=0, out=tmp_path / "bad")) == 2
    assert "--n-pairs must be" in capsys.readouterr().err
    assert run(PatchConfig(checkpoint=ckpt, hf_dir=ckpt, out=tmp_path / "bad")) == 2
    assert "exactly one of --checkpoint, --hf-dir, --checkpoint-series" in capsys.readouterr().err
    assert run(PatchConfig(checkpoint=ckpt)) == 2
    assert "--out is required" in capsys.readouterr().err


def test_pairs_with_a_wrong_clean_answer_are_left_out_of_the_headline_unless_kept(saved, tmp_path, capsys):
    """A random model is wrong on most clean prompts (clean letter logit difference < 0). By default those
    pairs are left out of the sweeps and the headline, counted and listed (console, summary.json, page), with
    a warning when fewer than half remain; --keep-all-pairs patches every pair and still lists them."""
    ckpt, _ = saved
    args = ["--checkpoint", ckpt, "--task", "synthetic", "--n-pairs", "8", "--batch-size", "64", "--sweeps", "z",
            "--decision", "prompt", "--min-gap", "0"]  # gap 0: wrong clean answers and negative gaps are screened
    code, out, err = run_cli([*args, "--keep-all-pairs", "--out", tmp_path / "all"], capsys)
    assert code == 0, err
    everything = json.loads((tmp_path / "all" / "summary.json").read_text())
    clean = {p["name"]: p["clean_logit_diff"] for p in everything["pairs"]}
    gap = {p["name"]: p["clean_logit_diff"] - p["corrupted_logit_diff"] for p in everything["pairs"]}
    wrong = sorted(n for n, c in clean.items() if c < 0)
    out_of_it = sorted(n for n in clean if clean[n] < 0 or gap[n] < 0)
    right = sorted(n for n in clean if n not in out_of_it)
    assert len(clean) == 8 and wrong and right  # this seed's random model gets some right, some wrong
    assert sorted(e["name"] for e in everything["screen"]["excluded"]) == out_of_it  # listed, yet kept
    assert everything["clean_logit_diff_mean"] == pytest.approx(sum(clean.values()) / 8, abs=1e-6)
    assert f"kept (--keep-all-pairs): {wrong[0]}: wrong on the clean prompt" in out

    code, out, err = run_cli([*args, "--out", tmp_path / "screened"], capsys)
    assert code == 0, err
    screened = json.loads((tmp_path / "screened" / "summary.json").read_text())
    assert sorted(p["name"] for p in screened["pairs"]) == right and screened["n_pairs"] == len(right)
    reasons = {e["name"]: e["reason"] for e in screened["screen"]["excluded"]}
    assert sorted(reasons) == out_of_it
    assert all(reasons[n].startswith("wrong on the clean prompt (clean logit diff") for n in wrong)
    assert all(reasons[n].startswith("clean - corrupted gap") for n in out_of_it if n not in wrong)
    # the headline is the kept pairs' alone: their clean mean, every one of them > 0
    assert screened["clean_logit_diff_mean"] == pytest.approx(sum(clean[n] for n in right) / len(right), abs=1e-5)
    assert screened["clean_logit_diff_mean"] > 0 > everything["clean_logit_diff_mean"]
    assert f"{len(right)} of 8 pairs in the headline" in out and f"left out of the headline: {wrong[0]}" in out
    few = 2 * len(right) < 8  # the warning comes exactly when fewer than half remain
    assert (f"warning: only {len(right)} of 8 pairs remain" in out) == few
    page = (tmp_path / "screened" / "patching.html").read_text()
    assert f"{len(out_of_it)} of 8 pairs left out of the headline" in page and wrong[0] in page
    assert ("⚠ only" in page) == few
    assert "<b>L1</b> layer 1" in page and "<b>*</b> after a token: the pairs differ there" in page

    # kept anyway under a threshold the mean gap does not reach: every restored fraction is flagged
    code, out, err = run_cli([*args[:-2], "--min-gap", "1000", "--keep-all-pairs", "--out", tmp_path / "kept"], capsys)
    assert code == 0, err
    kept = json.loads((tmp_path / "kept" / "summary.json").read_text())
    assert kept["screen"]["reliable"] is False and screened["screen"]["reliable"] is True
    assert "warning: the mean clean - corrupted gap is" in out and "are not reliable" in out
    assert (tmp_path / "kept" / "patching.html").read_text().count("⚠ unreliable: tiny gap") == 1  # one sweep, z

    # a threshold no pair reaches: nothing left to patch, said in one line, nothing written
    code, _, err = run_cli([*args[:-2], "--min-gap", "1000", "--out", tmp_path / "none"], capsys)
    assert_clean_error(code, err, "all 8 pairs are left out of the headline", "--keep-all-pairs")
