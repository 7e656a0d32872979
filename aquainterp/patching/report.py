"""The patching report a person reads: one self-contained HTML page (plotly.js inlined, works offline).

Order, top to bottom:
1. Summary: the run in one line, clean / corrupted letter logit difference, one sentence per sweep, and
   the strongest cells of every sweep with their tokens and restored fraction.
2. Heatmaps, cropped to the informative positions (columns whose strongest cell reaches 10% of the
   sweep's strongest, always with the decision column, outlined), widest first so that the decision
   sits on screen; the full position axis of each sweep is behind a toggle.
3. Per-pair drill-down: each pair's baselines, the letter its completion states, its text with every
   token shaded by how much patching it restores (first per-position sweep), and its strongest cells.
4. The raw summary JSON, collapsed.
"""

from __future__ import annotations

import html
import json

import torch

from aquainterp.patching.patcher import MIN_GAP

MAX_COLUMNS = 40  # a cropped heatmap shows at most this many positions
MIN_COLUMNS = 16  # ... and at least this many (context before the decision), when the prompt has them
PLOT_CONFIG = {"displayModeBar": False, "responsive": False}
INFORMATIVE = 0.1  # a column is informative when its strongest cell reaches this share of the sweep's


def decision_columns(patcher) -> list[int]:
    """Cells of the position axis that are some pair's decision position."""
    if patcher.align == "end":
        return [patcher.n_pos - 1]
    return sorted({int(p) for p in patcher.decision_pos.tolist()})


def completion_column(patcher) -> int | None:
    """Position cell where the longest pair's completion starts (None: no completion in the pairs)."""
    longest = max(range(len(patcher.pairs)), key=lambda i: len(patcher.pairs[i].clean_ids))
    start = patcher.pairs[longest].completion_start
    if start is None:
        return None
    return start + (patcher.n_pos - len(patcher.pairs[longest].clean_ids) if patcher.align == "end" else 0)


def as_rows(r, n_heads: int) -> tuple[torch.Tensor, list[str]]:
    """The sweep as a 2-D grid [rows, columns] and its row labels: layers (× heads for z_pos)."""
    v = r.normalized.detach().float().cpu()
    if r.axes == ("layer", "pos", "head"):
        return v.permute(0, 2, 1).reshape(-1, v.shape[1]), [f"L{la}H{h}" for la in range(v.shape[0])
                                                            for h in range(n_heads)]
    return v, [f"L{la}" for la in range(v.shape[0])]


def informative_columns(grid: torch.Tensor, keep: list[int]) -> list[int]:
    """Columns worth showing: the contiguous span of columns whose strongest |value| reaches INFORMATIVE
    of the grid's strongest, plus `keep`, widened back to MIN_COLUMNS; if that span is wider than MAX_COLUMNS, only the strongest
    columns (and `keep`), in position order."""
    strength = (grid - grid.median()).abs().amax(0)  # a map that is all ~1 (noising) has its signal below 1
    top = float(strength.max())
    picked = set(keep) | ({int(i) for i in torch.nonzero(strength >= INFORMATIVE * top).flatten()} if top > 0 else set())
    lo, hi = min(picked), max(picked)
    lo = max(0, min(lo, hi - MIN_COLUMNS + 1))  # a little context before the last informative column
    if hi - lo + 1 <= MAX_COLUMNS:
        return list(range(lo, hi + 1))
    strongest = [int(i) for i in strength.argsort(descending=True) if int(i) in picked]
    return sorted(set(keep) | set(strongest[: MAX_COLUMNS - len(keep)]))


