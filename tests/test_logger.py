"""aquainterp.logger: metrics.jsonl rows, W&B modes and fallback, the offline W&B run read back."""

import json
import math
import warnings

import numpy as np
import plotly.graph_objects as go
import pytest
import torch

from aquainterp.logger import Logger, find_wandb_file, iter_wandb_records, read_metrics, step_metric_for
from dashboards.wandb_run import history_as_metrics, read_history


@pytest.fixture
def offline_env(monkeypatch, tmp_path):
    """No W&B account, no reachable server: nothing in these tests can talk to W&B."""
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb-data"))


def test_jsonl_rows_have_step_names_and_plain_numbers(tmp_path):
    with Logger(tmp_path, mode="disabled") as log:
        log.log({"train/loss": 2.5, "train/lr": np.float32(0.25), "rl/acc": torch.tensor(0.75),
                 "rl/letter_pred_counts/A": np.int64(3), "flag": True}, step=7)
        log.log({"train/loss": 2.0}, step=8)
    rows = read_metrics(tmp_path)
    assert rows == [{"step": 7, "train/loss": 2.5, "train/lr": 0.25, "rl/acc": 0.75,
                     "rl/letter_pred_counts/A": 3, "flag": 1},
                    {"step": 8, "train/loss": 2.0}]
    assert isinstance(rows[0]["rl/letter_pred_counts/A"], int)
    assert not (tmp_path / "wandb").exists()  # disabled: W&B writes nothing


def test_histogram_table_and_figure_rows_keep_raw_values(tmp_path):
    fig = go.Figure(go.Heatmap(z=[[1, 2], [3, 4]]))
    with Logger(tmp_path, mode="disabled") as log:
        log.log_histogram("rl/letter_margin", torch.tensor([[0.5, -1.0], [2.0, math.inf]]), step=3)
        log.log_table("rl/hardest_questions", ["q", "margin", "ok"], [("1+1?", np.float64(-2.5), False)], step=3)
        log.log_figure("attn/decision_pattern", fig, step=3)
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert rows[0] == {"step": 3, "rl/letter_margin": {"_type": "histogram", "values": [0.5, -1.0, 2.0, math.inf]}}
    assert rows[1] == {"step": 3, "rl/hardest_questions": {"_type": "table", "columns": ["q", "margin", "ok"],
                                                           "rows": [["1+1?", -2.5, False]]}}
    figure = rows[2]["attn/decision_pattern"]
    assert figure == {"_type": "plotly", "path": "media/attn_decision_pattern_000003.json"}
    saved = json.loads((tmp_path / figure["path"]).read_text())
    assert saved["data"][0]["type"] == "heatmap" and saved["data"][0]["z"] == [[1, 2], [3, 4]]


def test_bad_input_names_the_metric(tmp_path):
    with Logger(tmp_path, mode="disabled") as log:
        with pytest.raises(TypeError, match="'rl/acc' must be a number, got str"):
            log.log({"rl/acc": "high"}, step=0)
        with pytest.raises(TypeError, match="'rl/acc' must be a single number"):
            log.log({"rl/acc": np.array([1.0, 2.0])}, step=0)
        with pytest.raises(TypeError, match="step must be an integer, got float"):
            log.log({"rl/acc": 1.0}, step=1.5)
        with pytest.raises(ValueError, match="step must be >= 0"):
            log.log({"rl/acc": 1.0}, step=-1)
        with pytest.raises(ValueError, match="other than 'step'"):
            log.log({"step": 1.0}, step=0)
        with pytest.raises(ValueError, match="row 1 of 'rl/t' has 1 cells, expected 2"):
            log.log_table("rl/t", ["a", "b"], [[1, 2], [3]], step=0)
        with pytest.raises(ValueError, match="'rl/h' got no values"):
            log.log_histogram("rl/h", [], step=0)
        with pytest.raises(TypeError, match="'attn/f' must be a plotly Figure"):
            log.log_figure("attn/f", {"data": []}, step=0)
    with pytest.raises(ValueError, match="mode must be one of online, offline, disabled, got 'cloud'"):
        Logger(tmp_path, mode="cloud")
    assert read_metrics(tmp_path) == []  # nothing half-written


def test_rank_nonzero_is_a_no_op(tmp_path):
    log = Logger(tmp_path / "run", mode="offline", rank=1)
    log.log({"rl/acc": 1.0}, step=0)
    log.log_histogram("rl/h", [1.0], step=0)
    log.finish()
    assert not (tmp_path / "run").exists()
    assert log.wandb_run is None


def test_step_metrics_per_family():
    assert step_metric_for("rl/acc") == "rl/step"
    assert step_metric_for("attn/entropy/layer0/head1") == "rl/step"  # probes plot against the RL step
    assert step_metric_for("train/loss") == "train/step"
    assert step_metric_for("loss") is None


