"""scripts/ensure-chromium, which scripts/test (the README's test command) runs: it finds or installs headless
Chromium, and when it cannot, says why in one line, which the dashboard browser test then fails with.

Every branch runs the real script with a PATH of stand-ins (a fake `id`, `apt-get`, `chromium`), so the
"cannot install" branches are exercised on a machine that has Chromium."""

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "ensure-chromium"
BASH = shutil.which("bash")


def _exe(path: Path, body: str) -> Path:
    path.write_text("#!" + BASH + "\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


@pytest.fixture
def bin_dir(tmp_path):
    """A PATH with the few real tools the script uses and none of the browsers; `id -u` says 1000."""
    d = tmp_path / "bin"
    d.mkdir()
    for tool in ("grep", "tail", "mktemp", "rm"):
        (d / tool).symlink_to(shutil.which(tool))
    _exe(d / "id", 'echo 1000\n')
    return d


def run_script(bin_dir: Path, **env) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in ("CHROMIUM", "AQUAINTERP_NO_INSTALL")}
    return subprocess.run([BASH, str(SCRIPT)], env={**base, "PATH": str(bin_dir), **env}, capture_output=True,
                          text=True, timeout=60)


def one_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 1, (result.stdout, result.stderr)
    lines = result.stdout.splitlines()
    assert len(lines) == 1, result.stdout
    return lines[0]


def fake_apt(bin_dir: Path, log: Path, install_exit: int, creates_browser: bool) -> None:
    browser = bin_dir / "chromium"
    make = f"printf '#!{BASH}\\necho chromium\\n' > {browser}; chmod +x {browser}\n" if creates_browser else ""
    _exe(bin_dir / "apt-get", f'echo "$@" >> {log}\n'
                              f'if [ "$1" = install ]; then {make} echo "E: last words of apt" >&2; '
                              f'exit {install_exit}; fi\n')


def test_a_browser_on_path_is_used_and_nothing_installed(bin_dir, tmp_path):
    _exe(bin_dir / "chromium-browser", "true\n")
    fake_apt(bin_dir, tmp_path / "apt.log", 0, False)
    result = run_script(bin_dir)
    assert result.returncode == 0 and result.stdout.strip() == str(bin_dir / "chromium-browser")
    assert not (tmp_path / "apt.log").exists()


def test_chromium_variable_wins(bin_dir, tmp_path):
    browser = _exe(tmp_path / "my-chrome", "true\n")
    result = run_script(bin_dir, CHROMIUM=str(browser))
    assert result.returncode == 0 and result.stdout.strip() == str(browser)


def test_no_apt_get_cannot_install(bin_dir):
    line = one_line(run_script(bin_dir, AQUAINTERP_NO_INSTALL=""))
    assert line.startswith("no Chromium on PATH") and "no apt-get" in line


def test_not_root_without_sudo_cannot_install(bin_dir, tmp_path):
    fake_apt(bin_dir, tmp_path / "apt.log", 0, True)
    line = one_line(run_script(bin_dir))
    assert "needs root" in line and "sudo apt-get install -y chromium" in line
    assert not (tmp_path / "apt.log").exists()  # it did not even try


def test_no_install_setting_is_honoured(bin_dir, tmp_path):
    _exe(bin_dir / "id", "echo 0\n")
    fake_apt(bin_dir, tmp_path / "apt.log", 0, True)
    line = one_line(run_script(bin_dir, AQUAINTERP_NO_INSTALL="1"))
    assert "AQUAINTERP_NO_INSTALL=1" in line and not (tmp_path / "apt.log").exists()


def test_failed_apt_install_is_reported_with_its_exit_code(bin_dir, tmp_path):
    _exe(bin_dir / "id", "echo 0\n")
    fake_apt(bin_dir, tmp_path / "apt.log", 100, False)
    line = one_line(run_script(bin_dir))
    assert "'apt-get install chromium' failed (exit 100: E: last words of apt)" in line
    assert (tmp_path / "apt.log").read_text().splitlines() == ["update -qq", "install -y -qq chromium"]


def test_root_installs_the_debian_package(bin_dir, tmp_path):
    _exe(bin_dir / "id", "echo 0\n")
    fake_apt(bin_dir, tmp_path / "apt.log", 0, True)
    result = run_script(bin_dir)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == str(bin_dir / "chromium")
    assert (tmp_path / "apt.log").read_text().splitlines() == ["update -qq", "install -y -qq chromium"]


def test_passwordless_sudo_installs(bin_dir, tmp_path):
    fake_apt(bin_dir, tmp_path / "apt.log", 0, True)
    _exe(bin_dir / "sudo", f'[ "$1" = -n ] && shift; echo "sudo $*" >> {tmp_path / "sudo.log"}; "$@"\n')
    result = run_script(bin_dir)
    assert result.returncode == 0 and result.stdout.strip() == str(bin_dir / "chromium")
    assert "sudo apt-get install -y -qq chromium" in (tmp_path / "sudo.log").read_text()


def test_browser_test_fails_with_the_reason_never_skips(tmp_path):
    """What scripts/test does when ensure-chromium cannot install: the browser test fails with its line."""
    reason = "no Chromium on PATH and installing it needs root (reason under test)"
    env = {k: v for k, v in os.environ.items() if k != "CHROMIUM"}
    env.update(PATH=str(tmp_path), AQUAINTERP_CHROMIUM_MISSING=reason)
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                             "tests/test_dashboard_html.py::test_browser_check_catches_errors_and_missing_plots"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stdout[-2000:]
    assert reason in result.stdout and "1 error" in result.stdout and "skipped" not in result.stdout


def test_test_command_runs_the_installer_and_ci_only_the_test_command():
    test = (REPO / "scripts" / "test").read_text()
    assert "scripts/ensure-chromium" in test and "AQUAINTERP_CHROMIUM_MISSING" in test
    ci = [line for line in (REPO / ".ci" / "run").read_text().splitlines()
          if line.strip() and not line.startswith("#")]
    assert ci[-1] == 'exec scripts/test "$@"' and not any("apt-get" in line for line in ci)
