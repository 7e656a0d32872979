"""Offline HTML dashboards: figures hold the logged numbers; the page renders every panel in headless
Chromium with no console errors (Debian `chromium`, installed by scripts/test through scripts/ensure-chromium).
The screenshot is kept under the test's tmp dir and copied to artifacts/dashboards/ for the demo and for
people to look at."""

import os
import shutil
from pathlib import Path

import pytest

from aquainterp.cli import main
from aquainterp.logger import Logger, read_metrics
from dashboards.browser import find_chromium, inspect_page
from dashboards.html import RunData, panel_count, panel_figure, write_html
from dashboards.sample_run import record_sample_run
from dashboards.template import Panel, all_templates, get_template

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "artifacts" / "dashboards"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# What the slider's first step does (method "animate", args [["<step>"], ...]), run in the page.
SLIDER_JS = """(async () => {
  // the first layer x head heatmap (a slider over steps); a layer x step heatmap has none
  const gd = [...document.querySelectorAll("[data-kind='heatmap'] .js-plotly-plot")].find(p => p.layout.sliders);
  const before = gd.data[0].z.map(r => Array.from(r));
  const step = gd.layout.sliders[0].steps[0];
  await Plotly.animate(gd, step.args[0], step.args[1]);
  return {before, after: gd.data[0].z.map(r => Array.from(r)), frames: gd._transitionData._frames.length};
})()"""


def panel_for(template: str, metric: str) -> Panel:
    return [p for p in get_template(template).panels if metric in p.metrics][0]


@pytest.fixture(scope="module")
def sample_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("sample-run")
    record_sample_run(run_dir, steps=30, n_layers=4, n_heads=2, mode="disabled")
    return run_dir


@pytest.fixture(scope="module")
def chromium():
    path = find_chromium()
    if path is None:  # scripts/test says why it could not install one (scripts/ensure-chromium)
        pytest.fail(os.environ.get("AQUAINTERP_CHROMIUM_MISSING") or "headless Chromium is required for the "
                    "dashboard browser test: run scripts/ensure-chromium (or apt-get install -y chromium)")
    return path


def test_heatmap_has_one_frame_per_logged_step_and_opens_at_the_last(tmp_path):
    with Logger(tmp_path, mode="disabled") as log:
        for step in (0, 10, 20):
            log.log({f"attn/entropy/layer{layer}/head{head}": step + 10 * layer + head
                     for layer in range(3) for head in range(2)}, step=step)
    panel = Panel(kind="heatmap", title="h", regex=r"attn/entropy/layer(?P<layer>\d+)/head(?P<head>\d+)", x="rl/step")
    fig = panel_figure(panel, RunData.load(tmp_path))
    assert [f.name for f in fig.frames] == ["0", "10", "20"]
    assert [list(r) for r in fig.data[0].z] == [[20, 21], [30, 31], [40, 41]]  # rows = layers, cols = heads
    assert list(fig.data[0].y) == ["layer 0", "layer 1", "layer 2"] and list(fig.data[0].x) == ["head 0", "head 1"]
    assert [list(r) for r in fig.frames[0].data[0].z] == [[0, 1], [10, 11], [20, 21]]
    assert (fig.data[0].zmin, fig.data[0].zmax) == (0, 41)  # one colour scale for every step
    slider = fig.layout.sliders[0]
    assert slider.active == 2 and [s.label for s in slider.steps] == ["0", "10", "20"]


def test_line_bar_histogram_table_figures_show_the_logged_values(sample_run):
    data = RunData.load(sample_run)
    rows = read_metrics(sample_run)
    line = panel_figure(Panel(kind="line", title="acc", metrics=["rl/acc"], x="rl/step"), data)
    expected = [(r["step"], r["rl/acc"]) for r in rows if "rl/acc" in r]
    assert list(zip(line.data[0].x, line.data[0].y)) == expected
    counts = [r for r in rows if "rl/letter_pred_counts/A" in r][-1]
    bar = panel_figure(panel_for("mode_collapse", "rl/letter_pred_counts/A"), data)
    assert list(bar.data[0].x) == list("ABCDE")
    assert list(bar.data[0].y) == [counts[f"rl/letter_pred_counts/{L}"] for L in "ABCDE"]
    hist = panel_figure(panel_for("answer_confidence", "rl/letter_margin"), data)
    margins = [r["rl/letter_margin"]["values"] for r in rows if "rl/letter_margin" in r]
    assert list(hist.data[0].x) == margins[-1] and len(hist.frames) == len(margins)
    table = panel_figure(panel_for("answer_confidence", "rl/hardest_questions"), data)
    logged = [r["rl/hardest_questions"] for r in rows if "rl/hardest_questions" in r][-1]
    assert list(table.data[0].cells["values"][3]) == [row[3] for row in logged["rows"]]


