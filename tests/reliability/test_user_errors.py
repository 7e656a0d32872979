"""Issue 19: a hostile or careless user's command lines, each run for real through the command's main()
on real small files. Every case is a row of the user-error table printed at the end of the session.

Data loss first (the demo and the stages only delete what they made; outputs never over inputs), then
checkpoints whose meta lies about sizes, paths that escape the run dir, arguments that must fail in one
line before anything starts, and inputs that used to hang or crash.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from reliability.conftest import base_config, call_cli, one_line_error, record_case, run_stage, snapshot

REPO = Path(__file__).resolve().parents[2]


def aquainterp(argv, capsys):
    from aquainterp.cli.main import main

    return call_cli(main, argv, capsys)


# ------------------------------------------------------------------------------------------------
# data loss


def _user_tree(root: Path) -> None:
    """What a user keeps next to (and in) a runs/ folder: their own base run and notes."""
    (root / "base" / "checkpoints" / "step_000006").mkdir(parents=True)
    (root / "base" / "checkpoints" / "step_000006" / "meta.json").write_text('{"mine": true}')
    (root / "base" / "metrics.jsonl").write_text('{"step": 1, "train/loss": 3.0}\n')
    (root / "notes.txt").write_text("do not lose me\n")
    (root / "my_experiment").mkdir()
    (root / "my_experiment" / "results.csv").write_text("a,b\n1,2\n")


@pytest.mark.parametrize("fresh", [False, True], ids=["plain", "fresh"])
def test_demo_refuses_folders_it_did_not_create(tmp_path, capsys, fresh):
    runs = tmp_path / "runs"
    _user_tree(runs)
    before = snapshot(runs)
    argv = ["demo", "--out", runs, "--budget", "small", *(["--fresh"] if fresh else [])]
    code, _, err = aquainterp(argv, capsys)
    holds, outcome = one_line_error(code, err, 2)
    holds = holds and f"{runs / 'base'}" in err and snapshot(runs) == before
    record_case(f"user files next to runs survive demo{' --fresh' if fresh else ''}",
                f"aquainterp demo --out runs{' --fresh' if fresh else ''}", "exit 2, names runs/base, no change",
                outcome + ("" if snapshot(runs) == before else " (FILES CHANGED)"), holds)


def test_demo_stage_redoes_only_its_own_folders(tmp_path):
    """Stage.start deletes a folder the demo marked (a half-done or outdated stage) and refuses one it did
    not make; the user's files beside the stage folders are never looked at."""
    from aquainterp.cli.rundir import RunDirError
    from training.demo import Stage

    (tmp_path / "notes.txt").write_text("keep")
    ours = Stage(tmp_path, "sft", {"steps": 1})
    ours.start()
    (ours.dir / "stale.bin").write_text("from an interrupted run")
    Stage(tmp_path, "sft", {"steps": 2}).start()  # settings changed: the demo redoes its own stage
    redone = not (ours.dir / "stale.bin").exists() and ours.dir.is_dir()
    foreign = tmp_path / "rl"
    foreign.mkdir()
    (foreign / "precious.safetensors").write_text("user weights")
    with pytest.raises(RunDirError, match="not created by aquainterp demo"):
        Stage(tmp_path, "rl", {}).start()
    kept = (foreign / "precious.safetensors").read_text() == "user weights" and (tmp_path / "notes.txt").exists()
    record_case("demo redoes its own stage, refuses others", "Stage.start (demo --fresh path)",
                "own dir redone, user dir kept", f"own redone: {redone}, user dir kept: {kept}", redone and kept)


def _base_argv(run_dir: Path, tokenizer_dir: Path, *extra) -> list:
    return ["--run-dir", run_dir, "--tokenizer-dir", tokenizer_dir, "--depth", "1", "--aspect-ratio", "64",
            "--head-dim", "32", "--seq-len", "128", "--device-batch-size", "2", "--total-batch-tokens", "256",
            "--max-steps", "3", "--eval-every", "0", "--save-every", "1", "--val-docs", "4", "--device", "cpu",
            "--compile", "off", "--bf16", "off", *extra]


