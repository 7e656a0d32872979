"""The package installs as one unit: Rust extension importable, CLI answers, flags normalised."""

import subprocess
import sys

import aquainterp
from aquainterp.cli.main import main, normalize_flag_spelling


def test_rust_extension_imports_and_matches_package_version():
    from aquainterp import _rustbpe

    assert _rustbpe.core_version() == aquainterp.__version__


def test_cli_version_and_help():
    out = subprocess.run([sys.executable, "-m", "aquainterp.cli.main", "--version"], capture_output=True, text=True)
    assert out.returncode == 0
    assert out.stdout.strip() == f"aquainterp {aquainterp.__version__}"
    out = subprocess.run([sys.executable, "-m", "aquainterp.cli.main", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    assert "usage: aquainterp" in out.stdout


def test_unknown_command_fails(capsys):
    import pytest

    with pytest.raises(SystemExit) as err:
        main(["no-such-command"])
    assert err.value.code == 2


def test_snake_case_flags_accepted():
    assert normalize_flag_spelling(["demo", "--max_steps=3", "--num_samples", "4", "x_y"]) == [
        "demo", "--max-steps=3", "--num-samples", "4", "x_y"]


def test_info_command_reports_versions(capsys):
    import json

    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["aquainterp"] == aquainterp.__version__
    assert info["transformer-lens"].startswith("4.")
