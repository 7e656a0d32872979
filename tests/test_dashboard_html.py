"""Offline HTML dashboards: figures hold the logged numbers; the page renders every panel in headless
Chromium with no console errors (Debian `chromium`, installed by scripts/test through scripts/ensure-chromium).
The screenshot is kept under the test's tmp dir and copied to artifacts/dashboards/ for the demo and for
people to look at."""

import html
import json
import os
import re
import shutil
from pathlib import Path

import pytest

from aquainterp.cli.main import main
from aquainterp.logger import Logger, read_metrics
from dashboards.browser import find_chromium, inspect_page
from dashboards.html import (
    NoData,
    RunData,
    headline,
    metric_unit,
    panel_count,
    panel_figure,
    render_html,
    write_html,
)
from dashboards.sample_run import record_sample_run
from dashboards.template import Panel, all_templates, get_template, template_names

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "artifacts" / "dashboards"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# What the slider's first step does (method "animate", args [["<step>"], ...]), run in the page; then where each
# plot sits against its card and the first 1400 x 900 view.
SLIDER_JS = """(async () => {
  const gd = document.querySelector("[data-kind='histogram'] .js-plotly-plot");  // a slider over steps
  const before = Array.from(gd.data[0].x);
  const step = gd.layout.sliders[0].steps[0];
  await Plotly.animate(gd, step.args[0], step.args[1]);
  const overflow = [...document.querySelectorAll('.aq-panel')].filter(p => {
    const card = p.getBoundingClientRect(), svg = p.querySelector('.main-svg').getBoundingClientRect();
    return svg.right > card.right + 1 || svg.left < card.left - 1;
  }).map(p => p.dataset.panel);
  const first = document.querySelector('.aq-panel').getBoundingClientRect();
  return {before, after: Array.from(gd.data[0].x), frames: gd._transitionData._frames.length, overflow,
          headline_bottom: document.querySelector('.headline').getBoundingClientRect().bottom,
          first_panel: document.querySelector('.aq-panel').dataset.panel, first_panel_top: first.top};
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


def test_layer_by_head_heatmap_shows_first_last_and_their_difference(tmp_path):
    with Logger(tmp_path, mode="disabled") as log:
        for step in (0, 10, 20):
            log.log({f"attn/entropy/layer{layer}/head{head}": step + 10 * layer + head
                     for layer in range(3) for head in range(2)}, step=step)
    panel = Panel(kind="heatmap", title="h", regex=r"attn/entropy/layer(?P<layer>\d+)/head(?P<head>\d+)", x="rl/step")
    fig = panel_figure(panel, RunData.load(tmp_path))
    first, last, diff = ([list(r) for r in t.z] for t in fig.data)
    assert first == [[0, 1], [10, 11], [20, 21]]  # rows = layers, cols = heads
    assert last == [[20, 21], [30, 31], [40, 41]]
    assert diff == [[20, 20], [20, 20], [20, 20]]
    assert list(fig.data[0].y) == ["layer 0", "layer 1", "layer 2"] and list(fig.data[0].x) == ["head 0", "head 1"]
    assert [a.text for a in fig.layout.annotations] == ["first: step 0", "last: step 20", "last − first"]
    assert (fig.layout.coloraxis.cmin, fig.layout.coloraxis.cmax) == (0, 41)  # first and last on one scale
    assert fig.layout.coloraxis.colorbar.title.text == "entropy (nats)"
    assert fig.layout.coloraxis2.colorbar.title.text == "Δ nats"
    assert not fig.frames and not fig.layout.sliders


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


def test_a_panel_without_data_is_left_out_with_the_reason_and_the_flag_that_logs_it(tmp_path):
    with Logger(tmp_path, mode="disabled") as log:
        log.log({"rl/acc": 0.5}, step=0)
    data = RunData.load(tmp_path)
    with pytest.raises(NoData, match="nothing logged for rl/kl_letter_mean"):
        panel_figure(Panel(kind="line", title="kl", metrics=["rl/kl_letter_mean"], x="rl/step"), data)
    text = render_html(all_templates(), data)
    assert text.count("<div class='aq-panel") == 1  # the one panel with data: rl/acc
    kl = text.split("data-template='kl_telemetry'>")[1].split("</section>")[0]
    assert "js-plotly-plot" not in kl and "Plotly.newPlot" not in kl
    assert "KL telemetry: nothing to draw; every panel not drawn (6 panels): the run logged nothing under " \
           "rl/kl_letter_mean, rl/rollout_kl_letter_mean, rl/kl_letter_std, rl/kl_letter, rl/kl_sequence_mean" in kl
    assert "Logged by training.rl --probes ...,kl; training.rl --probes ...,kl (with --probe-rollouts &gt; 0)." in kl
    drift = text.split("data-template='circuit_drift'>")[1].split("</section>")[0]
    assert "patch/denoise/z/layer*" in drift and "aquainterp patch --checkpoint-series" in drift


def plots(text: str) -> dict[str, tuple[list, dict]]:
    """Every Plotly.newPlot call in a page: div id -> (data, layout), read back from the page's JSON."""
    out, decoder = {}, json.JSONDecoder()
    for m in re.finditer(r'Plotly\.newPlot\(\s*"([^"]+)",\s*', text):
        data, end = decoder.raw_decode(text, m.end())
        layout, _ = decoder.raw_decode(text, end + len(re.match(r"\s*,\s*", text[end:]).group()))
        out[m.group(1)] = (data, layout)
    return out


