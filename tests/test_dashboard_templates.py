"""dashboards.template: the shipped templates validate, bad ones fail with the file and field named."""

import copy
import json
import re

import pytest

from dashboards.template import (
    KINDS,
    REPORT_ORDER,
    TEMPLATE_DIR,
    Template,
    TemplateError,
    all_templates,
    get_template,
    load_template,
    report_groups,
    template_names,
)

GOOD = {"version": 1, "name": "t", "title": "T", "sections": [
    {"name": "S", "panels": [{"kind": "line", "title": "acc", "metrics": ["rl/acc"], "x": "rl/step"}]}]}


def test_shipped_templates_cover_the_issue():
    assert {"answer_confidence", "attention", "circuit_drift", "kl_telemetry", "logit_lens", "mode_collapse",
            "rl_overview"} <= set(template_names())
    by_name = {t.name: t for t in all_templates()}
    assert {"RL overview", "KL telemetry", "Answer confidence", "Attention", "Logit lens", "Mode collapse",
            "Circuit drift"} <= {t.title for t in by_name.values()}
    drift = [p.regex for p in by_name["circuit_drift"].panels if p.kind == "heatmap"]
    assert r"patch/denoise/z/layer(?P<layer>\d+)/head(?P<head>\d+)" in drift  # heads x step (patch --checkpoint-series)

    def names(t):
        return {m for p in t.panels for m in p.metrics}

    assert {"rl/acc", "rl/mean_reward", "rl/pass@k", "rl/avg_completion_len"} <= names(by_name["rl_overview"])
    assert {"rl/kl_letter_mean", "rl/kl_sequence_mean"} <= names(by_name["kl_telemetry"])
    kinds = {p.kind for p in by_name["answer_confidence"].panels}
    assert kinds == {"line", "histogram", "table"}
    assert {"rl/letter_gold_margin_mean", "rl/rollout_letter_gold_margin_mean", "rl/probe_no_answer_frac",
            "rl/probe_decision_agreement"} <= names(by_name["answer_confidence"])
    lens = [p for p in by_name["logit_lens"].panels if p.kind == "heatmap"]
    assert [p.regex for p in lens] == [r"probe/logit_lens_gold_margin/layer(?P<layer>\d+)"]  # layer x step
    heat = [p for p in by_name["attention"].panels if p.kind == "heatmap"]
    assert {p.regex for p in heat} == {r"attn/entropy/layer(?P<layer>\d+)/head(?P<head>\d+)",
                                       r"attn/option_mass/layer(?P<layer>\d+)/head(?P<head>\d+)",
                                       r"attn/completion_mass/layer(?P<layer>\d+)/head(?P<head>\d+)"}
    bar = [p for p in by_name["mode_collapse"].panels if p.kind == "bar"][0]
    assert bar.metrics == [f"rl/letter_pred_counts/{L}" for L in "ABCDE"]
    assert {p.kind for t in by_name.values() for p in t.panels} == set(KINDS)  # every kind is shipped


def test_all_templates_come_in_the_order_a_researcher_asks():
    """RL overview first, then what changed in the decision, where in the model, how the reasoning is used,
    drift; a template REPORT_ORDER does not name comes after them under "More"."""
    order = [t.name for t in all_templates()]
    expected = ["rl_overview", "answer_confidence", "kl_telemetry", "mode_collapse", "attention", "logit_lens",
                "reasoning_faithfulness", "circuit_drift"]
    assert [n for n in order if n in expected] == [n for n in expected if n in template_names()]
    assert order[0] == "rl_overview"
    groups = report_groups(all_templates() + [Template.from_dict(GOOD)])
    assert [q for q, _ in groups][:3] == ["Is RL working?", "What changed in the decision?", "Where in the model?"]
    assert groups[-1][0] == "More" and [t.name for t in groups[-1][1]] == ["t"]
    assert [q for q, _ in REPORT_ORDER][-1] == "Drift across checkpoints"


def test_rl_panels_plot_against_the_rl_step():
    for t in all_templates():
        for p in t.panels:
            if p.x is not None and any(m.startswith(("rl/", "attn/", "probe/")) for m in p.metrics + [p.regex or ""]):
                assert p.x == "rl/step", (t.name, p.title)