def test_same_run_dir_twice_refuses_then_overwrite_replaces(tmp_path, tokenizer_dir, capsys):
    from aquainterp.checkpoints.native import available_steps
    from aquainterp.logger import read_metrics
    from training.base import main as base_main

    run_dir = tmp_path / "run"
    run_stage(base_config(run_dir, tokenizer_dir, max_steps=6, save_every=1))  # the user's earlier run
    before = snapshot(run_dir)
    code, _, err = call_cli(base_main, _base_argv(run_dir, tokenizer_dir), capsys)
    holds, outcome = one_line_error(code, err, 2)
    untouched = snapshot(run_dir) == before
    record_case("same --run-dir twice without --resume", "python -m training.base --run-dir RUN (again)",
                "exit 2 before touching anything", outcome + ("" if untouched else " (RUN CHANGED)"),
                holds and untouched and "--resume" in err and "--overwrite" in err)

    code, _, err = call_cli(base_main, _base_argv(run_dir, tokenizer_dir, "--resume", "--overwrite"), capsys)
    holds, outcome = one_line_error(code, err, 2)
    record_case("--resume with --overwrite", "python -m training.base --resume --overwrite", "exit 2",
                outcome, holds and snapshot(run_dir) == before)

    (run_dir / "checkpoints" / "README.user").write_text("the user's note in checkpoints/")
    code, _, err = call_cli(base_main, _base_argv(run_dir, tokenizer_dir, "--overwrite"), capsys)
    steps = available_steps(run_dir / "checkpoints")
    logged = [r["step"] for r in read_metrics(run_dir) if "train/loss" in r]
    holds = code == 0 and steps == [1, 2, 3] and logged == sorted(set(logged)) and max(logged) == 3 \
        and (run_dir / "checkpoints" / "README.user").exists()
    record_case("--overwrite replaces an earlier run", "python -m training.base --run-dir RUN --overwrite",
                "steps 1-3 only, no duplicate steps", f"exit {code}, steps {steps}, logged steps {logged}", holds)


def test_export_into_the_checkpoint_refuses(base_ckpt, tmp_path, capsys):
    from aquainterp.checkpoints.native import latest_step, load_checkpoint

    ckpt = tmp_path / "ckpt"
    shutil.copytree(base_ckpt, ckpt)
    step = ckpt / f"step_{latest_step(ckpt):06d}"
    before = snapshot(ckpt)
    code, _, err = aquainterp(["export", ckpt, step], capsys)
    holds, outcome = one_line_error(code, err, 2)
    load_checkpoint(ckpt)  # sizes and sha256 still match
    record_case("export into a checkpoint's own step dir", "aquainterp export CKPT CKPT/step_N", "exit 2, ckpt intact",
                outcome, holds and snapshot(ckpt) == before)


def test_dashboard_html_onto_metrics_refuses(tmp_path, capsys):
    run = tmp_path / "run"
    assert aquainterp(["dashboard", "sample", "--run", run, "--steps", "3"], capsys)[0] == 0
    metrics = run / "metrics.jsonl"
    before = metrics.read_bytes()
    code, _, err = aquainterp(["dashboard", "html", "--run", run, "-o", metrics], capsys)
    holds, outcome = one_line_error(code, err, 2)
    record_case("dashboard html -o onto metrics.jsonl", "aquainterp dashboard html --run R -o R/metrics.jsonl",
                "exit 2, metrics intact", outcome, holds and metrics.read_bytes() == before)


def test_patch_out_is_a_file_fails_before_any_sweep(base_ckpt, tmp_path, capsys):
    out = tmp_path / "results.txt"
    out.write_text("the user's file")
    t0 = time.perf_counter()
    code, _, err = aquainterp(["patch", "--checkpoint", base_ckpt, "--n-pairs", "2", "--out", out], capsys)
    seconds = time.perf_counter() - t0
    holds, outcome = one_line_error(code, err, 2)
    record_case("patch --out pointing at a file", "aquainterp patch --out FILE", "exit 2 before the sweeps",
                f"{outcome} ({seconds:.2f} s)", holds and out.read_text() == "the user's file" and seconds < 5)


