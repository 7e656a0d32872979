"""The README demo, end to end at the small budget (same code path as the full demo)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dashboards.template import template_names
from training.demo import (
    BUDGETS,
    NUMERICS_ENV,
    DemoConfig,
    Stage,
    cpu_fingerprint,
    numerics_fingerprint,
    pin_numerics,
    run_demo,
    source_commit,
)
from training.demo_summary import headline, headline_lines, strongest_patch

REPO = Path(__file__).resolve().parents[1]


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


def _write_metrics(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_headline_reads_first_and_last_eval_and_probe_rows(tmp_path):
    path = _write_metrics(tmp_path / "metrics.jsonl", [
        {"step": 0, "eval/synthetic_acc": 0.5, "eval/synthetic_sampled_acc": 0.4, "rl/pass@k": 0.8,
         "eval/synthetic_categorical_acc": 0.2},
        {"step": 0, "rl/letter_gold_margin_mean": -0.5, "rl/kl_letter_mean": 0.0, "attn/option_mass_mean": 0.3},
        {"step": 0, "rl/acc": 0.45},
        {"step": 5, "eval/synthetic_acc": 0.55, "eval/synthetic_sampled_acc": 0.5, "rl/pass@k": 0.85,
         "eval/synthetic_categorical_acc": 0.2},
        {"step": 5, "rl/letter_gold_margin_mean": 1.0, "rl/kl_letter_mean": 0.1, "attn/option_mass_mean": 0.2},
        {"step": 10, "eval/synthetic_acc": 0.675, "eval/synthetic_sampled_acc": 0.6, "rl/pass@k": 0.9,
         "eval/synthetic_categorical_acc": 0.25},
        {"step": 10, "rl/letter_gold_margin_mean": 2.5, "rl/kl_letter_mean": 0.25, "attn/option_mass_mean": 0.1},
    ])
    h = headline(path)
    assert (h["greedy_before"], h["greedy_after"], h["gain_points"]) == (0.5, 0.675, 17.5)
    assert (h["pass@k_before"], h["pass@k_after"], h["categorical_after"]) == (0.8, 0.9, 0.25)
    assert h["greedy_by_step"] == [0.5, 0.55, 0.675] and h["eval_steps"] == [0, 5, 10]
    assert (h["gold_margin_first"], h["gold_margin_last"]) == (-0.5, 2.5)
    assert (h["letter_kl_first"], h["letter_kl_last"], h["option_mass_last"]) == (0.0, 0.25, 0.1)
    assert "entropy_first" not in h  # never logged: not invented
    text = "\n".join(headline_lines(h))
    assert "0.500" in text and "0.675" in text and "+17.5 points" in text and "-0.50" in text and "0.2500" in text


def test_strongest_patch_names_the_largest_component_cell_not_the_residual_stream():
    p = {"strongest": {"denoise/resid_post": {"layer": 1, "pos": 9, "token": "9: :", "value": 1.0},
                       "denoise/attn_out": {"layer": 0, "pos": 9, "token": "9: :", "value": 0.4},
                       "denoise/z": {"layer": 1, "head": 2, "value": -0.7}}}
    assert strongest_patch(p) == "denoise/z at layer 1, head 2 restores -0.70 of the clean-corrupted logit difference"
    assert strongest_patch({"strongest": {}}) is None


def test_pin_numerics_keeps_a_user_setting_and_reports_what_is_in_force(monkeypatch):
    import torch

    monkeypatch.setenv("MKL_CBWR", "COMPATIBLE")
    monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
    before = torch.get_num_threads()
    try:
        got = pin_numerics(2)
        assert torch.get_num_threads() == 2 and got["threads"] == 2
        assert got["mkl_cbwr"] == "COMPATIBLE" and os.environ["MKL_CBWR"] == "COMPATIBLE"
        assert os.environ["ATEN_CPU_CAPABILITY"] == NUMERICS_ENV["ATEN_CPU_CAPABILITY"]
    finally:
        torch.set_num_threads(before)


# /proc/cpuinfo as Linux writes it (flag lists abridged): an AVX2-only AMD EPYC like the one that wrote
# ../shared/fixtures/demo-numerics, and a Sapphire Rapids Xeon (AVX-512, AMX) like this project's other one.
EPYC_CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 7B13
flags\t\t: fpu sse2 avx f16c fma avx2 bmi2 sha_ni

processor\t: 1
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 7B13
flags\t\t: fpu sse2 avx f16c fma avx2 bmi2 sha_ni
"""
XEON_CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Processor
flags\t\t: fpu sse2 fma avx2 avx512f avx512bw avx_vnni avx512_bf16 amx_bf16 avx512_fp16 amx_tile amx_int8
"""


def test_numerics_fingerprint_names_the_cpu_and_the_libraries():
    assert cpu_fingerprint(EPYC_CPUINFO) == {"cpu_vendor": "AuthenticAMD", "cpu_model": "AMD EPYC 7B13",
                                             "cpu_flags": ["avx2", "fma"]}
    assert cpu_fingerprint(XEON_CPUINFO)["cpu_flags"] == ["avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16",
                                                          "amx_tile"]
    assert cpu_fingerprint("")["cpu_vendor"] == "unknown"
    import torch

    got = numerics_fingerprint()  # this machine: the versions are the ones torch was built with
    config = torch.__config__.show()
    assert f"Math Kernel Library Version {got['mkl']}" in config and f"MKL-DNN v{got['onednn']}" in config
    assert isinstance(got["onednn_bf16_matmul"], bool) and got["cpu_vendor"] != "unknown"


def test_summary_records_the_commit_that_ran():
    got = source_commit()  # this checkout: a git repository
    assert len(got["commit"]) == 40 and int(got["commit"], 16) >= 0 and isinstance(got["dirty"], bool)
    import subprocess

    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert got["commit"] == head


def test_small_budget_trains_the_full_budgets_policy_and_a_shorter_grpo():
    full, small = BUDGETS["full"], BUDGETS["small"]
    assert set(full) == set(small)
    # tokenizer, base and SFT settings are the full demo's: the slow test starts GRPO from the same policy
    pre_rl = [k for k in full if not k.startswith(("rl_", "eval_n", "gen_eval_n", "patch_"))]
    assert "sft_steps" in pre_rl and {k: small[k] for k in pre_rl} == {k: full[k] for k in pre_rl}
    for key in ("rl_steps", "rl_examples", "rl_eval", "eval_n", "patch_pairs"):
        assert full[key] > small[key]


# The small budget's run: seed 0. With nanochat's Muon (issue 31) the small budget's GRPO stage (60 steps of
# 16 x 8, KL 0.2, 100 held-out problems) measured +10.0 points for seed 0 (0.50 -> 0.60), -2.0 for seed 1
# (0.53 -> 0.51) and +3.0 for seed 2 (0.63 -> 0.66) on this project's Intel machine (torch 2.15, MKL 2024.2):
# at this budget the gain depends on the seed (the full budget's 120 steps of 32 x 8 gave seed 0 +29.5). The
# bar sits below seed 0's measured gain by a margin for other CPUs and builds; on the same build the run is
# the same, bit for bit (training.demo.NUMERICS_ENV).
SMALL_SEED = "0"
SMALL_GAIN_MEASURED = 10.0  # 0.500 -> 0.600 on 100 held-out problems
SMALL_MIN_GAIN = 5.0
SMALL_GOLDEN = REPO / "tests" / "golden" / "demo_small_seed0.json"  # the run's headline per numerics fingerprint


def _demo(out: Path, *extra: str) -> subprocess.CompletedProcess:
    """`python -m training.demo --budget small` in a fresh process: MKL and torch read the pinned numerics
    settings at their first operation, which in this pytest process has long happened."""
    env = {k: v for k, v in os.environ.items() if k not in NUMERICS_ENV}
    env.update(TQDM_DISABLE="1", WANDB_SILENT="true", HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, "-m", "training.demo", "--budget", "small", "--out", str(out),
                             "--wandb", "offline", *extra], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=1500)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_demo_small_budget_end_to_end_gain_and_cached(tmp_path):
    out = tmp_path / "demo"
    text = _demo(out, "--seed", SMALL_SEED).stdout
    results = json.loads((out / "summary.json").read_text())
    # every artifact the summary points at exists
    for path in (out / "rl" / "metrics.jsonl", out / "dashboards" / "report.html", out / "patching" / "patching.html",
                 out / "patching" / "patching.safetensors", out / "summary.json"):
        assert path.is_file(), path
    assert len(list((out / "dashboards" / "workspaces").glob("*.json"))) == len(template_names())  # every one
    assert list((out / "rl" / "wandb").glob("offline-run-*/run-*.wandb"))
    rows = [json.loads(line) for line in (out / "rl" / "metrics.jsonl").read_text().splitlines()]
    names = set().union(*rows)
    for name in ("rl/acc", "rl/mean_reward", "rl/kl_letter_mean", "rl/letter_margin_mean", "attn/entropy_mean",
                 "attn/option_mass_mean", "rl/letter_pred_counts/A", "rl/letter_gold_margin_mean"):
        assert name in names, name
    assert 0.0 <= results["sft"]["categorical_acc"] <= 1.0
    # is the rationale used? the faith family ran at the first and the last probe step, and the summary's table
    # holds what metrics.jsonl holds there
    faith_rows = [r for r in rows if "faith/early_answer_aoc" in r]
    assert len(faith_rows) >= 2 and any("faith/rollout_consistency/n" in r for r in rows)
    f = results["headline"]["faith"]
    assert f["steps"] == [faith_rows[0]["step"], faith_rows[-1]["step"]]
    assert f["last"]["faith/early_answer_aoc"] == faith_rows[-1]["faith/early_answer_aoc"]
    assert f["first"]["faith/shuffle_content_consistency"] == faith_rows[0]["faith/shuffle_content_consistency"]
    assert "is the rationale used?" in text and f"{f['last']['faith/early_answer_aoc']:.3f}" in text
    assert "aquainterp dashboard push" in text and "training/speedrun.sh" in text

    # the summary's numbers are the ones in metrics.jsonl: the RL stage's own before/after eval dicts (what
    # training.rl returned) equal the first and last eval rows, and the headline the summary prints equals them
    evals = [r for r in rows if "eval/synthetic_acc" in r]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == BUDGETS["small"]["rl_steps"]
    # exact by construction: the same floats, read back from metrics.jsonl and stage.json
    assert results["rl"]["before"] == {k: evals[0][k] for k in results["rl"]["before"]}
    assert results["rl"]["after"] == {k: evals[-1][k] for k in results["rl"]["after"]}
    h = results["headline"]
    assert (h["greedy_before"], h["greedy_after"]) == (evals[0]["eval/synthetic_acc"], evals[-1]["eval/synthetic_acc"])
    assert h["gain_points"] == round(100 * (h["greedy_after"] - h["greedy_before"]), 1)
    margins = [r["rl/letter_gold_margin_mean"] for r in rows if "rl/letter_gold_margin_mean" in r]
    kls = [r["rl/kl_letter_mean"] for r in rows if "rl/kl_letter_mean" in r]
    assert (h["gold_margin_first"], h["gold_margin_last"], h["letter_kl_last"]) == (margins[0], margins[-1], kls[-1])
    table = text[text.index("the GRPO stage in numbers"):]
    for value in (f"{h['greedy_before']:.3f}", f"{h['greedy_after']:.3f}", f"{h['gain_points']:+.1f} points",
                  f"{h['gold_margin_first']:.2f}", f"{h['gold_margin_last']:.2f}", f"{h['letter_kl_last']:.4f}"):
        assert value in table, value
    assert "what to look at" in text and "Held-out evaluation accuracy" in text and "restores" in text
    # each stage's time is in summary.json; the numerics were pinned before any tensor operation
    assert set(results["stage_seconds"]) == {"tokenizer", "base", "sft", "rl", "dashboards", "patching"}
    assert all(s is not None and s >= 0 for s in results["stage_seconds"].values())
    assert results["numerics"]["cpu_capability"] == "AVX2" and results["numerics"]["mkl_cbwr"] == "AVX2,STRICT"

    # GRPO with the probes on moves held-out greedy accuracy at this budget
    assert h["gain_points"] >= SMALL_MIN_GAIN, h
    # every headline number (accuracies, probe and faith rows) equals the golden run of the same numerics
    # (CPU vendor, MKL branch, torch, MKL); a machine with other numerics has no golden to match (say so)
    golden = [run for run in json.loads(SMALL_GOLDEN.read_text())["runs"]
              if run["numerics"] == {k: results["numerics"][k] for k in ("cpu_vendor", "mkl_cbwr", "torch", "mkl")}]
    if golden:
        assert json.loads(json.dumps(h)) == golden[0]["headline"], "the demo's numbers moved: update " \
            f"{SMALL_GOLDEN.name} and README.md, docs/demo.md, docs/probes.md together (python -m training.demo_tables)"
    else:
        print(f"no golden headline for numerics {results['numerics']} in {SMALL_GOLDEN}: only the gain is checked")

    # second run: every stage comes from the cache and the results are the same
    again_text = _demo(out, "--seed", SMALL_SEED).stdout
    assert again_text.count("cached") == 6
    again = json.loads((out / "summary.json").read_text())
    # exact by construction: the cached stages' results are read back, nothing is recomputed
    for stage in ("tokenizer", "base", "sft", "rl", "patching", "headline"):
        assert again[stage] == results[stage]
