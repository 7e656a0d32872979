"""Offline dashboards: a run's metrics drawn as one self-contained plotly HTML page that answers first.

The page inlines plotly.js once. It opens with a headline (held-out greedy and sampled accuracy first →
last, the probe that moved most, the logit-lens layer where the answer forms), then the templates grouped
by the question a researcher asks, in REPORT_ORDER (dashboards.template): is RL working → what changed in
the decision → where in the model → how the reasoning is used → drift. The data comes from the run's
metrics.jsonl (written by aquainterp.logger) or, when there is none, from the offline W&B run file under
run_dir/wandb (dashboards.wandb_run).

Nothing is drawn empty: a panel, section or template the run logged nothing for is left out, and one line
says why and which command or flag logs it. Every axis says its unit (metric_unit). Layer × head heatmaps
show the first step, the last step and last − first side by side; histograms keep a step slider.
"""

from __future__ import annotations

import html
import json
import os
import re
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

import plotly.graph_objects as go
import plotly.io as pio
import plotly.offline
from plotly.subplots import make_subplots

from aquainterp.cli.rundir import inside
from aquainterp.logger import METRICS_FILE, read_metrics
from dashboards.safe_regex import safe_compile
from dashboards.template import Panel, Template, report_groups
from dashboards.wandb_run import history_as_metrics

PLOT_HEIGHT = 380
CHANCE = 0.2  # five options
GRID_WIDTH = 1300  # a full-width card's plot at a 1400 px window

# What a metric is measured in, by name: (regex searched in the name, quantity, unit); the first match wins.
# Every metric a shipped template draws must match one (tests/test_dashboard_html.py checks).
UNITS = (
    (r"pass@k$", "pass@k", "fraction of problems"),
    (r"(_acc|/acc)$|_acc/", "accuracy", "fraction"),
    (r"reward", "reward", "reward per completion"),
    (r"completion_len", "length", "tokens"),
    (r"logit_diff|margin", "margin", "logits"),
    (r"kl_", "KL", "nats"),
    (r"entropy", "entropy", "nats"),
    (r"^patch/(denoise|noise)/", "restored", "fraction of the logit-diff gap"),
    (r"mass", "attention mass", "fraction"),
    (r"counts/", "count", "completions"),
    (r"(^|/|_)n$", "count", "problems"),
    (r"agreement|_frac$|consistency|match|prior/|_aoc$|baseline", "share", "fraction"),
    (r"(^|/)loss$", "loss", "nats"),
    (r"(^|/)lr$", "learning rate", "lr"),
    (r"grad_norm$", "gradient norm", "L2 norm"),
)
X_TITLES = {"rl/step": "RL step (steps)", "eval/step": "RL step of the evaluation (steps)",
            "patch/step": "checkpoint step (steps)", "Step": "W&B step (steps)"}

# Which command or flag logs a metric family: the line a left-out panel gets (first prefix that matches).
FILL = (
    ("patch/", "aquainterp patch --checkpoint-series RUN_DIR/checkpoints --every K --out DRIFT_DIR (then "
               "report DRIFT_DIR), or training.rl --patch-every N"),
    ("faith/", "training.rl --probes ...,faith"),
    ("probe/logit_lens", "training.rl --probes ...,logit_lens"),
    ("attn/patterns", "training.rl with any --probes (the final probe run draws it)"),
    ("attn/entropy", "training.rl --probes ...,entropy"),
    ("attn/", "training.rl --probes ...,option_mass"),
    ("rl/kl_", "training.rl --probes ...,kl"),
    ("rl/probe_letter_pred_counts", "training.rl --probes ...,counts"),
    ("rl/rollout_kl", "training.rl --probes ...,kl (with --probe-rollouts > 0)"),
    ("rl/rollout_", "training.rl --probes ...,margin (with --probe-rollouts > 0)"),
    ("rl/hardest_questions", "training.rl --probes ...,margin (the final probe run)"),
    ("rl/letter_pred_counts", "training.rl (every RL step)"),
    ("rl/letter", "training.rl --probes ...,margin"),
    ("rl/probe_", "training.rl with any --probes"),
    ("rl/samples", "training.rl --table-every N"),
    ("eval/", "training.rl (held-out evaluation before step 0, every --eval-every steps and at the end)"),
    ("rl/", "training.rl (every RL step)"),
)

# Probe summaries the headline compares first → last (name, what it is); letter KL is left out: it is 0 at
# the first probe step by construction (the reference is the policy there), so it always "moves most".
HEADLINE_PROBES = (
    ("rl/letter_gold_margin_mean", "gold letter margin at the answer step"),
    ("rl/letter_margin_mean", "letter margin (top − runner-up)"),
    ("attn/option_mass_mean", "attention mass on the options"),
    ("attn/completion_mass_mean", "attention mass on the completion"),
    ("attn/entropy_mean", "attention entropy"),
    ("rl/probe_decision_agreement", "top letter logit = letter written"),
    ("faith/early_answer_aoc", "early-answer area over the curve"),
    ("faith/mistake_follow_frac", "answers that follow an inserted mistake"),
)
LENS = re.compile(r"probe/logit_lens_gold_margin/layer(\d+)")


