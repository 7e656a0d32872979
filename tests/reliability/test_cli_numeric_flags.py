"""Property test (issue 19): every numeric flag that a command's --help lists, driven with 0, -1, nan and a
huge value. A value outside the flag's declared range must end with exit status 2, exactly one line on
stderr naming the flag, no traceback, and no run started (its run/output folder never created). A value
inside the declared range (`--seed 0`, `--eval-every 0` = off) must parse.

Commands: every `aquainterp` subcommand (each `dashboard` action too) and every training stage's
`python -m training.<stage>`. Flags are found in the parsers' --help text, so a new numeric flag is
covered the day it is added; one without a range gets the parser's sanity range (finite, |x| < 2**31).
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from reliability.conftest import call_cli, one_line_error, record_case

VALUES = ("0", "-1", "nan", "huge")
HUGE = {int: "1" + "0" * 30, float: "1e300"}


def _kind_and_accepts(action):
    """(int|float, accepts(x)) of a numeric action, or None for a non-numeric one."""
    from aquainterp.cli.args import FLOAT_SANITY, INT_SANITY, Number

    t = action.type
    if isinstance(t, Number):
        return t.kind, t.accepts
    if t is int:
        return int, Number(int, -INT_SANITY + 1, INT_SANITY - 1).accepts
    if t is float:
        return float, Number(float, -FLOAT_SANITY, FLOAT_SANITY).accepts
    return None


def _numeric_flags(parser: argparse.ArgumentParser) -> list[tuple[str, type, object, object]]:
    """(flag, kind, accepts, action) for each numeric option listed in the parser's --help."""
    listed = set(re.findall(r"(?<![\w-])(--?[A-Za-z][\w-]*)", parser.format_help()))
    out = []
    for action in parser._actions:
        numeric = _kind_and_accepts(action)
        flags = [s for s in action.option_strings if s.startswith("--")]
        if numeric and flags and flags[0] in listed:
            out.append((flags[0], *numeric, action))
    return out


def _subparsers(parser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices
    return {}


def _commands(base_ckpt: Path, tmp: Path):
    """(label, main, parser, argv prefix with the required arguments, folders a run would create)."""
    from aquainterp.cli.args import OneLineParser
    from aquainterp.cli.main import COMMANDS, subcommand_parser
    from aquainterp.cli.main import main as aquainterp_main
    from training import base, mid, rl, sft, tok_train
    from training.common import add_arguments

    run = tmp / "would_run"
    required = {
        "eval": ["--checkpoint", base_ckpt, "--json", run / "eval.json"],
        "patch": ["--checkpoint", base_ckpt, "--out", run / "patch"],
        "export": [base_ckpt, run / "hf"],
        "demo": ["--out", run / "demo"],
    }
    out = []
    for name in COMMANDS:
        parser, _ = subcommand_parser(name)
        actions = _subparsers(parser)
        if actions:
            for action, sub in actions.items():
                prefix = [name, action, *(["--run", run / "sample"] if action == "sample" else [])]
                out.append((f"aquainterp {name} {action}", aquainterp_main, sub, prefix, [run]))
        else:
            out.append((f"aquainterp {name}", aquainterp_main, parser, [name, *required.get(name, [])], [run]))
    stage_args = {"base": ["--run-dir", run / "base", "--tokenizer-dir", base_ckpt.parent],
                  "mid": ["--run-dir", run / "mid", "--init-from", base_ckpt],
                  "sft": ["--run-dir", run / "sft", "--init-from", base_ckpt],
                  "tok_train": ["--out-dir", run / "tok"]}
    for module, cls in ((base, base.BaseConfig), (mid, mid.MidConfig), (sft, sft.SFTConfig),
                        (tok_train, tok_train.TokTrainConfig)):
        stage = module.__name__.split(".")[-1]
        parser = OneLineParser(prog=f"python -m training.{stage}")
        add_arguments(parser, cls())
        out.append((f"python -m training.{stage}", module.main, parser, stage_args[stage], [run]))
    parser = OneLineParser(prog="python -m training.rl")
    rl.add_arguments(parser)
    out.append(("python -m training.rl", rl.main, parser, ["--checkpoint", base_ckpt, "--out", run / "rl"], [run]))
    return out


def test_every_numeric_flag_refuses_0_minus1_nan_huge_outside_its_range(base_ckpt, tmp_path, capsys):
    commands = _commands(base_ckpt, tmp_path)
    total_flags = 0
    for label, main, parser, prefix, would_create in commands:
        flags = _numeric_flags(parser)
        total_flags += len(flags)
        bad, refused, accepted = [], 0, 0
        for flag, kind, accepts, action in flags:
            for value in VALUES:
                text = HUGE[kind] if value == "huge" else value
                try:
                    parsed = kind(text)
                    in_range = accepts(parsed)
                except ValueError:
                    in_range = False  # "nan" for an int flag
                if in_range:  # a documented value (--seed 0, --eval-every 0): it must parse
                    try:
                        action.type(text)
                        accepted += 1
                    except argparse.ArgumentTypeError as e:
                        bad.append(f"{flag} {value}: in range but refused ({e})")
                    continue
                code, out, err = call_cli(main, [*prefix, flag, text], capsys)
                holds, outcome = one_line_error(code, err, 2)
                started = [str(p) for p in would_create if Path(p).exists()]
                if not holds or flag not in err or started:
                    bad.append(f"{flag} {value}: {outcome}" + (f"; created {started}" if started else ""))
                else:
                    refused += 1
        record_case(f"numeric flags of {label}", f"{label} --FLAG 0|-1|nan|huge",
                    "exit 2, one line, no run", f"{len(flags)} flags: {refused} refused, {accepted} in range"
                    + (f"; FAILED {bad[:3]}" if bad else ""), not bad)
    assert total_flags > 100, f"only {total_flags} numeric flags found: is the --help scan broken?"


@pytest.mark.parametrize("label,argv", [
    ("float for an int flag", ["eval", "--n", "2.5"]),
    ("infinity", ["patch", "--noise-scale", "inf"]),
    ("text", ["dashboard", "sample", "--steps", "many"]),
])
def test_non_numbers_are_one_line_usage_errors(base_ckpt, tmp_path, capsys, label, argv):
    from aquainterp.cli.main import main

    extra = {"eval": ["--checkpoint", base_ckpt], "patch": ["--checkpoint", base_ckpt, "--out", tmp_path / "p"],
             "dashboard": ["--run", tmp_path / "r"]}[argv[0]]
    full = argv[:2] + extra + argv[2:] if argv[0] == "dashboard" else argv[:1] + extra + argv[1:]
    code, _, err = call_cli(main, full, capsys)
    holds, outcome = one_line_error(code, err, 2)
    record_case(f"{label}", "aquainterp " + " ".join(map(str, argv)), "exit 2, one line", outcome,
                holds and argv[-2] in err and not (tmp_path / "p").exists() and not (tmp_path / "r").exists())