# ------------------------------------------------------------------------------------------------
# checkpoints whose meta lies about sizes


def _lying_checkpoint(base_ckpt: Path, tmp_path: Path, field: str, value) -> Path:
    from aquainterp.checkpoints.native import latest_step

    ckpt = tmp_path / f"lie_{field}"
    shutil.copytree(base_ckpt, ckpt)
    meta_path = ckpt / f"step_{latest_step(ckpt):06d}" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["model_config"][field] = value
    meta_path.write_text(json.dumps(meta))  # meta.json is outside the file hashes: nothing else notices
    return ckpt


CHILD = textwrap.dedent("""
    import json, resource, sys, time
    limit = 4 << 30  # ulimit -v 4 GB: address space, so nothing big can even be mapped
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    from aquainterp.cli.main import main, subcommand_parser
    subcommand_parser(sys.argv[1])  # the command's imports (torch ...) are paid before the clock starts
    t0 = time.perf_counter()
    code = main(sys.argv[1:])
    print(json.dumps({"code": code, "seconds": time.perf_counter() - t0}))
""")


@pytest.mark.parametrize("field,value,command", [("vocab_size", 30_000_000, "eval"),
                                                  ("sequence_len", 2_000_000, "eval"),
                                                  ("vocab_size", 30_000_000, "patch"),
                                                  ("sequence_len", 2_000_000, "export"),
                                                  ("vocab_size", 30_000_000, "patch --hf-dir")])
def test_lying_model_config_fails_fast_under_4gb(base_ckpt, tmp_path, field, value, command):
    if command == "patch --hf-dir":  # an HF NanoChat directory whose config.json lies
        from aquainterp.checkpoints.huggingface import export_hf
        from aquainterp.model.gpt import GPT, GPTConfig

        model = GPT(GPTConfig(sequence_len=64, vocab_size=512, n_layer=1, n_head=2, n_kv_head=2, n_embd=64))
        model.init_weights()  # an HF NanoChat architecture (nanochat-2025-10), whatever the base stage's default
        ckpt = export_hf(model, None, tmp_path / "hf_lie")  # the size check comes before the tokenizer's
        config = json.loads((ckpt / "config.json").read_text())
        config[field] = value
        (ckpt / "config.json").write_text(json.dumps(config))
    else:
        ckpt = _lying_checkpoint(base_ckpt, tmp_path, field, value)
    argv = {"eval": ["eval", "--checkpoint", ckpt],
            "patch": ["patch", "--checkpoint", ckpt, "--out", tmp_path / "p"],
            "patch --hf-dir": ["patch", "--hf-dir", ckpt, "--out", tmp_path / "p"],
            "export": ["export", ckpt, tmp_path / "hf"]}[command]
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", CHILD, *map(str, argv)], capture_output=True, text=True,
                          cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    wall = time.perf_counter() - t0
    result = json.loads(done.stdout.strip().splitlines()[-1]) if done.stdout.strip() else {"code": None,
                                                                                         "seconds": float("nan")}
    err = [ln for ln in done.stderr.splitlines() if ln.strip()]
    named = bool(err) and field in err[-1] and f"{value:,}" in err[-1]
    holds = done.returncode == 0 and result["code"] == 1 and result["seconds"] < 2 and named and len(err) == 1 \
        and wall < 120
    record_case(f"meta {field} {value:.0e} under ulimit -v 4GB", f"aquainterp {command} (lying meta.json)",
                "exit 1 < 2 s, names the field", f"exit {result['code']} in {result['seconds']:.3f} s "
                f"(process {wall:.1f} s incl. imports): {(err or ['(none)'])[-1][:90]}", holds)


