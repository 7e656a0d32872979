"""Offline dashboards: a template drawn from a run's metrics as one self-contained plotly HTML page.

The page inlines plotly.js once and holds one plot per template panel, so it opens anywhere without
network or a W&B account. The data comes from the run's metrics.jsonl (written by aquainterp.logger)
or, when there is none, from the offline W&B run file under run_dir/wandb (dashboards.wandb_run).

Every panel gets a plot even when the run logged nothing for it (the plot then says so), so a page
always shows the whole template. Heatmaps (layer x head) and histograms get a step slider.
"""

from __future__ import annotations

import html
import os
import re
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

import plotly.graph_objects as go
import plotly.io as pio
import plotly.offline

from aquainterp.logger import METRICS_FILE, read_metrics
from aquainterp.rundir import inside
from dashboards.safe_regex import safe_compile
from dashboards.template import Panel, Template
from dashboards.wandb_run import history_as_metrics

PLOT_HEIGHT = 380


class RunData:
    """A run's logged values by name: scalar series and (step, object) lists for media."""

    def __init__(self, rows: Iterable[dict], base_dir: Path | None = None, source: str = ""):
        self.scalars: dict[str, list[tuple[int, float]]] = defaultdict(list)
        self.objects: dict[str, list[tuple[int, dict]]] = defaultdict(list)
        self.base_dir = base_dir
        self.source = source
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
        if source == "jsonl" or (source == "auto" and (run_dir / METRICS_FILE).is_file()):
            return cls(read_metrics(run_dir), run_dir, str(run_dir / METRICS_FILE))
        return cls(history_as_metrics(run_dir), run_dir, f"W&B offline run in {run_dir}")


def _sort_key(label: str):
    return (0, int(label), "") if label.isdigit() else (1, 0, label)


def _empty(panel: Panel, why: str) -> go.Figure:
    fig = go.Figure()
    fig.add_annotation(text=html.escape(why), showarrow=False, xref="paper", yref="paper", x=0.5, y=0.5)
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    return fig


def _what(panel: Panel) -> str:
    return f"regex {panel.regex}" if panel.regex else ", ".join(panel.metrics)


def _slider(fig: go.Figure, steps: list[int], x_label: str) -> go.Figure:
    """A slider over frames named by step; the figure opens at the last step."""
    fig.update_layout(sliders=[{
        "active": len(steps) - 1,
        "currentvalue": {"prefix": f"{x_label} = "},
        "pad": {"t": 40},
        "steps": [{"label": str(s), "method": "animate",
                   "args": [[str(s)], {"mode": "immediate", "frame": {"duration": 0, "redraw": True},
                                       "transition": {"duration": 0}}]} for s in steps],
    }])
    return fig


def line_figure(panel: Panel, data: RunData) -> go.Figure:
    names = panel.matches(data.scalars)
    if not names:
        return _empty(panel, f"nothing logged for {_what(panel)}")
    fig = go.Figure()
    for name in sorted(names, key=lambda n: [_sort_key(p) for p in re.split(r"(\d+)", n)]):
        points = sorted(data.scalars[name])
        fig.add_trace(go.Scatter(x=[s for s, _ in points], y=[v for _, v in points], name=name,
                                 mode="lines+markers" if len(points) < 50 else "lines"))
    fig.update_xaxes(title_text=panel.x)
    return fig


def bar_figure(panel: Panel, data: RunData) -> go.Figure:
    names = [n for n in panel.metrics if data.scalars.get(n)]
    if not names:
        return _empty(panel, f"nothing logged for {_what(panel)}")
    latest = {n: max(data.scalars[n]) for n in names}  # (step, value) with the largest step
    step = max(s for s, _ in latest.values())
    prefix = os.path.commonprefix(names).rpartition("/")[0]  # "rl/letter_pred_counts/A" -> "A"
    labels = [n[len(prefix) + 1:] if prefix else n for n in names]
    fig = go.Figure(go.Bar(x=labels, y=[latest[n][1] for n in names], text=[f"{latest[n][1]:g}" for n in names]))
    fig.update_layout(title_text=f"latest, step {step}", title_font_size=12)
    return fig