# What an axis may be measured in (the part of its title in parentheses), written out here, not imported.
AXIS_UNITS = {"fraction", "fraction of problems", "reward per completion", "tokens", "logits", "nats", "steps",
              "fraction of the logit-diff gap", "completions", "problems", "index", "letter", "token",
              "position:token", "L2 norm"}


def axis_problems(div: str, data: list, layout: dict) -> list[str]:
    """Axes that show tick labels without a unit; colour scales without one."""
    bad = []
    for key, axis in layout.items():
        if not re.fullmatch(r"[xy]axis\d*", key) or axis.get("visible") is False or axis.get("showticklabels") is False:
            continue
        if any(t.get("type") == "table" for t in data):
            continue
        title = (axis.get("title") or {}).get("text") or ""
        units = [u.strip() for u in re.findall(r"\(([^()]+)\)", title)]
        if not units or not all(u in AXIS_UNITS for u in units):
            bad.append(f"{div} {key}: {title!r}")
    for key, scale in layout.items():
        if key.startswith("coloraxis"):
            title = scale.get("colorbar", {}).get("title", {}).get("text", "")
            if not any(u in title for u in AXIS_UNITS):
                bad.append(f"{div} {key} colour bar: {title!r}")
    return bad


def test_report_answers_first_in_the_researchers_order_with_units_and_no_empty_panel(sample_run, tmp_path):
    """The rendered page, read as a reader would: the headline before any plot, then the templates in the
    order of the questions, every plotted panel holds data, every axis and colour scale names its unit."""
    out = write_html(all_templates(), sample_run, tmp_path / "report.html")
    text = out.read_text()
    body = text.split("<body>", 1)[1]
    assert body.index("class='headline'") < body.index("class='aq-panel")
    headline = body.split("class='headline'>", 1)[1].split("</div>", 1)[0]
    assert "Held-out synthetic accuracy, RL step 0 → 29: greedy" in headline
    assert "Probe that moved most" in headline and "Logit lens, probe step 29: the answer forms at layer" in headline
    order = re.findall(r"data-template='([a-z_]+)'", body)
    expected = ["rl_overview", "answer_confidence", "kl_telemetry", "mode_collapse", "attention", "logit_lens",
                "reasoning_faithfulness", "circuit_drift"]
    assert order == [n for n in expected if n in template_names()]
    questions = re.findall(r"<h2 class='question' id='q\d+'>([^<]+)</h2>", body)
    assert questions == [q for q in ("Is RL working?", "What changed in the decision?", "Where in the model?",
                                     "How is the reasoning used?", "Drift across checkpoints")
                         if q != "How is the reasoning used?" or "reasoning_faithfulness" in order]
    assert body.index("Held-out evaluation accuracy") < body.index("Accuracy of sampled completions")
    figures = plots(text)
    drawn = panel_count([t for t in all_templates() if t.name != "circuit_drift"])  # drift: nothing logged
    assert len(figures) == text.count("<div class='aq-panel") == drawn
    for div, (data, _layout) in figures.items():
        assert data, div
        for trace in data:
            filled = [trace.get(k) for k in ("x", "y", "z") if trace.get(k) is not None]
            if trace["type"] == "table":
                filled = trace["cells"]["values"]
            assert filled and all(len(v) for v in filled), (div, trace.get("name"))
    problems = [p for div, (data, layout) in figures.items() for p in axis_problems(div, data, layout)]
    assert problems == []
    assert "(6 panels): the run logged nothing under patch/clean_logit_diff, patch/corrupted_logit_diff, " \
           "patch/denoise/z/layer*" in text