def test_panels_without_data_still_get_a_plot_that_says_so(tmp_path):
    with Logger(tmp_path, mode="disabled") as log:
        log.log({"train/loss": 1.0}, step=0)
    fig = panel_figure(Panel(kind="line", title="kl", metrics=["rl/kl_letter_mean"], x="rl/step"),
                       RunData.load(tmp_path))
    assert fig.layout.annotations[0].text == "nothing logged for rl/kl_letter_mean"


def test_html_report_renders_every_panel_in_chromium(sample_run, chromium, tmp_path):
    templates = all_templates()
    out = write_html(templates, sample_run, tmp_path / "report.html")
    text = out.read_text()
    assert "https://" not in text.split("<body>")[1][:2000]  # nothing fetched from the network
    assert text.count("class='aq-panel'") == panel_count(templates) == 38
    report = inspect_page(out, tmp_path / "report.png", evaluate=SLIDER_JS)
    assert report.console_errors == []
    assert report.panels == report.rendered == report.plots == 38
    # the heatmap's slider step (Plotly.animate to a frame) really shows that step's grid
    heat = panel_figure(get_template("attention").panels[1], RunData.load(sample_run))
    first, last = ([list(r) for r in z] for z in (heat.frames[0].data[0].z, heat.data[0].z))
    assert report.value["frames"] == len(heat.frames) > 1
    assert report.value["before"] == last and report.value["after"] == first and first != last
    png = report.screenshot.read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 50_000
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shutil.copy(out, ARTIFACTS / "report.html")
    shutil.copy(report.screenshot, ARTIFACTS / "report.png")


def test_browser_check_catches_errors_and_missing_plots(chromium, tmp_path):
    """The checker itself can fail: a broken page reports its errors and its unrendered panel."""
    page = tmp_path / "broken.html"
    page.write_text("<html><body><div class='aq-panel'><div class='js-plotly-plot'></div></div>"
                    "<script>console.error('boom'); undefinedFunction();</script></body></html>")
    report = inspect_page(page, render_wait=2)
    assert report.panels == 1 and report.rendered == 0
    assert any("console.error: boom" in e for e in report.console_errors)
    assert any("undefinedFunction is not defined" in e for e in report.console_errors)


@pytest.mark.slow
def test_cli_html_from_the_offline_wandb_run(tmp_path, chromium, capsys, monkeypatch):
    """The report drawn from the .wandb file alone: same scalars as metrics.jsonl, page renders clean."""
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    run_dir = tmp_path / "run"
    assert main(["dashboard", "sample", "--run", str(run_dir), "--steps", "12", "--mode", "offline"]) == 0
    from_jsonl, from_wandb = RunData.load(run_dir, "jsonl"), RunData.load(run_dir, "wandb")
    assert from_wandb.scalars == from_jsonl.scalars
    assert set(from_wandb.objects) == set(from_jsonl.objects)
    (run_dir / "metrics.jsonl").unlink()  # auto now has to use the W&B run
    out, shot = tmp_path / "attention.html", tmp_path / "attention.png"
    code = main(["dashboard", "html", "--run", str(run_dir), "--template", "attention", "-o", str(out),
                 "--screenshot", str(shot)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "chromium: 9/9 panels rendered, 0 console errors" in printed
    assert "W&amp;B offline run" in out.read_text() and shot.read_bytes().startswith(PNG_MAGIC)
    assert main(["dashboard", "html", "--run", str(tmp_path / "missing"), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"--run: {tmp_path / 'missing'}: does not exist" in err and len(err.strip().splitlines()) == 1


def test_layer_by_step_heatmap_puts_each_logged_value_in_its_row_and_step(sample_run):
    panel = [p for p in get_template("answer_confidence").panels if p.kind == "heatmap"][0]
    fig = panel_figure(panel, RunData.load(sample_run))
    logged = {}
    for row in read_metrics(sample_run):
        for key, value in row.items():
            if key.startswith("probe/logit_lens_gold_margin/layer"):
                logged[(int(key.rsplit("layer", 1)[1]), row["step"])] = value
    steps = sorted({s for _, s in logged})
    assert list(fig.data[0].x) == steps and list(fig.data[0].y) == [f"layer {i}" for i in range(4)]
    for (layer, step), value in logged.items():
        assert fig.data[0].z[layer][steps.index(step)] == pytest.approx(value)
    assert not fig.frames  # one grid, no slider
