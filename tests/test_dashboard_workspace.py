"""dashboards.workspace + `aquainterp dashboard`: W&B workspace JSON (golden files), lossless round trip,
the CLI's export/load/push messages. Regenerate the golden files only on purpose:

    AQUAINTERP_UPDATE_GOLDEN=1 .venv/bin/pytest tests/test_dashboard_workspace.py
"""

import json
import os
import re
import tomllib
from importlib.metadata import version
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aquainterp.cli.main import main
from dashboards.cli import push_blocker
from dashboards.template import KINDS, Template, TemplateError, all_templates, template_names
from dashboards.workspace import CARRIER_SECTION, template_from_model, workspace_json, workspace_model

REPO = Path(__file__).resolve().parents[1]
GOLDEN = REPO / "tests" / "golden" / "dashboards"
UPDATE = os.environ.get("AQUAINTERP_UPDATE_GOLDEN") == "1"


def test_pinned_versions_match_the_golden_files():
    """Golden JSON is W&B's model as wandb-workspaces 0.4.13 writes it: a version bump must be deliberate."""
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = dict(d.split("==") for d in deps if "==" in d)
    assert version("wandb-workspaces") == pins["wandb-workspaces"], "regenerate tests/golden/dashboards"
    assert version("wandb") == pins["wandb"]


@pytest.mark.parametrize("name", template_names())
def test_workspace_json_matches_golden(name):
    template = [t for t in all_templates() if t.name == name][0]
    text = workspace_json(template, "aquainterp", "aquainterp")
    path = GOLDEN / f"{name}.workspace.json"
    if UPDATE:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert path.is_file(), f"missing golden file {path}; run with AQUAINTERP_UPDATE_GOLDEN=1 once"
    assert text == path.read_text(), f"{path} differs from the export (AQUAINTERP_UPDATE_GOLDEN=1 to accept)"


@pytest.mark.parametrize("name", template_names())
def test_round_trip_is_lossless(name):
    template = [t for t in all_templates() if t.name == name][0]
    model = json.loads(json.dumps(workspace_model(template, "e", "p")))  # through JSON text, as on disk
    assert template_from_model(model).to_dict() == template.to_dict()


def test_workspace_uses_native_wandb_panels_and_carries_only_what_wandb_lacks():
    model = workspace_model([t for t in all_templates() if t.name == "attention"][0], "e", "p")
    sections = model["spec"]["section"]["panelBankConfig"]["sections"]
    assert [s["name"] for s in sections] == ["Entropy", "Option mass", "Patterns", "Completion mass", CARRIER_SECTION]
    heat = sections[0]["panels"][1]
    assert heat["viewType"] == "Run History Line Plot"
    assert heat["config"]["metricRegex"] == r"attn/entropy/layer(\d+)/head(\d+)"  # JavaScript-safe
    assert heat["config"]["xAxis"] == "rl/step" and heat["config"]["chartTitle"] == "Entropy by layer and head"
    assert sections[2]["panels"][0]["viewType"] == "Media Browser"
    note = sections[4]["panels"][0]["config"]["value"]
    carried = json.loads(re.search(r"```json\n(.*?)\n```", note, re.S).group(1))
    # titles, metrics, regexes and x-axes live in W&B's own fields; a heatmap's kind and group names do not
    assert carried["panels"] == {
        "aq-0-1": {"kind": "heatmap", "regex": r"attn/entropy/layer(?P<layer>\d+)/head(?P<head>\d+)"},
        "aq-1-1": {"kind": "heatmap", "regex": r"attn/option_mass/layer(?P<layer>\d+)/head(?P<head>\d+)"},
        "aq-3-1": {"kind": "heatmap", "regex": r"attn/completion_mass/layer(?P<layer>\d+)/head(?P<head>\d+)"}}
    assert "(?P<" not in json.dumps([p["config"].get("metricRegex") for s in sections for p in s["panels"]
                                     if "config" in p and isinstance(p["config"], dict)])
    assert carried["aquainterp_template"] == "attention" and carried["version"] == 1


def test_load_rejects_what_is_not_a_workspace():
    with pytest.raises(TemplateError, match="x.json: not a W&B workspace view model"):
        template_from_model({"spec": 3}, "x.json")