def test_config_that_does_not_fit_the_weights_names_the_tensor(base_ckpt, tmp_path, capsys):
    from aquainterp.checkpoints.native import load_checkpoint

    real = load_checkpoint(base_ckpt).meta["model_config"]["vocab_size"]
    ckpt = _lying_checkpoint(base_ckpt, tmp_path, "vocab_size", real * 2)
    code, _, err = aquainterp(["eval", "--checkpoint", ckpt], capsys)
    holds, outcome = one_line_error(code, err, 1)
    record_case("meta vocab_size 2x the weights'", "aquainterp eval (vocab_size doubled)",
                "exit 1 naming wte and both shapes", outcome,
                holds and "wte.weight" in err and str(real * 2) in err and str(real) in err)


# ------------------------------------------------------------------------------------------------
# paths from data stay inside the run dir


def test_image_paths_cannot_leave_the_run_dir(tmp_path, capsys):
    secret = tmp_path / "secret"
    secret.mkdir()
    figure = {"data": [{"type": "bar", "y": [1], "name": "SECRET-MARKER-7f3a"}], "layout": {}}
    (secret / "fig.json").write_text(json.dumps(figure))
    leaks = {}
    for how, path in (("../ path", "../secret/fig.json"), ("absolute path", str(secret / "fig.json")),
                      ("symlink", "link.json")):
        run = tmp_path / f"run_{len(leaks)}"
        run.mkdir()
        (run / "link.json").symlink_to(secret / "fig.json")
        row = {"step": 1, "attn/patterns/prompt0": {"_type": "plotly", "path": path}}
        (run / "metrics.jsonl").write_text(json.dumps(row) + "\n")
        out = tmp_path / f"report_{len(leaks)}.html"
        code, _, err = aquainterp(["dashboard", "html", "--run", run, "--template", "attention", "-o", out], capsys)
        page = out.read_text() if out.exists() else ""
        leaks[how] = (code, "SECRET-MARKER-7f3a" in page, "outside the run directory" in page)
    holds = all(code == 0 and not leaked and said for code, leaked, said in leaks.values())
    record_case("image panel path escapes the run dir", "aquainterp dashboard html (../, /abs, symlink)",
                "page built, file not embedded",
                ", ".join(f"{k}: {'LEAKED' if v[1] else 'not embedded'}" for k, v in leaks.items()), holds)


# ------------------------------------------------------------------------------------------------
# arguments: one line, exit 2, before anything starts


def test_max_steps_typos_refuse_before_a_run(tmp_path, tokenizer_dir, capsys):
    from training.base import main as base_main

    for value in ("-5", "0"):
        run_dir = tmp_path / f"run{value}"
        argv = _base_argv(run_dir, tokenizer_dir)
        argv[argv.index("--max-steps") + 1] = value
        code, _, err = call_cli(base_main, argv, capsys)
        holds, outcome = one_line_error(code, err, 2)
        record_case(f"--max-steps {value}", f"python -m training.base --max-steps {value}",
                    "exit 2, no run dir", outcome, holds and "--max-steps" in err and not run_dir.exists())


def test_mistyped_local_data_path_is_not_a_hub_id(base_ckpt, tmp_path, capsys, shared_data):
    typo = tmp_path / "aqua_rat" / "dev.jsn"
    t0 = time.perf_counter()
    code, _, err = aquainterp(["eval", "--checkpoint", base_ckpt, "--task", "aqua", "--data", typo], capsys)
    seconds = time.perf_counter() - t0
    holds, outcome = one_line_error(code, err, 2)
    record_case("mistyped local --data path", "aquainterp eval --task aqua --data dev.jsn",
                "exit 2 at once, no Hub call", f"{outcome} ({seconds:.2f} s)",
                holds and "dev.jsn" in err and seconds < 5)
    from aquainterp.tasks.aqua import load_aqua

    with pytest.raises(FileNotFoundError, match="no such file"):
        load_aqua("data/aqua/dev")  # library path: a relative folder that does not exist is not owner/name