def heatmap_figure(panel: Panel, data: RunData) -> go.Figure:
    pattern = safe_compile(panel.regex)  # validated template syntax; over-long names never match
    if len(pattern.groupindex) == 1:
        return _rows_by_step_heatmap(panel, pattern, data)
    row_name, col_name = sorted(pattern.groupindex, key=pattern.groupindex.get)
    cells: dict[int, dict[tuple[str, str], float]] = defaultdict(dict)
    rows, cols = set(), set()
    for name, points in data.scalars.items():
        m = pattern.fullmatch(name)
        if not m:
            continue
        r, c = m.group(row_name), m.group(col_name)
        rows.add(r)
        cols.add(c)
        for step, value in points:
            cells[step][(r, c)] = value
    if not cells:
        return _empty(panel, f"nothing logged for {_what(panel)}")
    rows, cols = sorted(rows, key=_sort_key), sorted(cols, key=_sort_key)
    steps = sorted(cells)
    values = [v for grid in cells.values() for v in grid.values()]
    zmin, zmax = min(values), max(values)

    def trace(step):
        z = [[cells[step].get((r, c)) for c in cols] for r in rows]
        return go.Heatmap(z=z, x=[f"{col_name} {c}" for c in cols], y=[f"{row_name} {r}" for r in rows],
                          zmin=zmin, zmax=zmax, colorscale="Viridis", hoverongaps=False)

    fig = go.Figure(data=[trace(steps[-1])], frames=[go.Frame(data=[trace(s)], name=str(s)) for s in steps])
    fig.update_yaxes(autorange="reversed")
    return _slider(fig, steps, panel.x)


def _rows_by_step_heatmap(panel: Panel, pattern: re.Pattern, data: RunData) -> go.Figure:
    """One named group: its values are the rows, the logged steps the columns (e.g. layer x step)."""
    (row_name,) = pattern.groupindex
    cells: dict[str, dict[int, float]] = defaultdict(dict)
    for name, points in data.scalars.items():
        m = pattern.fullmatch(name)
        if m:
            cells[m.group(row_name)].update(dict(points))
    if not cells:
        return _empty(panel, f"nothing logged for {_what(panel)}")
    rows = sorted(cells, key=_sort_key)
    steps = sorted({s for row in cells.values() for s in row})
    z = [[cells[r].get(s) for s in steps] for r in rows]
    fig = go.Figure(go.Heatmap(z=z, x=steps, y=[f"{row_name} {r}" for r in rows], colorscale="RdBu",
                               zmid=0, hoverongaps=False, colorbar={"title": {"text": "value"}}))
    fig.update_yaxes(autorange="reversed")
    fig.update_xaxes(title_text=panel.x, type="category")
    return fig


def histogram_figure(panel: Panel, data: RunData) -> go.Figure:
    entries = sorted(((s, o) for s, o in data.objects.get(panel.metrics[0], []) if o.get("_type") == "histogram"),
                     key=lambda e: e[0])
    if not entries:
        return _empty(panel, f"no histogram logged for {_what(panel)}")

    def trace(obj):
        if "values" in obj:  # raw values from metrics.jsonl
            return go.Histogram(x=obj["values"], nbinsx=30, name=panel.metrics[0])
        bins, counts = obj["bins"], obj["counts"]  # W&B's binned form: len(bins) == len(counts) + 1
        centers = [(a + b) / 2 for a, b in zip(bins[:-1], bins[1:])]
        return go.Bar(x=centers, y=counts, name=panel.metrics[0])

    steps = [s for s, _ in entries]
    fig = go.Figure(data=[trace(entries[-1][1])],
                    frames=[go.Frame(data=[trace(o)], name=str(s)) for s, o in entries])
    fig.update_xaxes(title_text=panel.metrics[0])
    fig.update_yaxes(title_text="count")
    return _slider(fig, steps, panel.x)


