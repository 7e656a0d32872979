"""Templates as W&B saved workspaces (wandb-workspaces), and back.

    template_to_workspace(t, entity, project) -> ws.Workspace      what `dashboard push` saves
    workspace_model(t, entity, project) -> dict                     the JSON `dashboard export` writes
    template_from_model(d) -> Template                              what `dashboard load` reads back

The exported JSON is W&B's own view model (`internal.View`: entity, project, display name and the
viewspec with sections and panels), the same object `Workspace.save()` uploads, so it needs no network.

Panel mapping (W&B has no layer x head heatmap of scalars and no titled summary table):
    line       LinePlot(title, x, y=metrics | metric_regex=regex)
    histogram  LinePlot(title, x, y=[name])       W&B draws a histogram series as a heatmap over steps
    heatmap    LinePlot(title, x, metric_regex)   one line per layer/head in W&B
    bar        BarPlot(title, metrics, vertical)
    table      WeavePanelSummaryTable(table_name)
    image      MediaBrowser(title, media_keys)
What a W&B panel cannot hold (the kinds histogram and heatmap, a heatmap's named groups, a table's
title, the template's name, version and description) travels in a MarkdownPanel in a closed last section named CARRIER_SECTION,
as a fenced JSON block keyed by panel id. Only fields the W&B panel really lost are put there: each
panel is converted to W&B, back, and compared. Panel ids are deterministic ("aq-<section>-<panel>")
so exports are byte-stable and golden-testable.
"""

from __future__ import annotations

import json
import re

import wandb_workspaces.reports.v2 as wr
import wandb_workspaces.workspaces as ws
from wandb_workspaces.reports.v2.interface import _lookup_panel
from wandb_workspaces.workspaces import internal as ws_internal

from dashboards.template import Panel, Template, TemplateError

CARRIER_SECTION = "aquainterp template"
CARRIER_RE = re.compile(r"```json\n(?P<json>.*?)\n```", re.S)
PANEL_W, PANEL_H, PER_ROW = 8, 6, 3


