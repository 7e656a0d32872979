"""W&B cannot start, or dies mid-run: training goes on to its last checkpoint, metrics.jsonl holds
every step, and the offline W&B run left on disk is intact and reads back (`wandb sync` can upload
it later; there is no network here to do it).

Runs are real base runs in child processes: 'cannot start' is --wandb online with no API key and a
W&B server address where nothing listens; 'dies' is a SIGKILL of the child's wandb-core service
process after the second checkpoint.
"""

import os
import signal
import time
import warnings
from pathlib import Path

import pytest

from aquainterp.checkpoints.native import latest_step
from aquainterp.logger import iter_wandb_records, read_metrics
from dashboards.wandb_run import history_as_metrics
from reliability.conftest import _FORK, base_config, every_checkpoint_loads, record, run_stage

STEPS = 8


def child(config, env: dict, warnings_file: str) -> None:
    for k in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_DISABLED"):
        os.environ.pop(k, None)
    os.environ.update(env)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            run_stage(config)
            outcome = "finished"
        except BaseException as e:
            outcome = f"{type(e).__name__}: {e}"
    Path(warnings_file).write_text("\n".join([outcome, *(str(w.message) for w in caught)]))
    os._exit(0)


def wandb_core_pids(parent: int) -> list[int]:
    """Processes under `parent` (any depth) whose name says wandb."""
    children: dict[int, list[int]] = {}
    names = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            pid, rest = int(d.name), stat[stat.rindex(")") + 2:].split()
            children.setdefault(int(rest[1]), []).append(pid)
            names[pid] = stat[stat.index("(") + 1:stat.rindex(")")]
    found, todo = [], [parent]
    while todo:
        for c in children.get(todo.pop(), []):
            todo.append(c)
            if "wandb" in names.get(c, ""):
                found.append(c)
    return found


def check_run(run_dir: Path, report: Path, kill_point=None) -> list[str]:
    lines = report.read_text().split("\n")
    assert lines[0] == "finished", lines[0]
    assert every_checkpoint_loads(run_dir / "checkpoints") == list(range(1, STEPS + 1))
    local = [r["step"] for r in read_metrics(run_dir) if "train/loss" in r]
    assert local == list(range(1, STEPS + 1)), local
    list(iter_wandb_records(run_dir))  # the offline run file reads: header, chunk checksums, no half record
    return lines[1:]


@pytest.mark.slow
def test_wandb_cannot_start_online_falls_back_and_training_goes_on(tmp_path, tokenizer_dir):
    run_dir, report = tmp_path / "run", tmp_path / "report"
    config = base_config(run_dir, tokenizer_dir, max_steps=STEPS, wandb="online")
    env = {"WANDB_BASE_URL": "http://127.0.0.1:9", "HOME": str(tmp_path), "NETRC": str(tmp_path / "none"),
           "WANDB_CONFIG_DIR": str(tmp_path / "wandb_config")}
    proc = _FORK.Process(target=child, args=(config, env, str(report)))
    proc.start()
    proc.join(240)
    assert proc.exitcode == 0, proc.exitcode
    caught = check_run(run_dir, report)
    assert sum("falling back to offline mode" in w for w in caught) == 1, caught
    remote = [r["step"] for r in history_as_metrics(run_dir) if "train/loss" in r]
    assert remote == list(range(1, STEPS + 1))  # the offline run has every step, ready for `wandb sync`
    record("W&B cannot start online (no key, bad URL)", True, 0)


@pytest.mark.slow
def test_wandb_service_killed_mid_run_training_goes_on(tmp_path, tokenizer_dir):
    run_dir, report = tmp_path / "run", tmp_path / "report"
    config = base_config(run_dir, tokenizer_dir, max_steps=STEPS, wandb="offline")
    proc = _FORK.Process(target=child, args=(config, {}, str(report)))
    proc.start()
    deadline = time.time() + 120
    while (latest_step(run_dir / "checkpoints") or 0) < 2:
        assert proc.is_alive() and time.time() < deadline
        time.sleep(0.005)
    killed = wandb_core_pids(proc.pid)
    assert killed, "no wandb service process found under the training process"
    for pid in killed:
        os.kill(pid, signal.SIGKILL)
    proc.join(240)
    assert proc.exitcode == 0, proc.exitcode
    check_run(run_dir, report)
    # what the killed service had written is a clean prefix of the run; what it held in memory is gone
    # from the .wandb file (never from metrics.jsonl, checked above)
    remote = [r["step"] for r in history_as_metrics(run_dir) if "train/loss" in r]
    assert remote == list(range(1, len(remote) + 1))
    print(f"W&B service killed after step 2: the .wandb file holds {len(remote)} of {STEPS} steps, "
          f"metrics.jsonl all {STEPS}")
    record("W&B service killed mid-run", True, 0)