def table_figure(panel: Panel, data: RunData) -> go.Figure:
    entries = [(s, o) for s, o in data.objects.get(panel.metrics[0], []) if o.get("_type") == "table"]
    if not entries:
        return _empty(panel, f"no table logged for {_what(panel)}")
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
        return _empty(panel, f"no figure logged for {_what(panel)}")
    step, obj = max(entries, key=lambda e: e[0])
    path = Path(str(obj.get("path", "")))
    if data.base_dir is None:
        return _empty(panel, "figure files are read only from a run directory")
    if not inside(data.base_dir, path):  # a shared report must not embed files from outside the run
        return _empty(panel, f"figure path {str(path)!r} points outside the run directory; not embedded")
    if not path.is_absolute():
        path = data.base_dir / path
    if not path.is_file():
        return _empty(panel, f"figure file {path} is missing")
    fig = pio.from_json(path.read_text(encoding="utf-8"))
    fig.update_layout(title_text=f"step {step}", title_font_size=12)
    return fig


FIGURES = {"line": line_figure, "bar": bar_figure, "heatmap": heatmap_figure,
           "histogram": histogram_figure, "table": table_figure, "image": image_figure}


def panel_figure(panel: Panel, data: RunData) -> go.Figure:
    fig = FIGURES[panel.kind](panel, data)
    fig.update_layout(height=PLOT_HEIGHT, margin={"l": 50, "r": 20, "t": 40, "b": 40},
                      legend={"font": {"size": 10}}, template="plotly_white")
    return fig


STYLE = """
body { font-family: system-ui, sans-serif; margin: 24px; color: #222; }
h1 { margin-bottom: 4px; } .source { color: #666; font-size: 13px; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(520px, 1fr)); gap: 16px; }
.aq-panel { border: 1px solid #ddd; border-radius: 6px; padding: 8px; }
.aq-panel h3 { margin: 4px 8px; font-size: 15px; } .kind { color: #888; font-weight: normal; }
"""


def render_html(templates: list[Template], data: RunData, title: str | None = None) -> str:
    """The whole page: plotly.js inlined once, then every section and panel of every template."""
    body = []
    for t_index, template in enumerate(templates):
        body.append(f"<h1>{html.escape(template.title)}</h1><p>{html.escape(template.description)}</p>")
        for s_index, section in enumerate(template.sections):
            body.append(f"<h2>{html.escape(section.name)}</h2><div class='grid'>")
            for p_index, panel in enumerate(section.panels):
                div_id = f"t{t_index}-s{s_index}-p{p_index}"
                # auto_play off: plotly would otherwise run every slider's frames on load, and moving a
                # slider during that run rejects the run's promise (an uncaught error in the console)
                plot = pio.to_html(panel_figure(panel, data), include_plotlyjs=False, full_html=False,
                                   auto_play=False, div_id=div_id,
                                   config={"displaylogo": False, "responsive": True})
                body.append(f"<div class='aq-panel' data-kind='{panel.kind}' data-panel='{div_id}'>"
                            f"<h3>{html.escape(panel.title)} <span class='kind'>({panel.kind})</span></h3>"
                            f"{plot}</div>")
            body.append("</div>")
    page_title = title or " + ".join(t.title for t in templates)
    return ("<!DOCTYPE html>\n<html><head><meta charset='utf-8'>"
            f"<title>{html.escape(page_title)}</title><style>{STYLE}</style>"
            f"<script type='text/javascript'>{plotly.offline.get_plotlyjs()}</script></head><body>"
            f"<p class='source'>aquainterp dashboard from {html.escape(data.source)}</p>"
            + "\n".join(body) + "</body></html>\n")


def check_report_output(run_dir: str | Path, out: str | Path) -> None:
    """The report never replaces what it reads: not metrics.jsonl, not the W&B run, not a folder, not a
    non-HTML file of the run (a logged figure, say)."""
    from aquainterp.rundir import RunDirError, check_output, inside

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
    out.write_text(render_html(templates, data), encoding="utf-8")
    return out


def panel_count(templates: list[Template]) -> int:
    return sum(len(t.panels) for t in templates)