def test_read_metrics_errors_name_file_and_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 0, "a": 1}\n{"a": 2}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: each line must be an object with an integer 'step'"):
        read_metrics(tmp_path)
    with pytest.raises(FileNotFoundError, match="no metrics file"):
        read_metrics(tmp_path / "nope")


def test_online_without_login_falls_back_to_offline_with_one_warning(tmp_path, offline_env):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        log = Logger(tmp_path, mode="online", run_name="fallback")
        log.log({"rl/acc": 0.5}, step=0)
        log.log({"rl/acc": 0.6}, step=1)
        log.finish()
    ours = [w for w in caught if "Logger:" in str(w.message)]
    assert len(ours) == 1, [str(w.message) for w in ours]
    assert "falling back to offline" in str(ours[0].message) and "wandb login" in str(ours[0].message)
    assert log.mode == "offline"
    history = history_as_metrics(tmp_path)
    assert [(r["step"], r["rl/acc"]) for r in history] == [(0, 0.5), (1, 0.6)]


def test_wandb_failure_mid_run_warns_once_and_keeps_local_log(tmp_path, offline_env):
    log = Logger(tmp_path, mode="offline")
    log.log({"rl/acc": 0.1}, step=0)
    log.wandb_run.finish()  # W&B goes away under the logger: its log() now raises
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(1, 4):
            log.log({"rl/acc": 0.1 * step}, step=step)
    assert len([w for w in caught if "W&B logging failed" in str(w.message)]) == 1
    log.finish()
    assert [r["step"] for r in read_metrics(tmp_path)] == [0, 1, 2, 3]


def test_offline_wandb_run_reads_back_as_the_same_series(tmp_path, offline_env):
    """The acceptance check: the .wandb file (wandb's protobuf records) holds what metrics.jsonl holds."""
    rng = np.random.default_rng(0)
    with Logger(tmp_path, mode="offline", config={"lr": 0.1}) as log:
        for step in range(12):
            log.log({"train/loss": float(rng.normal()), "rl/acc": float(rng.uniform()),
                     "attn/entropy/layer1/head0": float(rng.uniform()), "rl/letter_pred_counts/C": step}, step=step)
        log.log_histogram("rl/letter_margin", rng.normal(size=50), step=11)
        log.log_table("rl/hardest_questions", ["q", "m"], [["a", 1.5], ["b", -0.5]], step=11)
    local = read_metrics(tmp_path)
    remote = history_as_metrics(tmp_path)


    def series(rows):
        out = {}
        for row in rows:
            for name, value in row.items():
                if name != "step" and not isinstance(value, dict):
                    out.setdefault(name, []).append((row["step"], value))
        return out

    assert series(remote) == series(local)
    assert len(series(local)["train/loss"]) == 12
    table = [r["rl/hardest_questions"] for r in remote if "rl/hardest_questions" in r]
    assert table == [{"_type": "table", "columns": ["q", "m"], "rows": [["a", 1.5], ["b", -0.5]]}]
    hist = [r["rl/letter_margin"] for r in remote if "rl/letter_margin" in r][0]
    assert sum(hist["counts"]) == 50 and len(hist["bins"]) == len(hist["counts"]) + 1
    # W&B also got the step metrics the dashboards plot against, and define_metric records binding them
    raw = read_history(tmp_path)
    assert [r["rl/step"] for r in raw if "rl/acc" in r] == list(range(12))
    assert [r["train/step"] for r in raw if "train/loss" in r] == list(range(12))
    from wandb.proto import wandb_internal_pb2 as pb

    globs = {}
    for data in iter_wandb_records(tmp_path):
        record = pb.Record()
        record.ParseFromString(data)
        if record.WhichOneof("record_type") == "metric" and record.metric.glob_name:
            globs[record.metric.glob_name] = record.metric.step_metric
    assert globs == {"train/*": "train/step", "rl/*": "rl/step", "attn/*": "rl/step"}


def test_wandb_reader_rejects_corrupt_files(tmp_path, offline_env):
    with Logger(tmp_path, mode="offline") as log:
        log.log({"rl/acc": 0.5}, step=0)
    path = find_wandb_file(tmp_path)
    data = bytearray(path.read_bytes())
    assert len(list(iter_wandb_records(path))) > 3
    data[40] ^= 0xFF
    bad = tmp_path / "bad.wandb"
    bad.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="bad.wandb: checksum mismatch"):
        list(iter_wandb_records(bad))
    (tmp_path / "junk.wandb").write_bytes(b"not a wandb file")
    with pytest.raises(ValueError, match="junk.wandb: not a W&B run file"):
        list(iter_wandb_records(tmp_path / "junk.wandb"))
    with pytest.raises(FileNotFoundError, match="no W&B run file"):
        find_wandb_file(tmp_path / "home")