def metric_unit(name: str) -> tuple[str, str] | None:
    """(quantity, unit) of a metric name, or None when UNITS has no rule for it."""
    for pattern, quantity, unit in UNITS:
        if re.search(pattern, name):
            return quantity, unit
    return None


def axis_title(names: Iterable[str]) -> str:
    """'accuracy (fraction)' for one kind of metric; 'margin (logits) · share (fraction)' for a mix."""
    seen: list[tuple[str, str]] = []
    for name in names:
        qu = metric_unit(name) or ("value", "unit unknown")
        if qu not in seen:
            seen.append(qu)
    if len({u for _, u in seen}) == 1:  # one unit: 'accuracy / share (fraction)'
        return " / ".join(q for q, _ in seen) + f" ({seen[0][1]})"
    return " · ".join(f"{q} ({u})" for q, u in seen) or "value (unit unknown)"


def fill_hint(names: Iterable[str]) -> str:
    hints = []
    for name in names:
        hint = next((how for prefix, how in FILL if name.startswith(prefix)), None)
        if hint and hint not in hints:
            hints.append(hint)
    return "; ".join(hints)


class NoData(Exception):
    """A panel with nothing to draw; the message says why (the page leaves the panel out and says so)."""


class RunData:
    """A run's logged values by name: scalar series and (step, object) lists for media, and the run's
    config when a checkpoint of the run records one (e.g. k of pass@k)."""

    def __init__(self, rows: Iterable[dict], base_dir: Path | None = None, source: str = "",
                 config: dict | None = None):
        self.scalars: dict[str, list[tuple[int, float]]] = defaultdict(list)
        self.objects: dict[str, list[tuple[int, dict]]] = defaultdict(list)
        self.base_dir = base_dir
        self.source = source
        self.config = config or {}
        for row in rows:
            step = row["step"]
            for name, value in row.items():
                if name == "step":
                    continue
                if isinstance(value, dict):
                    self.objects[name].append((step, value))
                elif isinstance(value, int | float) and not isinstance(value, bool):
                    self.scalars[name].append((step, float(value)))

    @classmethod
    def load(cls, run_dir: str | Path, source: str = "auto") -> RunData:
        """metrics.jsonl of run_dir, or its offline W&B run (source 'auto', 'jsonl' or 'wandb')."""
        run_dir = Path(run_dir)
        if not run_dir.exists():
            raise FileNotFoundError(f"run directory {run_dir} does not exist")
        if source not in ("auto", "jsonl", "wandb"):
            raise ValueError(f"source must be auto, jsonl or wandb, got {source!r}")
        config = run_config(run_dir)
        if source == "jsonl" or (source == "auto" and (run_dir / METRICS_FILE).is_file()):
            return cls(read_metrics(run_dir), run_dir, str(run_dir / METRICS_FILE), config)
        return cls(history_as_metrics(run_dir), run_dir, f"W&B offline run in {run_dir}", config)

    def series(self, name: str) -> list[tuple[int, float]]:
        return sorted(self.scalars.get(name, []))

    def first_last(self, name: str) -> tuple[tuple[int, float], tuple[int, float]] | None:
        points = self.series(name)
        return (points[0], points[-1]) if points else None


def run_config(run_dir: Path) -> dict:
    """The stage config its newest checkpoint records (meta.json "config"), {} when there is none."""
    metas = sorted((run_dir / "checkpoints").glob("step_*/meta.json"))
    for meta in reversed(metas):
        try:
            config = json.loads(meta.read_text(encoding="utf-8")).get("config")
        except (OSError, ValueError):
            continue
        if isinstance(config, dict):
            return config
    return {}


def _sort_key(label: str):
    return (0, int(label), "") if label.isdigit() else (1, 0, label)


def _natural(name: str):
    return [_sort_key(p) for p in re.split(r"(\d+)", name)]


def _what(panel: Panel) -> str:
    return f"regex {panel.regex}" if panel.regex else ", ".join(panel.metrics)


def pass_k(data: RunData) -> int | None:
    k = data.config.get("pass_k")
    return k if isinstance(k, int) else None


def _label(name: str, data: RunData) -> str:
    """A trace's legend name: pass@k says its k when the run recorded it."""
    k = pass_k(data)
    return name.replace("pass@k", f"pass@{k}") if k is not None else name