def figure(r, positions: list[str], n_heads: int, columns: list[int] | None, decision: list[int],
           completion: int | None, height_per_row: int = 26):
    """A plotly heatmap of one sweep (columns: position cells to show; None: heads or every position)."""
    import plotly.graph_objects as go

    grid, rows = as_rows(r, n_heads)
    if r.axes == ("layer", "head"):
        x, z, marks = [f"H{h}" for h in range(grid.shape[1])], grid, []
    else:
        columns = list(range(grid.shape[1])) if columns is None else columns
        x, z = [positions[c] for c in columns], grid[:, columns]
        marks = [columns.index(c) for c in decision if c in columns]
    restored = "restored" if r.direction == "denoise" else "kept"
    fig = go.Figure(go.Heatmap(z=z.tolist(), x=x, y=rows, colorscale="RdBu_r", zmid=0.0, xgap=1, ygap=1,
                               colorbar={"title": restored, "thickness": 12},
                               hovertemplate="%{y} · %{x}<br>" + restored + " %{z:.3f}<extra></extra>"))
    for m in marks:  # outline the decision column
        fig.add_shape(type="rect", xref="x", yref="paper", x0=m - 0.5, x1=m + 0.5, y0=0, y1=1,
                      line={"color": "black", "width": 2}, name="decision")
        fig.add_annotation(x=m, y=1.0, yref="paper", yanchor="bottom", text="decision", showarrow=False,
                           font={"size": 11})
    if completion is not None and r.axes != ("layer", "head") and completion in (columns or []):
        c = columns.index(completion)
        fig.add_shape(type="line", xref="x", yref="paper", x0=c - 0.5, x1=c - 0.5, y0=0, y1=1,
                      line={"color": "#555", "width": 1, "dash": "dot"})
        fig.add_annotation(x=c - 0.5, y=1.0, yref="paper", yanchor="bottom", xanchor="left",
                           text="completion →", showarrow=False, font={"size": 11, "color": "#555"})
    fig.update_layout(margin={"l": 60, "r": 20, "t": 30, "b": 110}, yaxis={"autorange": "reversed", "type": "category"},
                      xaxis={"type": "category", "tickangle": -60, "automargin": True},
                      height=max(260, 140 + height_per_row * len(rows)), width=min(1300, max(420, 150 + 22 * len(x))))
    return fig


def _cell_text(cell: dict) -> str:
    parts = [f"L{cell['layer']}"] if "layer" in cell else []
    if "head" in cell:
        parts.append(f"H{cell['head']}")
    if "token" in cell:
        parts.append(f"@ {cell['token']}")
    return " ".join(parts)


def sentence(key: str, s: dict, n_pairs: int) -> str:
    """One plain sentence on a sweep's summary (from summarize): the strongest cell and how many matter."""
    direction, name = key.split("/", 1)
    best = s["top_cells"][0]
    if direction == "denoise":
        head = f"patching the clean {name} into the corrupted run at {_cell_text(best)} restores {best['value']:.0%}"
        strong = f"{s['n_above_10pct']} of {s['n_cells']} cells restore at least 10%"
    else:
        head = (f"patching the corrupted {name} into the clean run at {_cell_text(best)} leaves {best['value']:.0%} "
                "of the clean answer")
        strong = f"{s['n_above_10pct']} of {s['n_cells']} cells move it by at least 10%"
    return f"<b>{html.escape(key)}</b>: {html.escape(head)} of the answer's logit difference (mean of {n_pairs} pairs); " \
           f"{html.escape(strong)}."


def _token_strip(tokenizer, ids, shade: list[float], completion_start: int | None) -> str:
    """The pair's text, one span per token, background shaded by `shade` (restored fraction, clipped)."""
    out = []
    for k, t in enumerate(ids):
        text = tokenizer.token_str(t) if tokenizer is not None else f"[{t}]"
        v = max(-1.0, min(1.0, shade[k]))
        color = f"rgba(178,24,43,{v:.2f})" if v >= 0 else f"rgba(33,102,172,{-v:.2f})"
        title = f"{k}: {v:+.2f}"
        if completion_start is not None and k == completion_start:
            out.append("<span class='cut'>┃</span>")
        out.append(f"<span style='background:{color}' title='{html.escape(title)}'>{html.escape(text)}</span>")
    return "".join(out)