@pytest.mark.parametrize("case,extra,want", [
    ("missing checkpoint", ["--checkpoint", "NOWHERE"], 2),
    ("checkpoint is a file", ["--checkpoint", "FILE"], 2),
    ("empty checkpoint folder", ["--checkpoint", "EMPTY"], 1),
    ("--n 0", ["--n", "0"], 2),
    ("--num-samples 0", ["--mode", "generative", "--num-samples", "0"], 2),
    ("--batch-size 0", ["--batch-size", "0"], 2),
    ("--temperature nan", ["--temperature", "nan"], 2),
    ("--max-new-tokens 0", ["--mode", "generative", "--max-new-tokens", "0"], 2),
    ("--device cuda:99", ["--device", "cuda:99"], 2),
])
def test_eval_bad_arguments(base_ckpt, tmp_path, capsys, case, extra, want):
    (tmp_path / "FILE").write_text("not a checkpoint")
    (tmp_path / "EMPTY").mkdir()
    extra = [str(tmp_path / a) if a in ("NOWHERE", "FILE", "EMPTY") else a for a in extra]
    argv = ["eval", *(["--checkpoint", base_ckpt] if "--checkpoint" not in extra else []), *extra]
    code, out, err = aquainterp(argv, capsys)
    holds, outcome = one_line_error(code, err, want)
    record_case(f"eval {case}", "aquainterp eval " + " ".join(a if "/" not in a else Path(a).name for a in extra),
                f"exit {want}, one line", outcome, holds and "accuracy" not in out)


def test_dashboard_load_a_folder(tmp_path, capsys):
    code, _, err = aquainterp(["dashboard", "load", tmp_path], capsys)
    holds, outcome = one_line_error(code, err, 2)
    record_case("dashboard load DIR", "aquainterp dashboard load DIR", "exit 2, one line", outcome, holds)


def test_debug_flag_shows_the_traceback(tmp_path, capsys):
    (tmp_path / "EMPTY").mkdir()
    code, _, err = aquainterp(["eval", "--checkpoint", tmp_path / "EMPTY"], capsys)
    code_d, _, err_d = aquainterp(["--debug", "eval", "--checkpoint", tmp_path / "EMPTY"], capsys)
    holds = code == code_d == 1 and "Traceback" not in err and "Traceback" in err_d
    record_case("--debug", "aquainterp --debug eval --checkpoint EMPTY", "traceback only with --debug",
                f"without: {err.count(chr(10))} line(s); with: traceback {'shown' if 'Traceback' in err_d else 'MISSING'}",
                holds)


# ------------------------------------------------------------------------------------------------
# inputs that hung or crashed


def test_non_utf8_data_names_file_and_line(base_ckpt, tmp_path, capsys, shared_data):
    lines = (shared_data / "aqua_rat" / "dev.json").read_bytes().splitlines(keepends=True)[:3]
    bad = tmp_path / "latin1.json"
    bad.write_bytes(lines[0] + lines[1].replace(b"a", "\u00e9".encode("latin-1"), 1) + lines[2])
    code, _, err = aquainterp(["eval", "--checkpoint", base_ckpt, "--task", "aqua", "--data", bad], capsys)
    holds, outcome = one_line_error(code, err, 1)
    record_case("non-UTF-8 data row", "aquainterp eval --task aqua --data latin1.json", "exit 1 naming file:line",
                outcome, holds and "latin1.json:2" in err and "UTF-8" in err)


def test_catastrophic_template_regex_is_refused_fast(tmp_path, capsys):
    run = tmp_path / "run"
    assert aquainterp(["dashboard", "sample", "--run", run, "--steps", "2"], capsys)[0] == 0
    with (run / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"step": 3, "x" * 40: 1.0}) + "\n")  # the name that makes (x+x+)+y backtrack
    template = tmp_path / "evil.json"
    template.write_text(json.dumps({"name": "evil", "title": "Evil", "description": "",
                                    "sections": [{"name": "s", "panels": [
                                        {"kind": "line", "title": "t", "regex": "(x+x+)+y", "x": "rl/step"}]}]}))
    t0 = time.perf_counter()
    code, _, err = aquainterp(["dashboard", "html", "--run", run, "--template", template, "-o",
                               tmp_path / "r.html"], capsys)
    seconds = time.perf_counter() - t0
    holds, outcome = one_line_error(code, err, 2)
    record_case("template regex (x+x+)+y", "aquainterp dashboard html --template evil.json", "exit 2 in < 5 s",
                f"{outcome} ({seconds:.2f} s)", holds and "evil.json" in err and seconds < 5)


