"""The README demo, end to end at the small budget (same code path as the full demo)."""

import json

import pytest

from training.demo import BUDGETS, DemoConfig, Stage, run_demo


def test_stage_cache_key_changes_with_settings_and_parent(tmp_path):
    a = Stage(tmp_path, "base", {"depth": 2}, parent_key="p1")
    assert a.key == Stage(tmp_path, "base", {"depth": 2}, parent_key="p1").key
    assert a.key != Stage(tmp_path, "base", {"depth": 3}, parent_key="p1").key
    assert a.key != Stage(tmp_path, "base", {"depth": 2}, parent_key="p2").key
    a.start()
    assert a.cached() is None
    a.finish({"x": 1}, 2.0)
    assert a.cached() == {"x": 1, "seconds": 2.0}
    assert Stage(tmp_path, "base", {"depth": 3}, parent_key="p1").cached() is None


def test_unknown_budget_is_refused(tmp_path):
    with pytest.raises(ValueError, match="--budget must be one of"):
        run_demo(DemoConfig(out=str(tmp_path), budget="huge"))


def test_full_budget_uses_more_of_everything_than_small():
    full, small = BUDGETS["full"], BUDGETS["small"]
    assert set(full) == set(small)
    for key in ("base_steps", "sft_steps", "rl_steps", "eval_n"):
        assert full[key] > small[key]


@pytest.mark.slow
def test_demo_small_budget_end_to_end_and_cached(tmp_path, capsys):
    out = tmp_path / "demo"
    results = run_demo(DemoConfig(out=str(out), budget="small", wandb="offline"))
    text = capsys.readouterr().out
    # every artifact the summary points at exists
    for path in (out / "rl" / "metrics.jsonl", out / "dashboards" / "report.html", out / "patching" / "patching.html",
                 out / "patching" / "patching.safetensors", out / "summary.json"):
        assert path.is_file(), path
    assert len(list((out / "dashboards" / "workspaces").glob("*.json"))) == 6  # every shipped template
    assert list((out / "rl" / "wandb").glob("offline-run-*/run-*.wandb"))
    rows = [json.loads(line) for line in (out / "rl" / "metrics.jsonl").read_text().splitlines()]
    names = set().union(*rows)
    for name in ("rl/acc", "rl/mean_reward", "rl/kl_letter_mean", "rl/letter_margin_mean", "attn/entropy_mean",
                 "attn/option_mass_mean", "rl/letter_pred_counts/A"):
        assert name in names, name
    assert 0.0 <= results["sft"]["categorical_acc"] <= 1.0
    assert "aquainterp dashboard push" in text and "training/speedrun.sh" in text
    # second run: every stage comes from the cache and the results are the same
    again = run_demo(DemoConfig(out=str(out), budget="small", wandb="offline"))
    assert capsys.readouterr().out.count("cached") == 6
    for stage in ("tokenizer", "base", "sft", "rl", "patching"):
        assert again[stage] == results[stage]