STYLE = """
body{font-family:system-ui,sans-serif;margin:18px 24px;color:#222;max-width:1400px}
h1{font-size:22px;margin:0 0 6px} h2{font-size:18px;margin:22px 0 8px;border-bottom:1px solid #ddd}
.run{color:#555;font-size:13px;margin-bottom:8px}
.kpi{display:inline-block;margin-right:28px;font-size:14px} .kpi b{font-size:20px}
table{border-collapse:collapse;font-size:13px} td,th{padding:2px 10px;border-bottom:1px solid #eee;text-align:left}
ul.sentences{margin:6px 0 8px;padding-left:20px;font-size:14px} ul.sentences li{margin:2px 0}
.aq-panel{margin:6px 0 14px} .note{color:#666;font-size:12px}
.warn{background:#fff4e5;border-left:4px solid #e68a00;padding:4px 10px;margin:6px 0;font-size:14px}
details.excluded{font-size:13px;margin:6px 0}
details{margin:4px 0} summary{cursor:pointer}
.strip{font-family:ui-monospace,monospace;font-size:12px;white-space:pre-wrap;line-height:1.6;border:1px solid #eee;
       padding:6px;max-height:260px;overflow:auto} .cut{color:#888}
pre.raw{font-size:11px;max-height:500px;overflow:auto;background:#f7f7f7;padding:8px}
"""


NOTATION = ("Labels: <b>L1</b> layer 1, <b>H3</b> head 3; <b>@ 0: :</b> at position 0, token ':' (aligned at the end "
            "positions count back from the decision token, 0; at the start, from the first token); <b>*</b> after a "
            "token: the pairs differ there (the longest pair's token is shown). Restored = (patched − corrupted) / "
            "(clean − corrupted) of the gold-minus-foil letter logit difference, pair means: 0 = corrupted, 1 = clean.")


def screen_html(screen: dict | None) -> str:
    """Which pairs the headline leaves out and why, and the warnings (few pairs left, a tiny gap)."""
    if not screen:
        return ""
    parts = []
    for warning in screen.get("warnings", []):
        parts.append(f"<div class='warn'>⚠ {html.escape(warning)}</div>")
    excluded = screen.get("excluded", [])
    if excluded:
        verb = "kept in the headline (--keep-all-pairs)" if screen.get("kept_all") else "left out of the headline"
        rows = "".join(f"<tr><td>{html.escape(e['name'])}</td><td>{e['clean_logit_diff']:+.2f}</td>"
                       f"<td>{e['corrupted_logit_diff']:+.2f}</td><td>{html.escape(e['reason'])}</td></tr>"
                       for e in excluded)
        parts.append(f"<details class='excluded'><summary>{len(excluded)} of {screen['of']} pairs {verb}: "
                     f"the model is wrong on the clean prompt (clean &lt; 0) or the corruption moves it by less than "
                     f"{screen['min_gap']:g} logits</summary><table><tr><th>pair</th><th>clean</th><th>corrupted</th>"
                     f"<th>why</th></tr>{rows}</table></details>")
    elif screen.get("of"):
        parts.append(f"<div class='note'>All {screen['of']} pairs pass the screen: clean answer right and a clean - "
                     f"corrupted gap of at least {screen['min_gap']:g} logits.</div>")
    return "".join(parts)


