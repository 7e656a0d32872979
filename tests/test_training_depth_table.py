"""The depth table against numbers worked out by hand from nanochat's formulas."""

import math
from pathlib import Path

import pytest

from training.depth_table import H100_BF16_PEAK, DepthTableConfig, depth_row, markdown, run


def test_d20_matches_nanochat_parameter_count_and_flops():
    row = depth_row(20, DepthTableConfig())
    # 2 × 65536 × 1280 (wte + lm_head) + 20 layers × 12 × 1280² (q, k, v, proj = 4d², MLP = 8d²)
    assert row["params"] == 2 * 65536 * 1280 + 20 * 12 * 1280**2 == 560_988_160
    assert row["flops_per_token"] == 6 * (560_988_160 - 65536 * 1280) + 12 * 20 * 10 * 128 * 2048
    assert row["tokens"] == 20 * 560_988_160
    expected_h = row["flops_per_token"] * row["tokens"] / (8 * H100_BF16_PEAK * 0.4) / 3600
    assert math.isclose(row["hours"], expected_h) and 3 < row["hours"] < 4


def test_time_scales_inversely_with_mfu_and_table_prints(capsys):
    a = depth_row(12, DepthTableConfig(mfu=0.4))
    b = depth_row(12, DepthTableConfig(mfu=0.8))
    assert math.isclose(a["hours"], 2 * b["hours"])
    rows = run(DepthTableConfig(depths="4,12"))
    out = capsys.readouterr().out
    assert out.strip() == markdown(rows, DepthTableConfig(depths="4,12"))
    assert "| 12 | 768 | 6 | 185.6M |" in out and "40% MFU" in out
    with pytest.raises(ValueError, match="--mfu must be in"):
        run(DepthTableConfig(mfu=1.5))


def test_readme_table_is_the_codes_output():
    readme = (Path(__file__).resolve().parents[1] / "docs" / "training.md").read_text()
    config = DepthTableConfig()
    rows = [depth_row(int(d), config) for d in config.depths.split(",")]
    assert markdown(rows, config) in readme, "docs/training.md's depth table is stale: paste `python -m training.depth_table`"
