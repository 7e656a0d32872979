"""Settings declared once (aquainterp.cli.settings): RLConfig's fields make its flags, and the ranges the
command line enforces are the ones a config built in Python is checked against."""

import argparse
import dataclasses

import pytest

from aquainterp.cli.args import Number
from training import rl


def parser():
    p = argparse.ArgumentParser(prog="t", exit_on_error=False)
    rl.add_arguments(p)
    return p


def test_every_field_is_one_flag_and_the_defaults_round_trip():
    p = parser()
    flags = {a.dest: a.option_strings for a in p._actions if a.dest != "help"}
    assert set(flags) == {f.name for f in dataclasses.fields(rl.RLConfig)}
    assert flags["progress"] == ["--no-progress"] and flags["max_new_tokens"] == ["--max-new-tokens"]
    assert rl.config_from_args(p.parse_args([])) == rl.RLConfig()


def test_flags_reach_the_config():
    args = parser().parse_args(["--depth", "2", "--top-k", "0", "--probes", "margin,kl", "--no-progress",
                                "--probe-decision", "direct", "--std-normalize", "--kl-coef", "0.5"])
    config = rl.config_from_args(args)
    assert (config.depth, config.top_k, config.probes, config.progress) == (2, None, ("margin", "kl"), False)
    assert (config.probe_decision, config.std_normalize, config.kl_coef) == ("direct", True, 0.5)
    config.validate()


@pytest.mark.parametrize("field", [f for f in dataclasses.fields(rl.RLConfig)
                                   if isinstance(f.metadata.get("type"), Number)], ids=lambda f: f.name)
def test_the_cli_range_is_the_python_range(field):
    kind = field.metadata["type"]
    bad = (kind.hi + 1) if kind.hi is not None else -(10**9)
    flag = "--" + field.name.replace("_", "-")
    with pytest.raises(argparse.ArgumentError, match="must be"):
        parser().parse_args([flag, str(bad)])
    with pytest.raises(ValueError, match=f"{flag} must be"):
        rl.RLConfig(**{"depth": 2, field.name: bad}).validate()


def _parsers():
    """(name, parser) for every training stage and every `aquainterp` subcommand (dashboard's nested
    commands included)."""
    import importlib

    from aquainterp.cli.main import COMMANDS, subcommand_parser
    from training import common

    out = []
    for stage in ("tok_train", "base", "mid", "sft"):
        module = importlib.import_module(f"training.{stage}")
        cls = [v for v in vars(module).values() if dataclasses.is_dataclass(v) and isinstance(v, type)
               and v.__module__ == module.__name__][0]
        p = argparse.ArgumentParser(prog=stage)
        common.add_arguments(p, cls())
        out.append((f"training.{stage}", p))
    out.append(("training.rl", parser()))
    for name in COMMANDS:
        p, _ = subcommand_parser(name)
        out.append((f"aquainterp {name}", p))
        for action in p._actions:  # nested subcommands (aquainterp dashboard html ...)
            if isinstance(action, argparse._SubParsersAction):
                out.extend((f"aquainterp {name} {sub}", sp) for sub, sp in action.choices.items())
    return out


def test_every_flag_of_every_command_says_what_it_does():
    undocumented = []
    parsers = _parsers()
    assert len(parsers) >= 12
    for name, p in parsers:
        for action in p._actions:
            if not action.option_strings or action.dest == "help" or action.help == argparse.SUPPRESS:
                continue
            text = (action.help or "").strip()
            if not text or text.startswith("(default"):
                undocumented.append(f"{name} {action.option_strings[0]}")
    assert not undocumented, "flags without a help text: " + ", ".join(undocumented)