def write_html(path, patcher, results, summary: dict, tokenizer, extra: str = "") -> dict:
    """The report page; returns what it shows (figure count, decision column per heatmap)."""
    positions = summary["positions"]
    n_heads, n_pairs = patcher.n_heads, len(patcher.pairs)
    decision, completion = decision_columns(patcher), completion_column(patcher)
    s = summary
    screen = s.get("screen")
    gap = s["clean_logit_diff_mean"] - s["corrupted_logit_diff_mean"]
    min_gap = screen["min_gap"] if screen else MIN_GAP
    unreliable = abs(gap) < min_gap  # normalised values divide by this gap
    run = ", ".join(f"{k} {s[k]}" for k in ("checkpoint", "hf_dir", "step", "task", "decision", "method",
                                             "corruption", "style", "align") if s.get(k) is not None)
    skipped = len(s.get("skipped", [])) + len(s.get("no_marker", []))
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>activation patching</title>"
             f"<style>{STYLE}</style></head><body><h1>Activation patching</h1>",
             f"<div class='run'>{html.escape(run)}; {n_pairs} pairs"
             + (f", {skipped} problems skipped ({len(s.get('no_marker', []))} completions without an answer "
                f"marker)" if skipped else "") + "</div>",
             "<div>"
             f"<span class='kpi'>clean logit diff <b>{s['clean_logit_diff_mean']:.3f}</b></span>"
             f"<span class='kpi'>corrupted <b>{s['corrupted_logit_diff_mean']:.3f}</b></span>"
             f"<span class='kpi'>gap <b>{gap:.3f}</b> = 100% restored</span>"
             + (f"<span class='kpi'>pairs <b>{n_pairs}</b> of {screen['of']}</span>" if screen else "") + "</div>",
             screen_html(screen)
             + (f"<div class='warn'>⚠ The clean - corrupted gap ({gap:+.3f} logits) is below {min_gap:g}: every "
                "restored fraction below divides by it, so the values are flagged as unreliable.</div>"
                if unreliable and not (screen and any("gap is" in w for w in screen.get("warnings", []))) else ""),
             "<ul class='sentences'>" + "".join(f"<li>{sentence(k, v, n_pairs)}"
                                                f"{' <b>⚠ unreliable: tiny gap</b>' if unreliable else ''}</li>"
                                                for k, v in s["sweeps"].items())
             + "</ul>", f"<p class='note notation'>{NOTATION}</p>"]
    rows = []
    for key, v in s["sweeps"].items():
        for cell in v["top_cells"][:2]:
            rows.append(f"<tr><td>{html.escape(key)}</td><td>{html.escape(_cell_text(cell))}</td>"
                        f"<td>{cell['value']:+.1%}{' ⚠ tiny gap' if unreliable else ''}</td></tr>")
    parts.append("<table><tr><th>sweep</th><th>strongest cells (layer, head, position: token)</th>"
                 "<th>restored (0 = corrupted, 1 = clean)</th></tr>" + "".join(rows) + "</table>")
    # heatmaps: per-position sweeps first (their decision column is the thing to see), cropped
    parts.append("<h2>Heatmaps</h2><p class='note'>Columns: positions counted back from the decision token "
                 "(0) when aligned at the end; outlined: the decision column; dotted: where the model's own "
                 "completion starts. Colour: fraction of the clean-corrupted letter logit difference restored "
                 "(red) or pushed the other way (blue). Hover a cell for its value.</p>")
    ordered = sorted(results, key=lambda r: ("pos" not in r.axes, r.direction != "denoise"))
    shown, plotly_included = [], False
    for r in ordered:
        key = f"{r.direction}/{r.name}"
        grid, _ = as_rows(r, n_heads)
        if "pos" in r.axes:
            cols = informative_columns(grid, decision)
            fig = figure(r, positions, n_heads, cols, decision, completion)
            note = (f"{len(cols)} of {patcher.n_pos} positions shown"
                    + ("" if len(cols) == patcher.n_pos else f" (the informative span: columns whose strongest "
                       f"cell reaches {INFORMATIVE:.0%} of the sweep's strongest, and the decision)"))
        else:
            cols, fig, note = None, figure(r, positions, n_heads, None, decision, completion), "every head, all positions patched together"
        parts.append(f"<div class='aq-panel' data-sweep='{html.escape(key)}'><b>{html.escape(key)}</b> "
                     f"<span class='note'>({' × '.join(r.axes)}; {note})</span>"
                     + fig.to_html(full_html=False, include_plotlyjs=not plotly_included,
                                 config=PLOT_CONFIG) + "</div>")
        plotly_included = True
        shown.append({"sweep": key, "columns": cols})
        if cols is not None and len(cols) < patcher.n_pos:
            full = figure(r, positions, n_heads, None, decision, completion)
            parts.append(f"<details class='full'><summary>{html.escape(key)}: all {patcher.n_pos} positions</summary>"
                         + full.to_html(full_html=False, include_plotlyjs=False, config=PLOT_CONFIG) + "</details>")
    parts.append(extra)  # e.g. the step x cell view of a checkpoint series (aquainterp.patching.series)
    parts.append(_drilldown(patcher, results, summary, tokenizer, min_gap))
    parts.append("<h2>Raw summary</h2><details><summary>summary.json</summary><pre class='raw'>"
                 + html.escape(json.dumps(summary, indent=1)) + "</pre></details></body></html>")
    path.write_text("\n".join(parts), encoding="utf-8")
    return {"heatmaps": shown, "decision_label": positions[decision[-1]]}