def _slider(fig: go.Figure, steps: list[int], x_label: str) -> go.Figure:
    """A slider over frames named by step; the figure opens at the last step."""
    fig.update_layout(sliders=[{
        "active": len(steps) - 1,
        "currentvalue": {"prefix": f"{x_label} = "},
        "pad": {"t": 50},
        "steps": [{"label": str(s), "method": "animate",
                   "args": [[str(s)], {"mode": "immediate", "frame": {"duration": 0, "redraw": True},
                                       "transition": {"duration": 0}}]} for s in steps],
    }])
    return fig


def _integer_steps(fig: go.Figure, steps: Iterable[int], **axis) -> None:
    """Step axes show whole steps: every step on short runs, integer ticks otherwise."""
    steps = list(steps)
    span = max(steps) - min(steps) if steps else 0
    if span <= 12:
        fig.update_xaxes(tickmode="linear", tick0=min(steps, default=0), dtick=1, tickformat="d", **axis)
    else:
        fig.update_xaxes(tickformat="d", **axis)


def line_figure(panel: Panel, data: RunData) -> go.Figure:
    names = panel.matches(data.scalars)
    if not names:
        raise NoData(f"nothing logged for {_what(panel)}")
    fig = go.Figure()
    steps: set[int] = set()
    # several series: the legend names what differs, its title the common prefix ("attn/entropy/" + "layer0/head1")
    prefix = os.path.commonprefix(names).rpartition("/")[0] + "/" if len(names) > 1 else ""
    if prefix.strip("/"):
        fig.update_layout(legend_title_text=prefix)
    for name in sorted(names, key=_natural):
        points = data.series(name)
        steps.update(s for s, _ in points)
        fig.add_trace(go.Scatter(x=[s for s, _ in points], y=[v for _, v in points],
                                 name=_label(name[len(prefix):] if prefix.strip("/") else name, data),
                                 mode="lines+markers" if len(points) < 50 else "lines"))
    fig.update_xaxes(title_text=X_TITLES.get(panel.x, f"{panel.x} (steps)"))
    _integer_steps(fig, steps)
    fig.update_yaxes(title_text=axis_title(names))
    if any(re.search(r"(_acc|/acc|pass@k)$", n) for n in names):
        fig.add_hline(y=CHANCE, line={"dash": "dot", "color": "#999", "width": 1},
                      annotation_text="chance (1 in 5)", annotation_font_size=10, annotation_position="bottom right")
    return fig


def bar_figure(panel: Panel, data: RunData) -> go.Figure:
    names = [n for n in panel.metrics if data.scalars.get(n)]
    if not names:
        raise NoData(f"nothing logged for {_what(panel)}")
    latest = {n: max(data.scalars[n]) for n in names}  # (step, value) with the largest step
    step = max(s for s, _ in latest.values())
    # one bar series per family: "rl/letter_pred_counts/A".."E" -> A..E; two families -> grouped bars
    families = list(dict.fromkeys(n.rpartition("/")[0] for n in names))
    fig = go.Figure()
    for family in families:
        members = [n for n in names if n.rpartition("/")[0] == family]
        fig.add_trace(go.Bar(x=[n.rpartition("/")[2] for n in members], y=[latest[n][1] for n in members],
                             text=[f"{latest[n][1]:.3g}" for n in members], name=family))
    fig.update_layout(title_text=f"latest, step {step}", title_font_size=12, barmode="group",
                      showlegend=len(families) > 1)
    letters = all(re.fullmatch(r"[A-E]", n.rpartition("/")[2]) for n in names)
    fig.update_xaxes(title_text="letter (letter)" if letters else "metric (name)")
    fig.update_yaxes(title_text=axis_title(names))
    return fig