def panel_strategy():
    name = st.from_regex(r"[a-z]{1,6}/[a-z_]{1,8}", fullmatch=True)
    title = st.text(st.characters(min_codepoint=32, max_codepoint=0x2FF), min_size=1, max_size=20).filter(str.strip)
    x = st.sampled_from(["Step", "rl/step", "train/step"])

    def build(kind, title, names, x):
        if kind in ("line",):
            return {"kind": kind, "title": title, "metrics": names, "x": x}
        if kind == "heatmap":
            return {"kind": kind, "title": title, "regex": r"attn/e/l(?P<l>\d+)/h(?P<h>\d+)", "x": x}
        if kind == "histogram":
            return {"kind": kind, "title": title, "metrics": names[:1], "x": x}
        if kind == "bar":
            return {"kind": kind, "title": title, "metrics": names}
        return {"kind": kind, "title": title, "metrics": names[:1]}

    return st.builds(build, st.sampled_from(KINDS), title, st.lists(name, min_size=1, max_size=4, unique=True), x)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sections=st.lists(st.lists(panel_strategy(), min_size=1, max_size=4), min_size=1, max_size=3),
       description=st.text(max_size=40))
def test_round_trip_property(sections, description):
    """Any valid template (unicode titles, any kind mix) survives template -> W&B JSON -> template."""
    seen, body = set(), []
    for i, panels in enumerate(sections):
        kept = [p for p in panels if not (p["title"] in seen or seen.add(p["title"]))]
        if kept:
            body.append({"name": f"section {i}", "panels": kept})
    if not body:
        return
    template = Template.from_dict({"version": 1, "name": "prop", "title": "Property test", "description": description,
                                   "sections": body})
    model = json.loads(json.dumps(workspace_model(template, "e", "p")))
    assert template_from_model(model).to_dict() == template.to_dict()


def test_cli_export_then_load(tmp_path, capsys):
    assert main(["dashboard", "export", "--template", "all", "-o", str(tmp_path / "ws")]) == 0
    for t in all_templates():
        out = tmp_path / f"{t.name}.template.json"
        assert main(["dashboard", "load", str(tmp_path / "ws" / f"{t.name}.json"), "-o", str(out)]) == 0
        assert json.loads(out.read_text()) == t.to_dict()
    assert main(["dashboard", "export", "--template", "mode_collapse"]) == 0  # stdout
    printed = capsys.readouterr().out
    assert json.loads(printed)["displayName"] == "Mode collapse"
    assert main(["dashboard", "export", "--template", "pie_charts"]) == 2
    assert "no dashboard template named 'pie_charts'" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text("[1,")
    assert main(["dashboard", "load", str(tmp_path / "bad.json")]) == 2
    assert "bad.json: not valid JSON" in capsys.readouterr().err


def test_push_says_why_it_cannot_run_without_network_calls(tmp_path, capsys, monkeypatch):
    assert "WANDB_MODE=offline" in push_blocker({"WANDB_MODE": "offline", "WANDB_API_KEY": "k" * 40})
    assert "WANDB_MODE=disabled" in push_blocker({"WANDB_MODE": "disabled"})
    home = tmp_path / "home"
    home.mkdir()
    msg = push_blocker({"HOME": str(home)})
    assert msg.startswith("not logged in to W&B: no WANDB_API_KEY and no entry for api.wandb.ai in ~/.netrc")
    (home / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
    assert push_blocker({"HOME": str(home)}) is None
    assert push_blocker({"WANDB_API_KEY": "k" * 40}) is None

    monkeypatch.setenv("WANDB_MODE", "offline")
    assert main(["dashboard", "push", "--template", "rl_overview", "--entity", "e", "--project", "p"]) == 2
    err = capsys.readouterr().err
    assert "dashboard push needs W&B online, but WANDB_MODE=offline" in err and "dashboard export" in err
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "nobody"))
    assert main(["dashboard", "push", "--template", "rl_overview", "--entity", "e", "--project", "p"]) == 2
    assert "not logged in to W&B" in capsys.readouterr().err
    # logged in but the server is unreachable: a fast connection refusal, no traffic anywhere else
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    assert main(["dashboard", "push", "--template", "rl_overview", "--entity", "e", "--project", "p"]) == 2
    assert "cannot reach W&B at 127.0.0.1:9" in capsys.readouterr().err
