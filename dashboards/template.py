"""Dashboard templates: our own small, versioned JSON schema, validated on load.

A template says which metrics to look at and how, independent of where it is drawn (a W&B workspace
by dashboards/workspace.py, a self-contained HTML page by dashboards/html.py):

    {"version": 1, "name": "rl_overview", "title": "RL overview", "description": "...",
     "sections": [{"name": "Reward", "panels": [
         {"kind": "line", "title": "Accuracy", "metrics": ["rl/acc"], "x": "rl/step"},
         {"kind": "heatmap", "title": "Entropy", "regex": "attn/entropy/layer(?P<layer>\\d+)/head(?P<head>\\d+)",
          "x": "rl/step"}]}]}

Panel kinds and what they read:
    line       scalar series over x: `metrics` (names) or `regex` (every matching name)
    bar        latest value of each of `metrics` (e.g. predicted-letter counts A..E)
    heatmap    scalars named by a `regex` with two named groups (rows, columns): one grid per step; or with
               one named group (rows): a rows x steps grid (e.g. the logit lens, layer x step)
    histogram  one metric logged with Logger.log_histogram
    table      one metric logged with Logger.log_table
    image      one metric logged with Logger.log_figure
`x` is the step metric a line/heatmap/histogram plots against: "<family>/step" (the Logger's
define_metric axes) or "Step" (W&B's own counter). Files live in dashboards/templates/<name>.json.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from dashboards.safe_regex import safe_compile

SCHEMA_VERSION = 1
TEMPLATE_DIR = Path(__file__).parent / "templates"
KINDS = ("line", "bar", "heatmap", "histogram", "table", "image")
SINGLE_METRIC_KINDS = ("histogram", "table", "image")
X_KINDS = ("line", "heatmap", "histogram")  # kinds drawn against a step axis
NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")
X_RE = re.compile(r"^(Step|[A-Za-z0-9_]+/step)$")
MAX_TEMPLATE_BYTES = 1 << 20  # the shipped templates are a few KB
MAX_PANELS = 200  # a panel renders in ~30 ms: 200 is a few seconds; the shipped templates have at most 20


# The order a report asks its questions in, each with the shipped templates that answer it: the offline
# report (dashboards/html.py) and `--template all` follow it. A shipped template named nowhere here comes
# last, under "More", alphabetically; add a new template's name to its question to place it.
REPORT_ORDER: list[tuple[str, list[str]]] = [
    ("Is RL working?", ["rl_overview"]),
    ("What changed in the decision?", ["answer_confidence", "kl_telemetry", "mode_collapse"]),
    ("Where in the model?", ["attention", "logit_lens"]),
    ("How is the reasoning used?", ["reasoning_faithfulness"]),
    ("Drift across checkpoints", ["circuit_drift"]),
]


def report_groups(templates: list[Template]) -> list[tuple[str, list[Template]]]:
    """`templates` grouped by REPORT_ORDER's questions, in its order; the others under "More" at the end.
    Questions none of `templates` answers are left out."""
    placed = {name: i for i, (_, names) in enumerate(REPORT_ORDER) for name in names}
    rank = {name: j for _, names in REPORT_ORDER for j, name in enumerate(names)}
    groups: list[tuple[str, list[Template]]] = []
    for i, (question, _) in enumerate(REPORT_ORDER):
        members = sorted((t for t in templates if placed.get(t.name) == i), key=lambda t: rank[t.name])
        if members:
            groups.append((question, members))
    rest = sorted((t for t in templates if t.name not in placed), key=lambda t: t.name)
    if rest:
        groups.append(("More", rest))
    return groups


class TemplateError(ValueError):
    """A template that does not follow the schema; the message names the file and the field."""


@dataclass
class Panel:
    kind: str
    title: str
    metrics: list[str] = field(default_factory=list)
    regex: str | None = None
    x: str | None = None

    def to_dict(self) -> dict:
        d: dict = {"kind": self.kind, "title": self.title}
        if self.metrics:
            d["metrics"] = list(self.metrics)
        if self.regex is not None:
            d["regex"] = self.regex
        if self.x is not None:
            d["x"] = self.x
        return d

    def matches(self, names) -> list[str]:
        """The metric names this panel draws, in first-seen order, out of `names`."""
        if self.regex is not None:
            pattern = safe_compile(self.regex)  # restricted syntax, long names never match: always fast
            return [n for n in names if pattern.fullmatch(n)]
        wanted = set(self.metrics)
        return [n for n in names if n in wanted]


@dataclass
class Section:
    name: str
    panels: list[Panel]

    def to_dict(self) -> dict:
        return {"name": self.name, "panels": [p.to_dict() for p in self.panels]}


@dataclass
class Template:
    name: str
    title: str
    sections: list[Section]
    description: str = ""
    version: int = SCHEMA_VERSION

    def to_dict(self) -> dict:
        return {"version": self.version, "name": self.name, "title": self.title,
                "description": self.description, "sections": [s.to_dict() for s in self.sections]}

    @property
    def panels(self) -> list[Panel]:
        return [p for s in self.sections for p in s.panels]

    @classmethod
    def from_dict(cls, d, where: str = "template") -> Template:
        return _parse_template(d, where)


def _fail(where: str, message: str):
    raise TemplateError(f"{where}: {message}")


def _keys(d, where: str, required: set[str], optional: set[str]) -> None:
    if not isinstance(d, dict):
        _fail(where, f"must be a JSON object, got {type(d).__name__}")
    missing = sorted(required - d.keys())
    if missing:
        _fail(where, f"missing field(s) {', '.join(missing)}")
    unknown = sorted(d.keys() - required - optional)
    if unknown:
        _fail(where, f"unknown field(s) {', '.join(unknown)} (allowed: {', '.join(sorted(required | optional))})")


def _string(d: dict, key: str, where: str, allow_empty: bool = False) -> str:
    value = d[key]
    if not isinstance(value, str) or (not allow_empty and not value.strip()):
        _fail(where, f"'{key}' must be a non-empty string, got {value!r}")
    return value


def _parse_panel(d, where: str) -> Panel:
    _keys(d, where, {"kind", "title"}, {"metrics", "regex", "x"})
    kind = _string(d, "kind", where)
    if kind not in KINDS:
        _fail(where, f"'kind' must be one of {', '.join(KINDS)}, got {kind!r}")
    title = _string(d, "title", where)
    metrics = d.get("metrics", [])
    if not isinstance(metrics, list) or not all(isinstance(m, str) and m for m in metrics):
        _fail(where, f"'metrics' must be a list of metric names, got {metrics!r}")
    if len(set(metrics)) != len(metrics):
        _fail(where, f"'metrics' lists a name twice: {metrics}")
    regex = d.get("regex")
    if regex is not None:
        if not isinstance(regex, str) or not regex:
            _fail(where, f"'regex' must be a non-empty string, got {regex!r}")
        try:  # a restricted syntax that cannot backtrack catastrophically (dashboards/safe_regex.py)
            compiled = safe_compile(regex)
        except ValueError as e:
            _fail(where, f"'regex' {e}")
    if bool(metrics) == (regex is not None):
        _fail(where, "give exactly one of 'metrics' (a list of names) or 'regex'")
    if kind == "heatmap":
        if regex is None or len(compiled.groupindex) not in (1, 2) or compiled.groups != len(compiled.groupindex):
            _fail(where, "a heatmap needs a 'regex' with one or two named groups and no other groups: rows then "
                  r"columns, e.g. attn/entropy/layer(?P<layer>\d+)/head(?P<head>\d+), or rows against steps, "
                  r"e.g. probe/logit_lens_gold_margin/layer(?P<layer>\d+)")
    if kind == "bar" and regex is not None:
        _fail(where, "a bar panel takes an explicit 'metrics' list (W&B bar plots have no regex)")
    if kind in SINGLE_METRIC_KINDS and len(metrics) != 1:
        _fail(where, f"a {kind} panel shows exactly one metric in 'metrics', got {metrics or regex!r}")
    x = d.get("x")
    if kind in X_KINDS:
        if x is None:
            _fail(where, f"a {kind} panel needs 'x': the step metric it plots against, e.g. 'rl/step'")
        if not isinstance(x, str) or not X_RE.match(x):
            _fail(where, f"'x' must be 'Step' or '<family>/step' (e.g. 'rl/step'), got {x!r}")
    elif x is not None:
        _fail(where, f"a {kind} panel has no x-axis; remove 'x' ({x!r})")
    return Panel(kind=kind, title=title, metrics=list(metrics), regex=regex, x=x)


def _parse_template(d, where: str) -> Template:
    _keys(d, where, {"version", "name", "title", "sections"}, {"description"})
    version = d["version"]
    if version != SCHEMA_VERSION:
        _fail(where, f"'version' is {version!r}; this aquainterp reads schema version {SCHEMA_VERSION}")
    name = _string(d, "name", where)
    if not NAME_RE.match(name):
        _fail(where, f"'name' must be lower_snake_case (it is also the file name), got {name!r}")
    title = _string(d, "title", where)
    description = d.get("description", "")
    if not isinstance(description, str):
        _fail(where, f"'description' must be a string, got {description!r}")
    sections = d["sections"]
    if not isinstance(sections, list) or not sections:
        _fail(where, "'sections' must be a non-empty list")
    total = sum(len(s["panels"]) for s in sections if isinstance(s, dict) and isinstance(s.get("panels"), list))
    if total > MAX_PANELS:
        _fail(where, f"{total} panels; a template holds at most {MAX_PANELS} (split it into several templates)")
    parsed = []
    seen_titles: set[str] = set()
    for i, s in enumerate(sections):
        swhere = f"{where}: sections[{i}]"
        _keys(s, swhere, {"name", "panels"}, set())
        sname = _string(s, "name", swhere)
        panels = s["panels"]
        if not isinstance(panels, list) or not panels:
            _fail(swhere, "'panels' must be a non-empty list")
        ps = [_parse_panel(p, f"{swhere}.panels[{j}]") for j, p in enumerate(panels)]
        for j, p in enumerate(ps):
            if p.title in seen_titles:
                _fail(f"{swhere}.panels[{j}]", f"panel title {p.title!r} is used twice in the template")
            seen_titles.add(p.title)
        parsed.append(Section(name=sname, panels=ps))
    return Template(name=name, title=title, sections=parsed, description=description, version=version)


def load_template(path: str | Path) -> Template:
    """Read and validate one template file; errors name the file and the offending field."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_TEMPLATE_BYTES:
            raise TemplateError(f"{path}: {size:,} bytes; a template file holds at most {MAX_TEMPLATE_BYTES:,}")
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TemplateError(f"{path}: no such template file") from None
    except json.JSONDecodeError as e:
        raise TemplateError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    except RecursionError:
        raise TemplateError(f"{path}: JSON nested too deeply to be a template") from None
    template = _parse_template(raw, str(path))
    if template.name != path.stem:
        raise TemplateError(f"{path}: 'name' is {template.name!r} but the file is named {path.name}; "
                            "they must agree")
    return template


def template_names() -> list[str]:
    """Names of the shipped templates (file stems in dashboards/templates)."""
    return sorted(p.stem for p in TEMPLATE_DIR.glob("*.json"))


def get_template(name: str) -> Template:
    """A shipped template by name ('rl_overview') or title ('RL overview'), or a path to a JSON file."""
    if name.endswith(".json") or "/" in name:
        return load_template(name)
    slug = re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")
    path = TEMPLATE_DIR / f"{slug}.json"
    if not path.is_file():
        raise TemplateError(f"no dashboard template named {name!r}; shipped: {', '.join(template_names())}")
    return load_template(path)


def all_templates() -> list[Template]:
    """Every shipped template, in report order (REPORT_ORDER, then the unplaced ones alphabetically)."""
    loaded = [load_template(TEMPLATE_DIR / f"{n}.json") for n in template_names()]
    return [t for _, group in report_groups(loaded) for t in group]