def test_regex_panels_match_the_design_metric_names():
    att = get_template("Attention")  # titles work as names too
    per_head = [p for p in att.panels if p.kind == "line" and p.regex and "entropy" in p.regex][0]
    names = ["attn/entropy/layer0/head0", "attn/entropy/layer11/head5", "attn/entropy_mean",
             "attn/option_mass/layer0/head0"]
    assert per_head.matches(names) == ["attn/entropy/layer0/head0", "attn/entropy/layer11/head5"]


def broken(path_and_value):
    d = copy.deepcopy(GOOD)
    for keys, value in path_and_value:
        node = d
        for k in keys[:-1]:
            node = node[k]
        if value is KeyError:
            del node[keys[-1]]
        else:
            node[keys[-1]] = value
    return d


PANEL = ("sections", 0, "panels", 0)


@pytest.mark.parametrize("change, message", [
    ([(("version",), 2)], "'version' is 2; this aquainterp reads schema version 1"),
    ([(("name",), "Bad Name")], "'name' must be lower_snake_case"),
    ([(("sections",), [])], "'sections' must be a non-empty list"),
    ([(("colour",), "red")], "unknown field(s) colour"),
    ([(PANEL + ("kind",), "pie")], "sections[0].panels[0]: 'kind' must be one of line, bar, heatmap"),
    ([(PANEL + ("title",), KeyError)], "sections[0].panels[0]: missing field(s) title"),
    ([(PANEL + ("regex",), "rl/.*")], "give exactly one of 'metrics' (a list of names) or 'regex'"),
    ([(PANEL + ("metrics",), KeyError), (PANEL + ("regex",), "rl/(")], "'regex' 'rl/(' does not compile"),
    ([(PANEL + ("x",), KeyError)], "a line panel needs 'x'"),
    ([(PANEL + ("x",), "rl/steps")], "'x' must be 'Step' or '<family>/step'"),
    ([(PANEL + ("kind",), "heatmap")], "a heatmap needs a 'regex' with one or two named groups"),
    ([(PANEL + ("kind",), "heatmap"), (PANEL + ("metrics",), KeyError), (PANEL + ("regex",), r"a/(?P<l>\d+)/(\d+)")],
     "a heatmap needs a 'regex' with one or two named groups and no other groups"),
    ([(PANEL + ("kind",), "table")], "a table panel has no x-axis"),
    ([(PANEL + ("kind",), "histogram"), (PANEL + ("metrics",), ["a/b", "a/c"])],
     "a histogram panel shows exactly one metric"),
    ([(PANEL + ("metrics",), ["rl/acc", "rl/acc"])], "'metrics' lists a name twice"),
])
def test_bad_templates_name_the_field(tmp_path, change, message):
    path = tmp_path / "t.json"
    path.write_text(json.dumps(broken(change)))
    with pytest.raises(TemplateError, match=re.escape(message)) as info:
        load_template(path)
    assert str(info.value).startswith(str(path))


def test_file_level_errors(tmp_path):
    (tmp_path / "t.json").write_text("{ nope")
    with pytest.raises(TemplateError, match=r"t.json: not valid JSON \(line 1"):
        load_template(tmp_path / "t.json")
    (tmp_path / "other.json").write_text(json.dumps(GOOD))
    with pytest.raises(TemplateError, match="'name' is 't' but the file is named other.json"):
        load_template(tmp_path / "other.json")
    with pytest.raises(TemplateError, match="no dashboard template named 'nope'; shipped: answer_confidence"):
        get_template("nope")
    dup = broken([(("sections",), GOOD["sections"] * 2)])
    with pytest.raises(TemplateError, match=r"sections\[1\].panels\[0\]: panel title 'acc' is used twice"):
        Template.from_dict(dup, "dup")


def test_to_dict_round_trips_every_shipped_template():
    for t in all_templates():
        raw = json.loads((TEMPLATE_DIR / f"{t.name}.json").read_text())
        assert t.to_dict() == raw
        assert Template.from_dict(t.to_dict()).to_dict() == raw