def _layout(j: int) -> wr.Layout:
    return wr.Layout(x=(j % PER_ROW) * PANEL_W, y=(j // PER_ROW) * PANEL_H, w=PANEL_W, h=PANEL_H)


def _plain_groups(regex: str | None) -> str | None:
    """Python's named groups (?P<layer>...) as plain groups. `(?P<` is Python syntax that JavaScript
    and other regex engines W&B may match with reject; the group names travel in the carrier instead."""
    return None if regex is None else re.sub(r"\(\?P<[A-Za-z_][A-Za-z0-9_]*>", "(", regex)


def _wandb_panel(p: Panel, layout: wr.Layout):
    """Our panel as a wandb-workspaces panel object."""
    if p.kind in ("line", "histogram", "heatmap"):
        return wr.LinePlot(title=p.title, x=p.x, y=list(p.metrics), metric_regex=_plain_groups(p.regex),
                           layout=layout)
    if p.kind == "bar":
        return wr.BarPlot(title=p.title, metrics=list(p.metrics), orientation="v", layout=layout)
    if p.kind == "table":
        return wr.WeavePanelSummaryTable(table_name=p.metrics[0], layout=layout)
    if p.kind == "image":
        return wr.MediaBrowser(title=p.title, media_keys=list(p.metrics), layout=layout)
    raise TemplateError(f"panel {p.title!r}: no W&B rendering for kind {p.kind!r}")


def _name(metric) -> str:
    """A metric as its name: loaded panels hold wr.Metric objects, fresh ones plain strings."""
    return str(getattr(metric, "name", metric))


def _our_panel(panel) -> dict:
    """What a wandb-workspaces panel says about our fields, as a panel dict (kind guessed)."""
    if isinstance(panel, wr.LinePlot):
        d = {"kind": "line", "title": panel.title, "x": _name(panel.x)}
        if panel.metric_regex:
            d["regex"] = panel.metric_regex
        else:
            d["metrics"] = [_name(m) for m in panel.y]
        return d
    if isinstance(panel, wr.BarPlot):
        return {"kind": "bar", "title": panel.title, "metrics": [_name(m) for m in panel.metrics]}
    if isinstance(panel, wr.WeavePanelSummaryTable):
        return {"kind": "table", "title": None, "metrics": [panel.table_name]}
    if isinstance(panel, wr.MediaBrowser):
        return {"kind": "image", "title": panel.title, "metrics": list(panel.media_keys)}
    raise TemplateError(f"W&B panel {type(panel).__name__} (id {getattr(panel, '_id', '?')}) has no "
                        "aquainterp panel kind")


def _through_model(panel):
    """The panel after a trip through W&B's JSON model: what a saved workspace gives back."""
    return _lookup_panel(type(panel._to_model()).model_validate(panel._to_model().model_dump()))


def template_to_workspace(template: Template, entity: str, project: str) -> ws.Workspace:
    """The W&B workspace for a template, plus the carrier section for what W&B cannot hold."""
    sections, extras = [], {}
    for i, section in enumerate(template.sections):
        panels = []
        for j, p in enumerate(section.panels):
            panel = _wandb_panel(p, _layout(j))
            panel._id = f"aq-{i}-{j}"
            ours, back = p.to_dict(), _our_panel(_through_model(panel))
            lost = {k: v for k, v in ours.items() if back.get(k) != v}
            if lost:
                extras[panel._id] = lost
            panels.append(panel)
        sections.append(ws.Section(name=section.name, panels=panels, is_open=True))
    carried = {"aquainterp_template": template.name, "version": template.version,
               "description": template.description, "panels": extras}
    text = (f"Made by `aquainterp dashboard push` from the template **{template.name}** "
            f"(schema version {template.version}): {template.description}\n\n"
            "Edit the template file, not this workspace. The block below keeps what W&B panels have "
            "no field for, so `aquainterp dashboard load` can rebuild the template exactly.\n\n"
            f"```json\n{json.dumps(carried, indent=1, sort_keys=True)}\n```")
    note = wr.MarkdownPanel(markdown=text, layout=wr.Layout(x=0, y=0, w=24, h=8))
    note._id = "aq-template"
    sections.append(ws.Section(name=CARRIER_SECTION, panels=[note], is_open=False))
    return ws.Workspace(entity=entity, project=project, name=template.title, sections=sections)


def workspace_model(template: Template, entity: str, project: str) -> dict:
    """The JSON-ready W&B view model of the template's workspace (no network)."""
    view = template_to_workspace(template, entity, project)._to_model()
    return view.model_dump(mode="json", by_alias=True)


def workspace_json(template: Template, entity: str, project: str) -> str:
    return json.dumps(workspace_model(template, entity, project), indent=2, sort_keys=True) + "\n"


def template_from_model(model: dict, where: str = "workspace JSON") -> Template:
    """Rebuild our template from a W&B view model (as written by export, or fetched from W&B)."""
    try:
        view = ws_internal.View.model_validate(model)
    except Exception as e:
        raise TemplateError(f"{where}: not a W&B workspace view model ({type(e).__name__}: "
                            f"{str(e).splitlines()[0]})") from None
    workspace = ws.Workspace._from_model(view)
    carried: dict = {}
    sections = []
    for section in workspace.sections:
        if section.name == CARRIER_SECTION:
            for panel in section.panels:
                m = CARRIER_RE.search(getattr(panel, "markdown", "") or "")
                if m:
                    carried = json.loads(m.group("json"))
            continue
        sections.append(section)
    extras = carried.get("panels", {})
    name = carried.get("aquainterp_template") or re.sub(r"[^a-z0-9]+", "_", workspace.name.lower()).strip("_")
    template = {"version": carried.get("version", 1), "name": name, "title": workspace.name,
                "description": carried.get("description", ""), "sections": []}
    for section in sections:
        panels = []
        for panel in section.panels:
            d = _our_panel(panel)
            d.update(extras.get(panel._id, {}))
            if d["kind"] not in ("line", "heatmap", "histogram"):
                d.pop("x", None)
            panels.append({k: v for k, v in d.items() if v is not None})
        template["sections"].append({"name": section.name, "panels": panels})
    return Template.from_dict(template, where)
