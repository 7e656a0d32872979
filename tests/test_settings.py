"""Settings declared once (aquainterp.settings): RLConfig's fields make its flags, and the ranges the
command line enforces are the ones a config built in Python is checked against."""

import argparse
import dataclasses

import pytest

from aquainterp.cliargs import Number
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