def _drilldown(patcher, results, summary, tokenizer, min_gap: float = MIN_GAP) -> str:
    """One collapsed section per pair: baselines, letters, shaded text, strongest cells for that pair."""
    per_pos = next((r for r in results if r.axes == ("layer", "pos") and r.direction == "denoise"), None)
    parts = ["<h2>Pairs</h2><p class='note'>Restored fraction per pair: (patched − corrupted) / (clean − corrupted) "
             "of that pair's own letter logit difference." + (f" Token shading: the strongest layer of "
                                                              f"{per_pos.name} at each position."
                                                              if per_pos is not None else "") + "</p>"]
    for i, (pair, info) in enumerate(zip(patcher.pairs, summary["pairs"])):
        gap = float(patcher.clean_ld[i] - patcher.corrupted_ld[i])
        head = (f"{html.escape(pair.name)}: clean {info['clean_logit_diff']:+.2f}, corrupted "
                f"{info['corrupted_logit_diff']:+.2f}, gold {html.escape(str(info['clean_letter']))} vs foil "
                f"{html.escape(str(info['foil_letter']))}"
                + (f", completion states {html.escape(str(info['stated_letter']))}" if info.get("stated_letter") else ""))
        body = []
        tiny = gap < min_gap  # this pair's fractions would divide by a gap below the screen's threshold
        if tiny:
            head += f" ⚠ gap {gap:+.2f} &lt; {min_gap:g} logits"
            body.append(f"<p class='warn'>This pair's clean - corrupted gap is {gap:+.2f} logits"
                        + (" and the model is wrong on its clean prompt" if info["clean_logit_diff"] < 0 else "")
                        + ": per-pair restored fractions would divide by it, so none are shown.</p>")
        offset = patcher.n_pos - len(pair.clean_ids) if patcher.align == "end" else 0
        if per_pos is not None and not tiny:
            frac = (per_pos.logit_diff[..., i] - patcher.corrupted_ld[i]) / gap  # [layer, pos cells]
            strongest = frac.gather(0, frac.abs().argmax(0, keepdim=True))[0]
            shade = [float(strongest[offset + k]) for k in range(len(pair.clean_ids))]
            body.append(f"<div class='strip'>{_token_strip(tokenizer, pair.clean_ids, shade, pair.completion_start)}</div>")
        else:
            text = tokenizer.decode(list(pair.clean_ids)) if tokenizer is not None else str(pair.clean_ids)
            body.append(f"<div class='strip'>{html.escape(text)}</div>")
        cells = []
        for r in results:
            if tiny:
                break
            frac = (r.logit_diff[..., i] - patcher.corrupted_ld[i]) / gap  # 0 = corrupted, 1 = clean
            order = frac.abs().flatten().argsort(descending=True)[:3].tolist()
            for flat in order:
                index = torch.unravel_index(torch.tensor(flat), frac.shape)
                cell = {a: int(j) for a, j in zip(r.axes, index)}
                if "pos" in cell:
                    cell["token"] = summary["positions"][cell["pos"]]
                cells.append(f"<tr><td>{r.direction}/{r.name}</td><td>{html.escape(_cell_text(cell))}</td>"
                             f"<td>{float(frac.flatten()[flat]):+.1%}</td></tr>")
        if cells:
            body.append("<table><tr><th>sweep</th><th>cell</th><th>this pair</th></tr>" + "".join(cells) + "</table>")
        opened = " open" if i == 0 else ""  # the first pair shows what a drill-down holds
        parts.append(f"<details class='pair'{opened}><summary>{head}</summary>{''.join(body)}</details>")
    return "".join(parts)


# What the browser check reads after the plots are drawn: the first heatmap's outlined decision column
# (its bounding box against the first viewport) and the page's order of sections; run with
# dashboards.browser.inspect_page(path, evaluate=CHECK_JS) (tests/test_patching_report.py, scripts).
CHECK_JS = """(() => {
  const panels = [...document.querySelectorAll('.aq-panel')];
  const first = panels[0];
  let box = null;
  if (first) {
    const rect = first.querySelector('.shapelayer path');
    if (rect) { const b = rect.getBoundingClientRect();
                box = {left: b.left, right: b.right, top: b.top, bottom: b.bottom}; }
  }
  const heads = [...document.querySelectorAll('h1,h2')].map(h => h.textContent);
  const raw = document.querySelector('pre.raw');
  return JSON.stringify({decision_box: box, viewport: {width: innerWidth, height: innerHeight}, headings: heads,
                         raw_hidden: raw ? !raw.closest('details').open : null,
                         pairs: document.querySelectorAll('details.pair').length});
})()"""