def test_decode_refuses_non_integer_ids(tokenizer_dir):
    import torch

    from aquainterp.tokenizer import Tokenizer

    tok = Tokenizer.load(tokenizer_dir)
    refused = {}
    for label, ids in (("[1.5]", [1.5]), ("[True]", [True]), ("['7']", ["7"]), ("float tensor", torch.tensor([1.0]))):
        try:
            tok.decode(ids)
            refused[label] = False
        except TypeError:
            refused[label] = True
    ok = tok.decode(torch.tensor([65, 66])) == tok.decode([65, 66])
    record_case("Tokenizer.decode non-int ids", "decode([1.5]), decode([True]), ...", "TypeError",
                ", ".join(f"{k}: {'refused' if v else 'ACCEPTED'}" for k, v in refused.items()),
                all(refused.values()) and ok)


def test_rotary_tables_are_sized_lazily():
    """A config's sequence_len costs rotary memory only when used: tables start at sequence_len positions
    (not 10x), grow when a forward reaches further (same values as tables built at full length), and a
    forward past 10x is refused by name."""
    import torch

    from aquainterp.model.gpt import GPT, GPTConfig, rotary_tables

    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=32, vocab_size=64, n_layer=1, n_head=2, n_kv_head=2, n_embd=32)).eval()
    model.init_weights()
    start = model.cos.size(1)
    idx = torch.randint(0, 64, (1, 100))
    with torch.no_grad():
        logits = model(idx)
    grown = model.cos.size(1)
    full_cos, full_sin = rotary_tables(model.rotary_len, model.config.head_dim, model.config.rope_base)
    # exact by construction: both tables come from the same function on the same positions
    same = torch.equal(model.cos, full_cos[:, :grown]) and torch.equal(model.sin, full_sin[:, :grown])
    with torch.no_grad():
        again = model(idx)  # the grown tables give the logits a model with full tables gives
    fresh = GPT(model.config).eval()
    fresh.load_state_dict(model.state_dict())
    fresh.cos, fresh.sin = full_cos, full_sin
    with torch.no_grad():
        reference = fresh(idx)
    with pytest.raises(ValueError, match="exceed the rotary table of 320"):
        model(torch.zeros(1, 321, dtype=torch.long))
    # logits == again: exact on any CPU, the same model on the same tokens through the same kernels
    holds = start == 32 and 100 <= grown <= 320 and same and torch.equal(logits, again) \
        and torch.allclose(logits, reference, atol=1e-6, rtol=0)
    record_case("rotary tables sized lazily", "GPT(sequence_len=32) then a 100-token forward",
                "32 rows, grown on use, same logits", f"start {start} rows, after forward {grown}, "
                f"values equal full tables: {same}", holds)


def test_prompt_longer_than_sequence_len_is_not_silent(base_ckpt, shared_data):
    from aquainterp.checkpoints.load import load_model
    from aquainterp.evaluate import evaluate, load_problems

    model, tok, _ = load_model(base_ckpt)
    problems = load_problems("aqua", str(shared_data / "aqua_rat" / "dev.json"), 6)
    with pytest.warns(UserWarning, match=r"of 6 prompts are longer than the model's sequence_len 128") as seen:
        evaluate(model, tok, problems, "categorical", progress=False)
    record_case("prompt longer than sequence_len", "evaluate(AQuA dev, sequence_len-128 model)",
                "a warning with count and longest", str(seen[0].message)[:110], len(seen) == 1)