def heatmap_figure(panel: Panel, data: RunData) -> go.Figure:
    """Layer × head: the first logged step, the last, and last − first (one grid when a single step)."""
    pattern = safe_compile(panel.regex)  # validated template syntax; over-long names never match
    if len(pattern.groupindex) == 1:
        return _rows_by_step_heatmap(panel, pattern, data)
    row_name, col_name = sorted(pattern.groupindex, key=pattern.groupindex.get)
    cells: dict[int, dict[tuple[str, str], float]] = defaultdict(dict)
    rows, cols, names = set(), set(), []
    for name, points in data.scalars.items():
        m = pattern.fullmatch(name)
        if not m:
            continue
        names.append(name)
        r, c = m.group(row_name), m.group(col_name)
        rows.add(r)
        cols.add(c)
        for step, value in points:
            cells[step][(r, c)] = value
    if not cells:
        raise NoData(f"nothing logged for {_what(panel)}")
    rows, cols = sorted(rows, key=_sort_key), sorted(cols, key=_sort_key)
    steps = sorted(cells)
    quantity, unit = metric_unit(names[0]) or ("value", "unit unknown")
    x, y = [f"{col_name} {c}" for c in cols], [f"{row_name} {r}" for r in rows]

    def grid(step):
        return [[cells[step].get((r, c)) for c in cols] for r in rows]

    first, last = steps[0], steps[-1]
    values = [v for s in (first, last) for v in cells[s].values()]
    scale = {"coloraxis": "coloraxis"}
    if first == last:
        fig = go.Figure(go.Heatmap(z=grid(last), x=x, y=y, hoverongaps=False, **scale))
        fig.update_layout(title_text=f"step {last} (the only logged step)", title_font_size=12)
        n_axes = 1
    else:
        diff = [[None if a is None or b is None else b - a for a, b in zip(ra, rb)]
                for ra, rb in zip(grid(first), grid(last))]
        fig = make_subplots(rows=1, cols=3, horizontal_spacing=0.11, shared_yaxes=True,
                            subplot_titles=[f"first: step {first}", f"last: step {last}", "last − first"])
        fig.add_trace(go.Heatmap(z=grid(first), x=x, y=y, hoverongaps=False, **scale), row=1, col=1)
        fig.add_trace(go.Heatmap(z=grid(last), x=x, y=y, hoverongaps=False, **scale), row=1, col=2)
        fig.add_trace(go.Heatmap(z=diff, x=x, y=y, hoverongaps=False, coloraxis="coloraxis2"), row=1, col=3)
        bound = max((abs(v) for r in diff for v in r if v is not None), default=0.0) or 1.0
        fig.update_layout(coloraxis2={"colorscale": "RdBu_r", "cmin": -bound, "cmax": bound,
                                      "colorbar": {"title": {"text": f"Δ {unit}", "side": "right"}, "x": 1.0,
                                                   "thickness": 10, "len": 0.9}})
        for annotation in fig.layout.annotations:
            annotation.font = {"size": 11}
        n_axes = 3
    fig.update_layout(coloraxis={"colorscale": "Viridis", "cmin": min(values), "cmax": max(values),
                                 "colorbar": {"title": {"text": f"{quantity} ({unit})", "side": "right"},
                                              "x": 0.62 if n_axes == 3 else 1.0, "thickness": 10, "len": 0.9}})
    fig.update_yaxes(autorange="reversed", title_text=f"{row_name} (index)", row=1, col=1)
    for i in range(1, n_axes + 1):
        fig.update_xaxes(title_text=f"{col_name} (index)", row=1, col=i)
    return fig


def _rows_by_step_heatmap(panel: Panel, pattern: re.Pattern, data: RunData) -> go.Figure:
    """One named group: its values are the rows, the logged steps the columns (e.g. layer x step)."""
    (row_name,) = pattern.groupindex
    cells: dict[str, dict[int, float]] = defaultdict(dict)
    names = []
    for name, points in data.scalars.items():
        m = pattern.fullmatch(name)
        if m:
            names.append(name)
            cells[m.group(row_name)].update(dict(points))
    if not cells:
        raise NoData(f"nothing logged for {_what(panel)}")
    rows = sorted(cells, key=_sort_key)
    steps = sorted({s for row in cells.values() for s in row})
    z = [[cells[r].get(s) for s in steps] for r in rows]
    values = [v for row in z for v in row if v is not None]
    # a signed quantity (a margin) diverges around 0; a one-signed one (an accuracy) gets a sequential scale
    signed = {"colorscale": "RdBu", "zmid": 0} if min(values) < 0 < max(values) else {"colorscale": "Viridis"}
    fig = go.Figure(go.Heatmap(z=z, x=steps, y=[f"{row_name} {r}" for r in rows], **signed, hoverongaps=False,
                               colorbar={"title": {"text": axis_title(names[:1]), "side": "right"}}))
    fig.update_yaxes(autorange="reversed", title_text=f"{row_name} (index)")
    fig.update_xaxes(title_text=X_TITLES.get(panel.x, f"{panel.x} (steps)"), type="category")
    return fig


def histogram_figure(panel: Panel, data: RunData) -> go.Figure:
    name = panel.metrics[0]
    entries = sorted(((s, o) for s, o in data.objects.get(name, []) if o.get("_type") == "histogram"),
                     key=lambda e: e[0])
    if not entries:
        raise NoData(f"no histogram logged for {_what(panel)}")

    def trace(obj):
        if "values" in obj:  # raw values from metrics.jsonl
            return go.Histogram(x=obj["values"], nbinsx=30, name=name)
        bins, counts = obj["bins"], obj["counts"]  # W&B's binned form: len(bins) == len(counts) + 1
        centers = [(a + b) / 2 for a, b in zip(bins[:-1], bins[1:])]
        return go.Bar(x=centers, y=counts, name=name)

    steps = [s for s, _ in entries]
    fig = go.Figure(data=[trace(entries[-1][1])],
                    frames=[go.Frame(data=[trace(o)], name=str(s)) for s, o in entries])
    fig.update_xaxes(title_text=f"{name}: {axis_title([name])}")
    fig.update_yaxes(title_text="count (completions)" if "sequence" in name else "count (problems)")
    return _slider(fig, steps, panel.x)


