"""Issue 30: no command writes over what is not its own. The table is generated from the argparse
parsers of every command and stage: each flag declared with `aquainterp.cli.rundir.output_path` is pointed at
a user's file or folder, at the command's own input, into a checkpoint and onto a run's record, and must
end with one line, exit 2 and every byte where it was. A new output flag is covered by default; a new
command or stage without a base command line here, or an output-looking flag not declared as one, fails.
Then the cases of the issue one by one (each a row of the user-error table), and what stays allowed: a
command replacing its own earlier output, and --overwrite replacing a user's file.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
from pathlib import Path

import pytest

from reliability.conftest import call_cli, one_line_error, record_case, snapshot

REPO = Path(__file__).resolve().parents[2]
STAGES = ("tok_train", "base", "mid", "sft", "rl", "depth_table", "demo_tables")


# ------------------------------------------------------------------------------------------------
# every parser, every output flag


def _expand(prog: str, parser: argparse.ArgumentParser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _expand(f"{prog} {name}", sub)
            return
    yield prog, parser


def all_parsers() -> list[tuple[str, argparse.ArgumentParser]]:
    """(prog, parser) of every `aquainterp` command (and dashboard action) and every training stage."""
    import importlib

    from aquainterp.cli.args import OneLineParser
    from aquainterp.cli.main import COMMANDS, subcommand_parser
    from training import common

    out = []
    for name in COMMANDS:
        out.extend(_expand(f"aquainterp {name}", subcommand_parser(name)[0]))
    for stage in STAGES:
        module = importlib.import_module(f"training.{stage}")
        prog = f"python -m training.{stage}"
        if hasattr(module, "add_arguments"):  # the RL stage declares its own flags
            parser = OneLineParser(prog=prog)
            module.add_arguments(parser)
        else:
            cls = next(v for k, v in vars(module).items() if k.endswith("Config") and isinstance(v, type)
                       and v.__module__ == module.__name__)
            parser = common.stage_parser(cls, prog=prog)
        out.append((prog, parser))
    return out


def output_flags() -> list[tuple[str, str, str]]:
    """(prog, flag, kind) of every flag typed output_path (positionals by their name)."""
    flags = []
    for prog, parser in all_parsers():
        for action in parser._actions:
            kind = getattr(action.type, "output_kind", None)
            if kind:
                flags.append((prog, action.option_strings[-1] if action.option_strings else action.dest, kind))
    return flags


OUTPUTISH = re.compile(r"^(out|output|json|run_dir|screenshot|.*_out|out_.*)$")


def test_every_stage_is_in_the_table():
    """A new stage module (training/*.py with a main) must be added to STAGES, so its flags are checked."""
    found = sorted(p.stem for p in (REPO / "training").glob("*.py")
                   if "def main(" in p.read_text() and p.stem not in ("demo",))  # demo: `aquainterp demo`
    assert found == sorted(STAGES), f"training stages with a main: {found}; the table checks {sorted(STAGES)}"


def test_output_looking_flags_are_declared_as_outputs():
    """A flag named like an output (out, output, json, run_dir, ...) that takes a value must use
    rundir.output_path, or the table (and claim_output's review) would miss it."""
    missed = []
    for prog, parser in all_parsers():
        for action in parser._actions:
            if action.nargs == 0 or isinstance(action, argparse._SubParsersAction):
                continue  # store_true flags (`info --json`) write nothing themselves
            if OUTPUTISH.match(action.dest) and not getattr(action.type, "output_kind", None):
                missed.append(f"{prog} {action.option_strings or action.dest}")
    assert not missed, f"output flags not declared with rundir.output_path: {missed}"
    assert len(output_flags()) >= 15  # the 15 of issue 30; new ones add to it


# ------------------------------------------------------------------------------------------------
# the hostile targets


@pytest.fixture(scope="module")
def world(tmp_path_factory, base_ckpt, tokenizer_dir):
    """Real inputs (a checkpoint, a tokenizer, a sample run, a workspace JSON) and a user's things."""
    from aquainterp.cli.main import main

    root = tmp_path_factory.mktemp("outputs")
    w = {"CK": base_ckpt, "TOK": tokenizer_dir}
    w["OTHER_CK"] = root / "other_ckpt"  # a checkpoint this command does not read
    shutil.copytree(base_ckpt, w["OTHER_CK"])
    w["RUN"] = root / "real_run"  # a run's record: checkpoints + metrics.jsonl
    shutil.copytree(base_ckpt, w["RUN"] / "checkpoints")
    (w["RUN"] / "metrics.jsonl").write_text('{"step": 1, "rl/acc": 0.5}\n{"step": 2, "rl/acc": 0.75}\n')
    w["SAMPLE"] = root / "sample_run"
    assert main(["dashboard", "sample", "--run", str(w["SAMPLE"]), "--steps", "2"]) == 0
    w["WORKSPACE"] = root / "attention.json"
    assert main(["dashboard", "export", "--template", "attention", "-o", str(w["WORKSPACE"])]) == 0
    return w


def step_dir(ckpt: Path) -> Path:
    return sorted(ckpt.glob("step_*"))[-1]


def base_argv(prog: str, w: dict, tmp: Path) -> tuple[list, dict]:
    """(argv with "OUT" where a positional output goes, {flag: value} of the other options) that would run."""
    fast = ["--device", "cpu"]
    stage = ["--max-steps", "1", "--device", "cpu", "--compile", "off", "--bf16", "off"]
    table = {
        "aquainterp eval": ([], {"--checkpoint": w["CK"], "--n": "2"}),
        "aquainterp patch": ([], {"--checkpoint": w["CK"], "--n-pairs": "2", "--out": tmp / "new_patch"}),
        "aquainterp export": ([w["CK"], "OUT"], {}),
        "aquainterp import-nanochat": ([w["CK"], "OUT"], {}),
        "aquainterp demo": ([], {"--out": tmp / "new_demo", "--budget": "smoke"}),
        "aquainterp dashboard export": ([], {"--template": "all"}),
        "aquainterp dashboard load": ([w["WORKSPACE"]], {}),
        "aquainterp dashboard html": ([], {"--run": w["SAMPLE"], "-o": tmp / "new.html"}),
        "aquainterp dashboard sample": ([], {"--steps": "2"}),
        "python -m training.tok_train": ([], {"--vocab-size": "512", "--max-chars": "2000"}),
        "python -m training.base": ([*stage, "--depth", "1"], {"--tokenizer-dir": w["TOK"]}),
        "python -m training.mid": (stage, {"--init-from": w["CK"]}),
        "python -m training.sft": (stage, {"--init-from": w["CK"]}),
        "python -m training.rl": (fast, {"--checkpoint": w["CK"], "--max-steps": "1"}),
    }
    if prog not in table:
        pytest.fail(f"{prog} has output flags but no base command line in tests/reliability/test_outputs.py")
    positional, options = table[prog]
    return list(positional), dict(options)


def targets(kind: str, w: dict, inputs: list[Path], tmp: Path) -> dict[str, tuple[Path, Path]]:
    """name -> (the path given to the flag, the folder whose snapshot must not change)."""
    user = tmp / "user"
    (user / "folder").mkdir(parents=True)
    (user / "folder" / "model.safetensors").write_bytes(b"the user's own weights")
    (user / "notes.json").write_text('{"mine": true}\n')
    out = {}
    if kind in ("file",):
        out["a user's file"] = (user / "notes.json", user)
        out["a checkpoint's weights"] = (step_dir(w["OTHER_CK"]) / "model.safetensors", w["OTHER_CK"])
        out["a run's metrics.jsonl"] = (w["RUN"] / "metrics.jsonl", w["RUN"])
        for given in inputs:
            inner = given if given.is_file() else sorted(p for p in given.rglob("*") if p.is_file()
                                                          and not p.name.startswith("."))[0]
            out[f"its input {given.name}"] = (inner, given if given.is_dir() else given.parent)
    if kind in ("dir", "file|dir", "run"):
        out["a user's folder"] = (user / "folder", user)
        out["a checkpoint's tokenizer/"] = (step_dir(w["OTHER_CK"]) / "tokenizer", w["OTHER_CK"])
        out["a real run"] = (w["RUN"], w["RUN"])
        for given in inputs:
            if given.is_dir():
                out[f"its input {given.name}"] = (given, given)
    if kind == "root":
        out["into a checkpoint"] = (step_dir(w["OTHER_CK"]), w["OTHER_CK"])
        out["a user's file"] = (user / "notes.json", user)
    return out


def _main_of(prog: str):
    import importlib

    if prog.startswith("aquainterp "):
        from aquainterp.cli.main import main

        words = prog.split()[1:]
        return lambda argv: main([*words, *argv])
    return importlib.import_module(prog.split()[-1]).main


OUTPUT_FLAGS = None


def _flag_ids():
    global OUTPUT_FLAGS
    OUTPUT_FLAGS = OUTPUT_FLAGS or output_flags()
    return OUTPUT_FLAGS


@pytest.mark.parametrize("prog,flag,kind", _flag_ids(), ids=[f"{p.split()[-1]} {f}" for p, f, _ in _flag_ids()])
def test_output_flag_never_writes_over_what_is_not_its_own(prog, flag, kind, world, tmp_path, capsys):
    positional, options = base_argv(prog, world, tmp_path)
    inputs = [Path(v) for v in [*positional, *options.values()] if isinstance(v, Path) and v.exists()]
    has_overwrite = any("--overwrite" in a.option_strings for p, parser in all_parsers() if p == prog
                        for a in parser._actions)
    results = []
    for name, (target, guarded) in targets(kind, world, inputs, tmp_path).items():
        for overwrite in ([False, True] if has_overwrite else [False]):
            if overwrite and (name in ("a user's file", "a user's folder") or (kind == "run" and name == "a real run")):
                continue  # what --overwrite is for (test_overwrite_replaces_a_users_file, a stage's --overwrite)
            opts = {k: v for k, v in options.items() if k != flag}
            argv = [target if a == "OUT" else a for a in positional]
            if flag in ("out_dir",):
                argv = [target if a == "OUT" else a for a in positional]
            else:
                opts[flag] = target
            argv += [x for k, v in opts.items() for x in (k, v)] + (["--overwrite"] if overwrite else [])
            before = snapshot(guarded)
            code, _, err = call_cli(_main_of(prog), argv, capsys)
            holds, outcome = one_line_error(code, err, 2)
            intact = snapshot(guarded) == before
            named = flag.lstrip("-") in err or flag in err
            results.append((f"{name}{' --overwrite' if overwrite else ''}", holds and intact and named,
                            outcome + ("" if intact else " (CHANGED)")))
    bad = [r for r in results if not r[1]]
    record_case(f"{prog.removeprefix('python -m ')} {flag} ({len(results)} targets)",
                f"{prog} {flag} USER/CKPT/RUN/INPUT", "exit 2, one line, intact",
                f"{len(results) - len(bad)}/{len(results)} refused" + (f"; {bad[0][0]}: {bad[0][2]}" if bad else ""),
                not bad)


# ------------------------------------------------------------------------------------------------
# the cases one by one


def aquainterp(argv, capsys):
    from aquainterp.cli.main import main

    return call_cli(main, argv, capsys)


@pytest.mark.parametrize("what", ["model.safetensors", "meta.json", "--data"])
def test_eval_json_never_over_its_checkpoint_or_data(what, base_ckpt, tmp_path, capsys, shared_data):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(base_ckpt, ckpt)
    data = tmp_path / "dev.json"
    shutil.copy(shared_data / "aqua_rat" / "dev.json", data)
    target = data if what == "--data" else step_dir(ckpt) / what
    extra = ["--task", "aqua", "--data", data] if what == "--data" else []
    before = snapshot(tmp_path)
    outcomes = []
    for overwrite in ([], ["--overwrite"]):  # --overwrite never reaches an input
        code, _, err = aquainterp(["eval", "--checkpoint", ckpt, "--n", "2", *extra, "--json", target, *overwrite],
                                  capsys)
        holds, outcome = one_line_error(code, err, 2)
        outcomes.append((holds and snapshot(tmp_path) == before and "--json" in err, outcome))
    record_case(f"eval --json onto {what}", f"aquainterp eval --json {'DATA' if what == '--data' else 'CK/step/' + what}"
                " [--overwrite]", "exit 2 twice, input intact", "; ".join(o for _, o in outcomes),
                all(h for h, _ in outcomes))


def test_eval_json_is_strict_and_replaces_only_its_own(base_ckpt, tmp_path, capsys):
    out = tmp_path / "eval.json"
    code, _, err = aquainterp(["eval", "--checkpoint", base_ckpt, "--n", "2", "--json", out], capsys)
    assert code == 0, err
    text = out.read_text()
    record = json.loads(text, parse_constant=lambda c: pytest.fail(f"bare {c} in eval JSON"))
    nulls = [k for k, v in record["per_letter_accuracy"].items() if v is None]
    first = out.stat().st_mtime_ns
    code2, _, err2 = aquainterp(["eval", "--checkpoint", base_ckpt, "--n", "2", "--json", out], capsys)
    out.write_text(text.replace('"task"', '"task_edited"'))  # the user edits it: no longer eval's
    code3, _, err3 = aquainterp(["eval", "--checkpoint", base_ckpt, "--n", "2", "--json", out], capsys)
    holds3, outcome3 = one_line_error(code3, err3, 2)
    holds = code2 == 0 and out.stat().st_mtime_ns != first and holds3 and "task_edited" in out.read_text() \
        and "NaN" not in text and len(nulls) >= 1
    record_case("eval --json: strict JSON, own file rewritten, edited kept", "aquainterp eval --json F (x3)",
                "null not NaN; 2nd run exit 0; edited file exit 2",
                f"{len(nulls)} letters null; rerun exit {code2}; after edit {outcome3}", holds)


def test_overwrite_replaces_a_users_file(base_ckpt, tmp_path, capsys):
    out = tmp_path / "mine.json"
    out.write_text("the user's file\n")
    code, _, err = aquainterp(["eval", "--checkpoint", base_ckpt, "--n", "2", "--json", out], capsys)
    refused, outcome = one_line_error(code, err, 2)
    kept = out.read_text() == "the user's file\n"
    code2, _, err2 = aquainterp(["eval", "--checkpoint", base_ckpt, "--n", "2", "--json", out, "--overwrite"], capsys)
    replaced = code2 == 0 and json.loads(out.read_text())["problems"] == 2
    record_case("eval --json onto a user's file", "aquainterp eval --json USERFILE [--overwrite]",
                "exit 2 naming --overwrite; replaced with it", f"{outcome}; with --overwrite exit {code2}",
                refused and kept and "--overwrite" in err and replaced)


def test_tok_train_out_dir_never_replaces_a_tokenizer(base_ckpt, tokenizer_dir, tmp_path, capsys):
    from aquainterp.checkpoints.load import load_model
    from training.tok_train import main as tok_main

    ckpt = tmp_path / "ckpt"
    shutil.copytree(base_ckpt, ckpt)
    existing = tmp_path / "tok"
    shutil.copytree(tokenizer_dir, existing)
    (existing / ".aquainterp-owner").unlink(missing_ok=True)  # a tokenizer from elsewhere (or older aquainterp)
    argv = ["--vocab-size", "512", "--max-chars", "20000", "--eval-docs", "5"]
    outcomes = []
    for target, overwrite in ((existing, False), (step_dir(ckpt) / "tokenizer", False),
                              (step_dir(ckpt) / "tokenizer", True)):
        before = snapshot(tmp_path)
        code, _, err = call_cli(tok_main, [*argv, "--out-dir", target, *(["--overwrite"] if overwrite else [])], capsys)
        holds, outcome = one_line_error(code, err, 2)
        outcomes.append((holds and snapshot(tmp_path) == before and "--out-dir" in err, outcome))
    load_model(ckpt)  # the checkpoint still loads (its tokenizer's sha256 matches)
    fresh = tmp_path / "fresh_tok"
    code_new, _, _ = call_cli(tok_main, [*argv, "--out-dir", fresh], capsys)
    code_again, _, err_again = call_cli(tok_main, [*argv, "--out-dir", fresh], capsys)  # its own folder: fine
    holds = all(h for h, _ in outcomes) and code_new == 0 and code_again == 0
    record_case("tok_train --out-dir onto a tokenizer", "tok_train --out-dir EXISTING | CK/step/tokenizer [--overwrite]",
                "exit 2 x3, ckpt loads; own dir rerun ok",
                "; ".join(o for _, o in outcomes)[:200] + f"; own dir again: exit {code_again}", holds)


def test_export_hf_never_over_a_users_model(tmp_path, capsys):
    from aquainterp.checkpoints.native import save_checkpoint
    from aquainterp.model.gpt import GPT, GPTConfig

    model = GPT(GPTConfig(sequence_len=64, vocab_size=512, n_layer=1, n_head=2, n_kv_head=2, n_embd=64))
    model.init_weights()  # the architecture HF NanoChat can hold (nanochat-2025-10)
    ckpt = tmp_path / "ckpt"
    save_checkpoint(ckpt, 1, model, None, {})
    dest = tmp_path / "hf"
    dest.mkdir()
    (dest / "model.safetensors").write_bytes(b"a user's model")
    code, _, err = aquainterp(["export", ckpt, dest], capsys)
    holds, outcome = one_line_error(code, err, 2)
    kept = (dest / "model.safetensors").read_bytes() == b"a user's model"
    fresh = tmp_path / "hf_new"
    code1, _, e1 = aquainterp(["export", ckpt, fresh], capsys)
    code2, _, e2 = aquainterp(["export", ckpt, fresh], capsys)  # export's own folder: rewritten
    code3, _, e3 = aquainterp(["export", ckpt, dest, "--overwrite"], capsys)
    assert (dest / "model.safetensors").stat().st_size > 1000, e3  # replaced, as --overwrite asked
    record_case("export HF into a user's model folder", "aquainterp export CK DIR (DIR/model.safetensors is the user's)",
                "exit 2, file intact; own dir rerun, --overwrite ok",
                f"{outcome}; own dir twice: exit {code1},{code2}; --overwrite exit {code3}",
                holds and kept and "model.safetensors" in err and code1 == code2 == code3 == 0)


def test_dashboard_export_never_over_an_edited_workspace(tmp_path, capsys):
    out = tmp_path / "workspaces"
    code, _, err = aquainterp(["dashboard", "export", "--template", "all", "-o", out], capsys)
    assert code == 0, err
    code_again, _, _ = aquainterp(["dashboard", "export", "--template", "all", "-o", out], capsys)
    edited = out / "attention.json"
    edited.write_text(edited.read_text().replace("aquainterp", "my-project"))
    before = snapshot(out)
    code, _, err = aquainterp(["dashboard", "export", "--template", "all", "-o", out], capsys)
    holds, outcome = one_line_error(code, err, 2)
    record_case("dashboard export -o DIR over an edited workspace", "aquainterp dashboard export --template all -o DIR",
                "own dir rerun ok; after an edit exit 2", f"rerun exit {code_again}; edited: {outcome}",
                code_again == 0 and holds and "attention.json" in err and snapshot(out) == before)


def test_dashboard_sample_never_into_a_real_run(base_ckpt, tmp_path, capsys):
    from aquainterp.logger import read_metrics

    run = tmp_path / "run"
    shutil.copytree(base_ckpt, run / "checkpoints")
    (run / "metrics.jsonl").write_text('{"step": 1, "rl/acc": 0.5}\n')
    before = snapshot(run)
    code, _, err = aquainterp(["dashboard", "sample", "--run", run, "--steps", "3"], capsys)
    holds, outcome = one_line_error(code, err, 2)
    sample = tmp_path / "sample"
    codes = [aquainterp(["dashboard", "sample", "--run", sample, "--steps", "3"], capsys)[0] for _ in range(2)]
    rows = [r["step"] for r in read_metrics(sample) if "rl/acc" in r]
    record_case("dashboard sample --run REAL_RUN", "aquainterp dashboard sample --run RUN",
                "exit 2, run intact; own sample rerun replaces", f"{outcome}; sample twice: exit {codes}, steps {rows}",
                holds and snapshot(run) == before and codes == [0, 0] and rows == [0, 1, 2])