def test_dashboard_outputs_never_over_their_inputs(tmp_path, capsys):
    workspace = tmp_path / "attention.json"
    assert aquainterp(["dashboard", "export", "--template", "attention", "-o", workspace], capsys)[0] == 0
    before = workspace.read_bytes()
    code, _, err = aquainterp(["dashboard", "load", workspace, "-o", workspace], capsys)
    holds, outcome = one_line_error(code, err, 2)
    record_case("dashboard load -o onto its input", "aquainterp dashboard load W.json -o W.json",
                "exit 2, input intact", outcome, holds and workspace.read_bytes() == before)

    run = tmp_path / "run"
    assert aquainterp(["dashboard", "sample", "--run", run, "--steps", "2"], capsys)[0] == 0
    template = tmp_path / "mine.json"
    assert aquainterp(["dashboard", "load", workspace, "-o", template], capsys)[0] == 0
    text = json.loads(template.read_text())
    text["name"] = "mine"
    template.write_text(json.dumps(text))
    before = template.read_bytes()
    code, _, err = aquainterp(["dashboard", "html", "--run", run, "--template", template, "-o", template], capsys)
    holds, outcome = one_line_error(code, err, 2)
    record_case("dashboard html -o onto the template", "aquainterp dashboard html --template T.json -o T.json",
                "exit 2, template intact", outcome, holds and template.read_bytes() == before)


@pytest.mark.slow
def test_user_files_next_to_runs_survive_real_demo_runs(tmp_path, capsys):
    """The whole smoke-budget demo, twice (the second with --fresh), into a folder that also holds the user's
    files: they survive byte for byte, and --fresh redoes exactly the demo's own stage folders."""
    runs = tmp_path / "runs"
    (runs / "my_experiment").mkdir(parents=True)
    (runs / "my_experiment" / "results.csv").write_text("a,b\n1,2\n")
    (runs / "notes.txt").write_text("do not lose me\n")
    mine = snapshot(runs)
    argv = ["demo", "--out", runs, "--budget", "smoke", "--wandb", "disabled"]  # plumbing only: no learning needed
    outcome = []
    for fresh in (False, True):
        code, _, err = aquainterp([*argv, *(["--fresh"] if fresh else [])], capsys)
        now = snapshot(runs)
        kept = all(now.get(k) == v for k, v in mine.items())
        marker = runs / "base" / ".aquainterp-owner"
        outcome.append((code, kept, marker.stat().st_mtime_ns if marker.exists() else None))
        assert code == 0, err[-2000:]
    holds = all(code == 0 and kept for code, kept, _ in outcome) and outcome[0][2] != outcome[1][2]
    record_case("user files survive real demo runs", "aquainterp demo --out runs; then --fresh",
                "both exit 0, user files intact", ", ".join(f"{'--fresh' if i else 'first'}: exit {c}, user files "
                                                          f"{'intact' if k else 'CHANGED'}"
                                                          for i, (c, k, _) in enumerate(outcome)), holds)


def test_non_utf8_metrics_name_file_and_line(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_bytes(b'{"step": 1, "rl/acc": 0.5}\n{"step": 2, "rl/acc": 0.\xe9}\n')
    code, _, err = aquainterp(["dashboard", "html", "--run", run, "-o", tmp_path / "r.html"], capsys)
    holds, outcome = one_line_error(code, err, 2)
    record_case("non-UTF-8 metrics.jsonl", "aquainterp dashboard html --run R", "one line naming file:line",
                outcome, holds and "metrics.jsonl:2" in err and not (tmp_path / "r.html").exists())


def test_overwrite_never_deletes_the_stage_input(base_ckpt, tmp_path, capsys):
    from training.sft import main as sft_main

    run = tmp_path / "sft"
    shutil.copytree(base_ckpt, run / "checkpoints")  # the user points --init-from into the run it replaces
    before = snapshot(run)
    argv = ["--init-from", run / "checkpoints", "--run-dir", run, "--overwrite", "--synthetic", "8",
            "--max-steps", "1", "--device", "cpu", "--compile", "off", "--bf16", "off"]
    code, _, err = call_cli(sft_main, argv, capsys)
    holds, outcome = one_line_error(code, err, 2)
    record_case("--overwrite onto its own --init-from", "python -m training.sft --init-from RUN/checkpoints "
                "--run-dir RUN --overwrite", "exit 2, input intact", outcome,
                holds and "--init-from" in err and snapshot(run) == before)