def table_figure(panel: Panel, data: RunData) -> go.Figure:
    entries = [(s, o) for s, o in data.objects.get(panel.metrics[0], []) if o.get("_type") == "table"]
    if not entries:
        raise NoData(f"no table logged for {_what(panel)}")
    step, table = max(entries, key=lambda e: e[0])
    columns = table["columns"]
    cells = [[row[i] for row in table["rows"]] for i in range(len(columns))]
    fig = go.Figure(go.Table(header={"values": [f"<b>{html.escape(c)}</b>" for c in columns]},
                             cells={"values": cells, "align": "left"}))
    fig.update_layout(title_text=f"latest, step {step}", title_font_size=12)
    return fig


def image_figure(panel: Panel, data: RunData) -> go.Figure:
    entries = [(s, o) for s, o in data.objects.get(panel.metrics[0], []) if o.get("_type") == "plotly"]
    if not entries:
        raise NoData(f"no figure logged for {_what(panel)}")
    step, obj = max(entries, key=lambda e: e[0])
    path = Path(str(obj.get("path", "")))
    if data.base_dir is None:
        raise NoData("figure files are read only from a run directory")
    if not inside(data.base_dir, path):  # a shared report must not embed files from outside the run
        raise NoData(f"figure path {str(path)!r} points outside the run directory; not embedded")
    if not path.is_absolute():
        path = data.base_dir / path
    if not path.is_file():
        raise NoData(f"figure file {path} is missing")
    fig = fit_grid(pio.from_json(path.read_text(encoding="utf-8")))
    fig.update_layout(title_text=f"step {step}", title_font_size=12, title_y=0.995, title_yanchor="top")
    return fig