def test_units_steps_and_pass_at_k_on_a_short_run(tmp_path):
    """A 4-step run gets one tick per step (no 0.5 steps); pass@k says its k from the run's checkpoint
    config; every metric the shipped templates name has a unit."""
    with Logger(tmp_path, mode="disabled") as log:
        for step in range(4):
            log.log({"rl/acc": 0.2 + 0.1 * step, "rl/pass@k": 0.5 + 0.1 * step}, step=step)
    (tmp_path / "checkpoints" / "step_000004").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step_000004" / "meta.json").write_text(
        json.dumps({"step": 4, "config": {"pass_k": 4, "eval_temperature": 1.0}}))
    data = RunData.load(tmp_path)
    line = panel_figure(Panel(kind="line", title="acc", metrics=["rl/acc"], x="rl/step"), data)
    assert (line.layout.xaxis.dtick, line.layout.xaxis.tickformat) == (1, "d")
    assert line.layout.xaxis.title.text == "RL step (steps)" and line.layout.yaxis.title.text == "accuracy (fraction)"
    text = render_html([get_template("rl_overview")], data)
    assert "pass@4 <span class='kind'>" in text and '"name":"rl\\u002fpass@4"' in text
    assert "pass@4: a held-out problem counts when at least one of 4 samples at temperature 1 states the gold" in text
    for template in all_templates():
        for panel in (p for p in template.panels if p.kind not in ("table", "image")):  # no axes of their own
            for name in panel.metrics or [panel.regex]:
                assert metric_unit(name.replace("\\d+", "0")) is not None, (template.name, name)


def test_categorical_accuracy_below_chance_next_to_rising_greedy_gets_its_explanation(tmp_path):
    def report(categorical):
        run = tmp_path / str(categorical)
        with Logger(run, mode="disabled") as log:
            for step, (greedy, cat) in enumerate(zip((0.4, 0.7), categorical)):
                log.log({"eval/synthetic_acc": greedy, "eval/synthetic_categorical_acc": cat}, step=step * 10)
        return render_html([get_template("rl_overview")], RunData.load(run))

    with Logger(tmp_path / "sft", mode="disabled") as log:  # an SFT run logs categorical accuracy alone
        for step, cat in ((0, 0.2), (50, 0.45)):
            log.log({"eval/synthetic_categorical_acc": cat}, step=step)
    assert headline(RunData.load(tmp_path / "sft")) == [
        "Held-out categorical accuracy (eval/synthetic_categorical_acc), step 0 → 50: 0.200 → 0.450; no generative "
        "evaluation logged."]
    note = "Categorical accuracy reads the letter logits right after \"Answer:\" in a prompt without rationale"
    assert html.escape(note) in report((0.22, 0.15))
    assert html.escape(note) not in report((0.22, 0.25))  # above chance: nothing to explain


def test_html_report_renders_every_panel_in_chromium(sample_run, chromium, tmp_path):
    templates = all_templates()
    out = write_html(templates, sample_run, tmp_path / "report.html")
    text = out.read_text()
    assert "https://" not in text.split("<body>")[1][:2000]  # nothing fetched from the network
    drawn = panel_count([t for t in templates if t.name != "circuit_drift"])  # the sample logs no patching
    assert text.count("<div class='aq-panel") == drawn
    report = inspect_page(out, tmp_path / "report.png", evaluate=SLIDER_JS, first_view=tmp_path / "first.png")
    assert report.console_errors == []
    assert report.panels == report.rendered == report.plots == drawn
    # the histogram's slider step (Plotly.animate to a frame) really shows that step's values
    hist = panel_figure(panel_for("answer_confidence", "rl/letter_margin"), RunData.load(sample_run))
    assert report.value["frames"] == len(hist.frames) > 1
    assert report.value["before"] == list(hist.data[0].x) and report.value["after"] == list(hist.frames[0].data[0].x)
    assert report.value["overflow"] == []  # every plot inside its card
    # the first view: the headline, then the RL overview's first panel (held-out accuracy) starts on screen
    assert report.value["headline_bottom"] < report.value["first_panel_top"] < 900 - 200
    assert report.value["first_panel"] == "t0-s0-p0"
    for png in (report.screenshot.read_bytes(), report.first_view.read_bytes()):
        assert png.startswith(PNG_MAGIC) and len(png) > 50_000
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shutil.copy(out, ARTIFACTS / "report.html")
    shutil.copy(report.screenshot, ARTIFACTS / "report.png")
    shutil.copy(report.first_view, ARTIFACTS / "report_first_view.png")


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
    panel = [p for p in get_template("logit_lens").panels if p.kind == "heatmap"][0]
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
