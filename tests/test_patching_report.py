"""The patching report: summary first, cropped heatmaps with the decision column, drill-down, raw JSON last;
opened in headless Chromium (plots drawn, no console errors, the decision column in the first viewport)."""

import json
import os
import re

import pytest
import torch
from tasks_tokenizer import trained_tokenizer
from test_patching import random_gpt

from aquainterp.patching.command import write_report
from aquainterp.patching.completion_pairs import completion_pairs, greedy_completions
from aquainterp.patching.patcher import MIN_GAP, Patcher
from aquainterp.patching.report import CHECK_JS, MAX_COLUMNS, MIN_COLUMNS, informative_columns
from aquainterp.tasks import letter_token_ids
from aquainterp.tasks.synthetic import SyntheticTask
from dashboards.browser import find_chromium, inspect_page

SWEEPS = ("resid_pre", "attn_out", "z_pos", "z")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """A report on a random GPT at completion decisions (its completions + a forced answer marker)."""
    tok = trained_tokenizer()
    model = random_gpt(n_layer=2, vocab=tok.vocab_size, seed=3)
    problems = SyntheticTask(seed=0, split="eval", difficulty=1).problems(3)
    marker, _ = letter_token_ids(tok)
    generate = lambda prompts: [c + marker for c in greedy_completions(model, tok, prompts, max_new_tokens=6)]
    pairs = completion_pairs(tok, problems, "noise", generate).pairs
    patcher = Patcher(model, pairs, batch_size=256, align="end", progress=False)
    results = [patcher.sweep(name) for name in SWEEPS]
    out = tmp_path_factory.mktemp("report")
    settings = {"checkpoint": "random", "decision": "completion", "method": "exact", "corruption": "noise",
                "n_pairs": len(pairs), "skipped": [], "no_marker": ["lost:1"], "align": "end"}
    summary = write_report(out, patcher, results, tok, settings)
    return out / "patching.html", summary, patcher


def test_sections_in_reading_order(report):
    path, summary, patcher = report
    page = path.read_text()
    summary_at, heatmaps_at = page.index("clean logit diff"), page.index("<h2>Heatmaps</h2>")
    pairs_at, raw_at = page.index("<h2>Pairs</h2>"), page.index("<h2>Raw summary</h2>")
    assert summary_at < heatmaps_at < pairs_at < raw_at
    assert page.index("class='aq-panel'") > heatmaps_at
    sentences = re.findall(r"<li><b>denoise/(\w+)</b>: patching the clean \w+ into the corrupted run at ([^<]+)", page)
    assert [s for s, _ in sentences] == list(SWEEPS)
    assert "1 problems skipped (1 completions without an answer marker)" in page
    # a normalised value divides by the mean clean - corrupted gap: below MIN_GAP every sentence says so
    gap = summary["clean_logit_diff_mean"] - summary["corrupted_logit_diff_mean"]
    assert page.count("⚠ unreliable: tiny gap") == (len(SWEEPS) if abs(gap) < MIN_GAP else 0)
    assert "<b>@ 0: :</b> at position 0" in page[:heatmaps_at]  # 'L1 @ 0: :' and the '*' explained up top
    for s in summary["sweeps"].values():  # the top cells' tokens and restored fraction in the summary table
        best = s["top_cells"][0]
        assert f"{best['value']:+.1%}" in page[:heatmaps_at]
        if "token" in best:
            assert best["token"] in page[:heatmaps_at]
    assert page.count("<details class='pair'") == len(patcher.pairs) and page.count("class='pair' open") == 1
    assert re.search(r"<details><summary>summary.json</summary><pre class='raw'>", page)
    raw = page[raw_at:].split("<pre class='raw'>", 1)[1].split("</pre>", 1)[0]
    assert json.loads(raw.replace("&quot;", '"').replace("&#x27;", "'").replace("&lt;", "<")
                      .replace("&gt;", ">").replace("&amp;", "&")) == json.loads(json.dumps(summary))
    assert page.count("plotly.js v") == 1 and re.search(r"<script[^>]*\bsrc=", page) is None  # offline
    assert summary["pairs"][0]["completion"].endswith("Answer:")  # the drill-down text is the completion's


def test_informative_columns_keep_the_decision_and_crop():
    grid = torch.zeros(3, 200)
    grid[1, 150] = 0.05  # below 10% of the strongest: not informative
    grid[0, 190] = 1.0
    cols = informative_columns(grid, [199])
    assert cols == list(range(199 - MIN_COLUMNS + 1, 200))  # the span 190..199 widened to MIN_COLUMNS
    grid[2, 10] = -0.8  # far away: the span would be too wide, so only the strong columns (and decision)
    cols = informative_columns(grid, [199])
    assert 10 in cols and 190 in cols and 199 in cols and 150 not in cols and len(cols) <= MAX_COLUMNS
    assert informative_columns(torch.zeros(2, 5), [4]) == list(range(5))


@pytest.fixture(scope="module")
def chromium():
    if find_chromium() is None:
        pytest.fail(os.environ.get("AQUAINTERP_CHROMIUM_MISSING") or "headless Chromium is required for the "
                    "report browser test: run scripts/ensure-chromium (or apt-get install -y chromium)")


def test_report_in_headless_chromium(report, chromium, tmp_path):
    path, summary, patcher = report
    page = inspect_page(path, tmp_path / "report.png", evaluate=CHECK_JS)
    assert page.console_errors == []
    assert page.panels == len(SWEEPS) and page.rendered == page.panels
    toggles = path.read_text().count("<details class='full'>")
    assert page.plots == page.panels + toggles
    seen = json.loads(page.value)
    box, view = seen["decision_box"], seen["viewport"]
    assert box is not None, "the first heatmap outlines no decision column"
    assert 0 <= box["left"] < box["right"] <= view["width"] and 0 <= box["top"] < box["bottom"] <= view["height"]
    assert seen["headings"] == ["Activation patching", "Heatmaps", "Pairs", "Raw summary"]
    assert seen["raw_hidden"] is True and seen["pairs"] == len(patcher.pairs)
    assert (tmp_path / "report.png").stat().st_size > 10_000


def test_a_subset_of_pairs_keeps_each_pairs_noise_and_baselines(report):
    """What the headline screen (patch_cmd.screen) patches after leaving pairs out: the kept pairs' own
    clean and corrupted runs, not a new noise draw (which would change the gaps it screened on)."""
    _, _, patcher = report
    keep = [0, len(patcher.pairs) - 1]
    sub = patcher.subset(keep)
    assert sub.noise is not None and [p.name for p in sub.pairs] == [patcher.pairs[i].name for i in keep]
    # close, not equal: the subset pads its batch to another length, so the kernels see other shapes
    torch.testing.assert_close(sub.clean_ld, patcher.clean_ld[keep], rtol=0, atol=1e-4)
    torch.testing.assert_close(sub.corrupted_ld, patcher.corrupted_ld[keep], rtol=0, atol=1e-4)
    fresh = Patcher(patcher.model, sub.pairs, batch_size=256, align="end", progress=False, seed=1)
    assert not torch.allclose(fresh.corrupted_ld, sub.corrupted_ld, atol=1e-3)  # another draw moves them