def fit_grid(fig: go.Figure) -> go.Figure:
    """A logged grid of heatmaps (attention patterns: a row per layer, a column per head) redrawn to fit its
    card: no fixed width, room between the subplots for their titles, the token labels on the outer axes."""
    traces = [t for t in fig.data if t.type == "heatmap"]
    if len(traces) < 2 or len(traces) != len(fig.data):
        fig.layout.width = None
        return fig
    layout = fig.layout
    x_domains = sorted({tuple(layout[_axis_key(t.xaxis, "x")].domain) for t in traces})
    y_domains = sorted({tuple(layout[_axis_key(t.yaxis, "y")].domain) for t in traces}, reverse=True)
    n_rows, n_cols = len(y_domains), len(x_domains)
    titles = {(round(a.x, 3), round(a.y, 3)): a.text for a in layout.annotations or ()}
    ordered_titles = []
    for yd in y_domains:
        for xd in x_domains:
            centre = (round((xd[0] + xd[1]) / 2, 3), round(yd[1], 3))
            ordered_titles.append(titles.get(centre, ""))
    out = make_subplots(rows=n_rows, cols=n_cols, horizontal_spacing=0.04, vertical_spacing=0.12 / max(n_rows, 1) + 0.04,
                        subplot_titles=ordered_titles, shared_xaxes=True, shared_yaxes=True)
    for t in traces:
        row = y_domains.index(tuple(layout[_axis_key(t.yaxis, "y")].domain)) + 1
        col = x_domains.index(tuple(layout[_axis_key(t.xaxis, "x")].domain)) + 1
        out.add_trace(t.update(xaxis=None, yaxis=None), row=row, col=col)
    tick = {"tickfont": {"size": 8}, "type": "category"}
    out.update_xaxes(showticklabels=False, **tick)
    out.update_yaxes(showticklabels=False, autorange="reversed", **tick)
    for col in range(1, n_cols + 1):
        out.update_xaxes(showticklabels=True, tickangle=-90, title_text="key token (position:token)",
                         title_font_size=10, row=n_rows, col=col)
    for row in range(1, n_rows + 1):
        out.update_yaxes(showticklabels=True, title_text="query (token)", title_font_size=10,
                         row=row, col=1)
    for annotation in out.layout.annotations:
        annotation.font = {"size": 11}
    colorbar = {"title": {"text": "attention (fraction)", "side": "right"}, "thickness": 10}
    # square cells of at most 240 px, the whole grid at most GRID_WIDTH wide (a wide card holds it)
    cell = min(240, (GRID_WIDTH - 200) // n_cols)
    out.update_layout(coloraxis=dict(layout.coloraxis.to_plotly_json(), colorbar=colorbar)
                      if layout.coloraxis else None,
                      width=cell * n_cols + 200, height=int(cell * 1.15) * n_rows + 190)
    return out


def _axis_key(ref: str | None, letter: str) -> str:
    """'x2' -> 'xaxis2', None or 'x' -> 'xaxis'."""
    ref = ref or letter
    return f"{letter}axis{ref[1:]}"


FIGURES = {"line": line_figure, "bar": bar_figure, "heatmap": heatmap_figure,
           "histogram": histogram_figure, "table": table_figure, "image": image_figure}


def panel_figure(panel: Panel, data: RunData) -> go.Figure:
    """The panel's figure; raises NoData (with the reason) when the run logged nothing it can draw."""
    fig = FIGURES[panel.kind](panel, data)
    height = fig.layout.height or PLOT_HEIGHT
    fig.update_layout(height=max(height, PLOT_HEIGHT), margin={"l": 60, "r": 20, "t": 50, "b": 50},
                      legend={"font": {"size": 10}}, template="plotly_white")
    return fig


def panel_title(panel: Panel, data: RunData) -> str:
    k = pass_k(data)
    return panel.title.replace("pass@k", f"pass@{k}") if k is not None else panel.title


def panel_note(panel: Panel, data: RunData) -> str | None:
    """One line under a panel that would otherwise mislead: pass@k's k, categorical accuracy below chance
    while greedy accuracy rises (what categorical accuracy reads, aquainterp/evaluate.py)."""
    names = panel.matches(data.scalars)
    if "rl/pass@k" in names:
        k = pass_k(data)
        t = data.config.get("eval_temperature")
        return (f"pass@{k}: a held-out problem counts when at least one of {k} samples"
                + (f" at temperature {t:g}" if isinstance(t, int | float) else "") + " states the gold letter."
                if k is not None else "pass@k: k is the run's --pass-k (no checkpoint of this run records it).")
    categorical = [n for n in names if n.endswith("_categorical_acc")]
    for cat in categorical:
        greedy = cat.replace("_categorical_acc", "_acc")
        fl = data.first_last(greedy)
        if fl and fl[1][1] > fl[0][1] and min(v for _, v in data.series(cat)) < CHANCE:
            return ("Categorical accuracy reads the letter logits right after \"Answer:\" in a prompt without "
                    "rationale (evaluate.categorical_eval); a policy trained to reason first never answers there, "
                    "so it can sit below chance while the letter its own reasoning states (greedy, "
                    f"{greedy}) gets more right.")
    return None


# ------------------------------------------------------------------------------------------- headline


def headline(data: RunData) -> list[str]:
    """The report's first lines, plain text: held-out accuracy first → last, the probe that moved most
    (largest change relative to its size), and the logit-lens layer where the answer forms."""
    lines = []
    tasks = sorted({m.group(1) for n in data.scalars for m in [re.fullmatch(r"eval/([a-z0-9_]+?)_acc", n)]
                    if m and not m.group(1).endswith(("_categorical", "_sampled"))})
    if tasks:
        task = tasks[0]
        greedy = data.first_last(f"eval/{task}_acc")
        (s0, g0), (s1, g1) = greedy
        text = f"Held-out {task} accuracy, RL step {s0} → {s1}: greedy {g0:.3f} → {g1:.3f} ({100 * (g1 - g0):+.1f} points)"
        sampled = data.first_last(f"eval/{task}_sampled_acc")
        if sampled:
            text += f", sampled {sampled[0][1]:.3f} → {sampled[1][1]:.3f}"
        k = pass_k(data)
        pk = data.first_last("rl/pass@k")
        if pk:
            text += f", pass@{k if k is not None else 'k'} {pk[0][1]:.3f} → {pk[1][1]:.3f}"
        lines.append(text + ".")
    elif any(n.endswith("_categorical_acc") for n in data.scalars):  # an SFT run: letter logits only
        name = sorted(n for n in data.scalars if n.startswith("eval/") and n.endswith("_categorical_acc"))[0]
        (s0, a0), (s1, a1) = data.first_last(name)
        lines.append(f"Held-out categorical accuracy ({name}), step {s0} → {s1}: {a0:.3f} → {a1:.3f}; no generative "
                     "evaluation logged.")
    elif data.scalars.get("rl/acc"):
        (s0, a0), (s1, a1) = data.first_last("rl/acc")
        lines.append(f"No held-out evaluation logged; accuracy of the sampled training completions, RL step {s0} → "
                     f"{s1}: {a0:.3f} → {a1:.3f}.")
    moved = []
    for name, what in HEADLINE_PROBES:
        fl = data.first_last(name)
        if fl and fl[0][0] != fl[1][0]:
            (s0, v0), (s1, v1) = fl
            size = max(abs(v0), abs(v1))
            if size > 0:
                moved.append((abs(v1 - v0) / size, name, what, s0, v0, s1, v1))
    if moved:
        _, name, what, s0, v0, s1, v1 = max(moved)
        unit = (metric_unit(name) or ("", ""))[1]
        lines.append(f"Probe that moved most (relative to its size): {what} {v0:.3f} → {v1:.3f} {unit}, "
                     f"probe step {s0} → {s1} ({name}).")
    lens = lens_layer(data)
    if lens:
        lines.append(lens)
    return lines


def lens_layer(data: RunData) -> str | None:
    """Where the answer forms: at the last probe step, the first layer whose logit-lens gold margin reaches
    half of the last layer's."""
    layers = sorted((int(m.group(1)), n) for n in data.scalars for m in [LENS.fullmatch(n)] if m)
    if not layers:
        return None
    step = max(s for _, n in layers for s, _ in data.scalars[n])
    margins = [dict(data.scalars[n]).get(step) for _, n in layers]
    if any(v is None for v in margins):
        return None
    shown = ", ".join(f"L{layer} {v:+.2f}" for (layer, _), v in zip(layers, margins))
    if margins[-1] <= 0:
        return (f"Logit lens, probe step {step}: the last layer's gold margin is {margins[-1]:+.2f} logits, so no "
                f"layer holds the answer yet ({shown}).")
    forms = next(layer for (layer, _), v in zip(layers, margins) if v >= margins[-1] / 2)
    return (f"Logit lens, probe step {step}: the answer forms at layer {forms}, the first whose gold margin "
            f"reaches half the last layer's ({shown} logits).")


STYLE = """
body { font-family: system-ui, sans-serif; margin: 20px 24px; color: #222; }
h1 { margin: 0 0 6px; font-size: 24px; } .source { color: #666; font-size: 13px; margin: 0 0 8px; }
.headline { background: #f3f7fb; border-left: 4px solid #2a6ebb; padding: 8px 14px; margin: 0 0 10px;
            font-size: 15px; } .headline p { margin: 3px 0; }
.toc { font-size: 13px; color: #444; margin: 0 0 6px; } .toc a { color: #2a6ebb; margin-right: 14px; }
h2.question { font-size: 21px; margin: 22px 0 4px; padding-top: 6px; border-top: 2px solid #2a6ebb; }
h3.template { font-size: 18px; margin: 10px 0 2px; } .desc { color: #444; font-size: 13px; margin: 0 0 6px; }
h4 { margin: 10px 0 6px; font-size: 15px; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(560px, 1fr)); gap: 14px;
        grid-auto-flow: dense; }
.aq-panel { border: 1px solid #ddd; border-radius: 6px; padding: 8px; min-width: 0; overflow: hidden; }
.aq-panel.wide { grid-column: 1 / -1; }
.aq-panel .title { margin: 4px 8px; font-size: 14px; font-weight: 600; } .kind { color: #888; font-weight: normal; }
.note { color: #555; font-size: 12px; margin: 4px 8px; }
.omitted { color: #666; font-size: 13px; margin: 4px 0 8px; font-style: italic; }
"""


# Plots drawn before the grid settles keep their first width; fit every plot to its card once loaded.
RESIZE = ("<script>window.addEventListener('load', () => document.querySelectorAll('.js-plotly-plot')"
          ".forEach(p => Plotly.Plots.resize(p)));</script>")


def _panel_html(panel: Panel, fig: go.Figure, div_id: str, data: RunData) -> str:
    # auto_play off: plotly would otherwise run every slider's frames on load, and moving a
    # slider during that run rejects the run's promise (an uncaught error in the console)
    plot = pio.to_html(fig, include_plotlyjs=False, full_html=False, auto_play=False, div_id=div_id,
                       config={"displaylogo": False, "responsive": True})
    wide = panel.kind == "image" or (panel.kind == "heatmap" and len(fig.data) > 1)
    note = panel_note(panel, data)
    return (f"<div class='aq-panel{' wide' if wide else ''}' data-kind='{panel.kind}' data-panel='{div_id}'>"
            f"<div class='title'>{html.escape(panel_title(panel, data))} <span class='kind'>({panel.kind})</span></div>"
            + (f"<p class='note'>{html.escape(note)}</p>" if note else "") + f"{plot}</div>")


def _family(name: str) -> str:
    """A metric name, or a regex cut at its first pattern character: 'patch/denoise/z/layer(?P<l>...' ->
    'patch/denoise/z/layer*'."""
    cut = re.search(r"[\\(\[.*+?]", name)
    return name if cut is None else name[:cut.start()] + "*"


def _omitted(left_out: list[tuple[Panel, str]], label: str) -> str:
    """One line for panels left out: which, why (grouped: nothing logged for these names), what logs them."""
    names = [n for p, _ in left_out for n in (p.metrics or [p.regex or ""])]
    unlogged = [p for p, why in left_out if why.startswith(("nothing logged", "no histogram", "no table", "no figure"))]
    other = list(dict.fromkeys(why for _, why in left_out if not why.startswith(
        ("nothing logged", "no histogram", "no table", "no figure"))))
    families = list(dict.fromkeys(_family(n) for p in unlogged for n in (p.metrics or [p.regex or ""])))
    reasons = ([f"the run logged nothing under {', '.join(families)}"] if unlogged else []) + other
    hint = fill_hint(_family(n) for n in names)
    titles = (", ".join(f"“{p.title}”" for p, _ in left_out) if len(left_out) <= 3
              else f"{len(left_out)} panels")
    return (f"<p class='omitted' data-omitted='{len(left_out)}'>{html.escape(label)} not drawn ({html.escape(titles)}): "
            f"{html.escape('; '.join(reasons))}." + (f" Logged by {html.escape(hint)}." if hint else "") + "</p>")


def render_html(templates: list[Template], data: RunData, title: str | None = None) -> str:
    """The whole page: plotly.js inlined once, the headline, then each question's templates in order."""
    body, toc = [], []
    for g_index, (question, group) in enumerate(report_groups(templates)):
        anchor = f"q{g_index}"
        toc.append(f"<a href='#{anchor}'>{html.escape(question)}</a>")
        body.append(f"<h2 class='question' id='{anchor}'>{html.escape(question)}</h2>")
        for template in group:
            t_index = templates.index(template)
            drawn_sections = []
            left_all: list[tuple[Panel, str]] = []
            for s_index, section in enumerate(template.sections):
                panels, left_out = [], []
                for p_index, panel in enumerate(section.panels):
                    try:
                        fig = panel_figure(panel, data)
                    except NoData as why:
                        left_out.append((panel, str(why)))
                        continue
                    panels.append(_panel_html(panel, fig, f"t{t_index}-s{s_index}-p{p_index}", data))
                left_all += left_out
                if panels:
                    drawn_sections.append(f"<h4>{html.escape(section.name)}</h4><div class='grid'>" + "".join(panels)
                                          + "</div>" + (_omitted(left_out, "Also") if left_out else ""))
                elif left_out:
                    drawn_sections.append(_omitted(left_out, f"Section “{section.name}”"))
            head = (f"<section class='aq-template' data-template='{template.name}'>"
                    f"<h3 class='template'>{html.escape(template.title)}</h3>")
            if not any("class='grid'" in s for s in drawn_sections):
                body.append(head + _omitted(left_all, f"{template.title}: nothing to draw; every panel") + "</section>")
                continue
            body.append(head + f"<p class='desc'>{html.escape(template.description)}</p>" + "".join(drawn_sections)
                        + "</section>")
    page_title = title or "aquainterp report"
    top = "".join(f"<p>{html.escape(line)}</p>" for line in headline(data)) or "<p>No accuracy logged.</p>"
    return ("<!DOCTYPE html>\n<html><head><meta charset='utf-8'>"
            f"<title>{html.escape(page_title)}</title><style>{STYLE}</style>"
            f"<script type='text/javascript'>{plotly.offline.get_plotlyjs()}</script></head><body>"
            f"<h1>{html.escape(page_title)}</h1>"
            f"<p class='source'>from {html.escape(data.source)}</p>"
            f"<div class='headline'>{top}</div><div class='toc'>{' '.join(toc)}</div>"
            + "\n".join(body) + RESIZE + "</body></html>\n")


def check_report_output(run_dir: str | Path, out: str | Path) -> None:
    """The report never replaces what it reads: not metrics.jsonl, not the W&B run, not a folder, not a
    non-HTML file of the run (a logged figure, say)."""
    from aquainterp.cli.rundir import RunDirError, check_output, inside

    run_dir, out = Path(run_dir), Path(out)
    check_output(out, [run_dir / METRICS_FILE, run_dir / "wandb"], "-o")
    if out.is_dir():
        raise RunDirError(f"-o {out} is a folder; give the HTML file to write")
    if out.exists() and inside(run_dir, out) and out.suffix.lower() not in (".html", ".htm"):
        raise RunDirError(f"-o {out} is a file of the run {run_dir}; refusing to overwrite it with HTML")


def write_html(templates: list[Template], run_dir: str | Path, out: str | Path, source: str = "auto") -> Path:
    """Load the run, render the templates, write the page; returns its path."""
    check_report_output(run_dir, out)
    data = RunData.load(run_dir, source)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render_html(templates, data, f"aquainterp report: {run_dir}"),
                   encoding="utf-8")
    return out


def panel_count(templates: list[Template]) -> int:
    return sum(len(t.panels) for t in templates)

