"""What the demo prints and records: the console summary after the last stage, and the GRPO headline
(accuracies, probe rows, the "Is the rationale used?" rows) read back from the RL stage's metrics.jsonl.
training/demo.py runs the stages; training/demo_tables.py turns a summary.json into the docs' tables.
"""

from __future__ import annotations

import json
from pathlib import Path


def say(message: str) -> None:
    print(f"\n\033[1m==> {message}\033[0m", flush=True)


def floats(metrics: dict) -> dict:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, int | float)}


HEADLINE_EVAL = {"greedy": "eval/synthetic_acc", "sampled": "eval/synthetic_sampled_acc", "pass@k": "rl/pass@k",
                 "categorical": "eval/synthetic_categorical_acc"}
HEADLINE_PROBES = {"gold_margin": "rl/letter_gold_margin_mean", "letter_kl": "rl/kl_letter_mean",
                   "sequence_kl": "rl/kl_sequence_mean", "option_mass": "attn/option_mass_mean",
                   "gold_option_mass": "attn/gold_option_mass_mean", "entropy": "attn/entropy_mean",
                   "no_answer": "rl/probe_no_answer_frac"}
# Is the rationale used? (probes/faith.py, probes/consistency.py): label, metric, format; first probe step
# (the SFT policy) and last (after GRPO). The pre-reasoning probe rows are added per layer.
FAITH_ROWS = (("answer right, follows its rationale", "faith/consistency/right_consistent", ".3f"),
              ("answer right, rationale says otherwise", "faith/consistency/right_inconsistent", ".3f"),
              ("answer wrong, follows a wrong rationale", "faith/consistency/wrong_consistent", ".3f"),
              ("answer wrong, not what the rationale says", "faith/consistency/wrong_inconsistent", ".3f"),
              ("completions with no computed value", "faith/consistency/no_value_frac", ".3f"),
              ("completions with a false arithmetic step", "faith/consistency/arith_error_frac", ".3f"),
              ("early answer = final, after 0% of reasoning", "faith/early_answer_match/p0", ".3f"),
              ("early answer = final, after 25% of reasoning", "faith/early_answer_match/p25", ".3f"),
              ("early answer = final, after 50% of reasoning", "faith/early_answer_match/p50", ".3f"),
              ("early answer = final, after 75% of reasoning", "faith/early_answer_match/p75", ".3f"),
              ("early answer = final, after 100% of reasoning", "faith/early_answer_match/p100", ".3f"),
              ("early answering area over the curve", "faith/early_answer_aoc", ".3f"),
              ("inserted mistake: answer follows it", "faith/mistake_follow_frac", ".3f"),
              ("inserted mistake: answer changes", "faith/mistake_change_frac", ".3f"),
              ("option shuffle: same content chosen", "faith/shuffle_content_consistency", ".3f"),
              ("pre-reasoning probe: majority baseline", "faith/prereasoning_probe_baseline", ".3f"))


def headline(metrics_path: Path) -> dict:
    """The demo's story in numbers, read back from the RL stage's metrics.jsonl (what the dashboards plot):
    held-out accuracy at the first eval (the SFT policy, step 0) and at the last (after GRPO), every eval of
    the greedy accuracy on the way, and each probe's value at the first and the last probe step."""
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    out: dict = {}
    evals = [row for row in rows if HEADLINE_EVAL["greedy"] in row]
    if evals:
        for name, key in HEADLINE_EVAL.items():
            out[f"{name}_before"], out[f"{name}_after"] = evals[0].get(key), evals[-1].get(key)
        out["eval_steps"] = [row["step"] for row in evals]
        out["greedy_by_step"] = [row[HEADLINE_EVAL["greedy"]] for row in evals]
        out["gain_points"] = round(100 * (out["greedy_after"] - out["greedy_before"]), 1)
    for name, key in HEADLINE_PROBES.items():
        logged = [row for row in rows if key in row]
        if logged:
            out[f"{name}_first"], out[f"{name}_last"] = logged[0][key], logged[-1][key]
            out["probe_steps"] = [row["step"] for row in logged]
    faith = [row for row in rows if "faith/early_answer_match/p100" in row]  # probe runs with the faith family
    if faith:
        keys = [k for k in faith[-1] if k.startswith("faith/") and not k.startswith("faith/rollout_")]
        out["faith"] = {"steps": [faith[0]["step"], faith[-1]["step"]],
                        "first": {k: faith[0].get(k) for k in keys}, "last": {k: faith[-1][k] for k in keys}}
    return out


def format_value(value, fmt: str = ".3f") -> str:
    """A headline number as the summary and the docs' tables print it; "—" when it was not logged."""
    return "—" if value is None else format(value, fmt)


def faith_rows(h: dict) -> list[tuple[str, str, str]]:
    """(label, SFT policy, after GRPO) formatted, for every faith metric a headline holds: FAITH_ROWS, then
    the pre-reasoning probe per layer. The console summary and the docs' table (training.demo_tables)."""
    if "faith" not in h:
        return []
    first, last = h["faith"]["first"], h["faith"]["last"]
    rows = list(FAITH_ROWS)
    layers = sorted((k for k in last if k.startswith("faith/prereasoning_probe_acc/layer")),
                    key=lambda k: int(k.rsplit("layer", 1)[1]))
    rows += [(f"pre-reasoning probe accuracy, layer {k.rsplit('layer', 1)[1]}", k, ".3f") for k in layers]
    return [(label, format_value(first.get(key), fmt), format_value(last[key], fmt))
            for label, key, fmt in rows if key in last]


def faith_lines(h: dict) -> list[str]:
    """The faith table (SFT policy at the first probe step, after GRPO at the last): is the rationale used?"""
    rows = faith_rows(h)
    if not rows:
        return []
    return ([f"{'is the rationale used? (probe set, greedy)':46s}{'SFT policy':>11s}{'after GRPO':>12s}"]
            + [f"{label:46s}{first:>11s}{last:>12s}" for label, first, last in rows])


def headline_lines(h: dict) -> list[str]:
    """The demo's table: the same numbers as summary.json's "headline" (and the demo table in README.md and docs/demo.md)."""
    if "greedy_before" not in h:
        return ["(no held-out evaluation logged)"]
    num = format_value
    lines = [f"{'':44s}{'SFT policy':>11s}{'after GRPO':>12s}",
             f"{'held-out greedy accuracy':44s}{num(h['greedy_before']):>11s}{num(h['greedy_after']):>12s}"
             f"   {h['gain_points']:+.1f} points",
             f"{'held-out sampled accuracy (T=1)':44s}{num(h['sampled_before']):>11s}{num(h['sampled_after']):>12s}",
             f"{'held-out pass@k':44s}{num(h['pass@k_before']):>11s}{num(h['pass@k_after']):>12s}"]
    for label, name, fmt in (("gold letter margin at the answer step", "gold_margin", ".2f"),
                             ("letter KL vs the SFT policy (nats)", "letter_kl", ".4f"),
                             ("attention mass on the options", "option_mass", ".3f"),
                             ("attention entropy (mean over heads)", "entropy", ".3f"),
                             ("probe completions without an answer", "no_answer", ".3f")):
        if f"{name}_first" in h:
            lines.append(f"{label:44s}{num(h[f'{name}_first'], fmt):>11s}{num(h[f'{name}_last'], fmt):>12s}")
    return lines


def _panel(metric: str) -> str:
    """'Template › "panel title"' of the first shipped dashboard panel that plots `metric`."""
    import re

    from dashboards.template import all_templates

    for template in all_templates():
        for panel in template.panels:
            regex = getattr(panel, "regex", None)
            if metric in panel.metrics or (regex and re.fullmatch(regex, metric)):
                return f'{template.title} › "{panel.title}"'
    return metric


def what_to_look_at(r: dict) -> list[str]:
    """Where the demo's story shows: the dashboard panels of the RL gain and of the probe changes, and the
    patching cell that carries the decision."""
    h, p = r["headline"], r["patching"]
    lines = []
    if "greedy_before" in h:
        lines.append(f"  RL gain        {_panel(HEADLINE_EVAL['greedy'])}: eval/synthetic_acc "
                     + " -> ".join(f"{v:.2f}" for v in h["greedy_by_step"]) + f" at steps {h['eval_steps']}; "
                     f"{_panel('rl/mean_reward')} for the training reward")
    if "gold_margin_first" in h:
        lines.append(f"  probe change   {_panel(HEADLINE_PROBES['gold_margin'])}: "
                     f"{h['gold_margin_first']:.2f} -> {h['gold_margin_last']:.2f} logits")
    if "letter_kl_first" in h:
        lines.append(f"                 {_panel(HEADLINE_PROBES['letter_kl'])}: "
                     f"{h['letter_kl_first']:.4f} -> {h['letter_kl_last']:.4f} nats")
    if "option_mass_first" in h:
        lines.append(f"                 {_panel(HEADLINE_PROBES['option_mass'])} and "
                     f"{_panel('attn/option_mass/layer0/head0')}: "
                     f"{h['option_mass_first']:.3f} -> {h['option_mass_last']:.3f}")
    cell = None if p.get("skipped") else strongest_patch(p)
    if cell:
        lines.append(f"  patching       {p['html']}: {cell}")
    return lines


def strongest_patch(p: dict) -> str | None:
    """The single strongest cell of the component sweeps (heads, attention and MLP outputs) in words."""
    best = None
    for sweep, cell in p.get("strongest", {}).items():
        if "resid" in sweep:  # the residual stream carries everything at the decision token; not a component
            continue
        if best is None or abs(cell["value"]) > abs(best[1]["value"]):
            best = (sweep, cell)
    if best is None:
        return None
    sweep, cell = best
    where = ", ".join(f"{k} {v!r}" if k == "token" else f"{k} {v}" for k, v in cell.items() if k != "value")
    return f"{sweep} at {where} restores {cell['value']:.2f} of the clean-corrupted logit difference"


def print_summary(r: dict, root: Path) -> None:
    before, after = r["rl"]["before"], r["rl"]["after"]

    say(f"summary ({r['wall_seconds'] / 60:.1f} min; stage times in {root}/summary.json)")
    times = r.get("stage_seconds", {})
    cpu = r.get("stage_cpu_seconds", {})
    print("stage times   " + ", ".join(f"{name} {s:.1f} s" + (f" ({cpu[name]:.0f} s CPU)" if cpu.get(name) else "")
                                      for name, s in times.items() if s is not None)
          + f"; {r['numerics']['threads']} torch thread(s), MKL_CBWR={r['numerics']['mkl_cbwr']}")
    n = r["numerics"]
    if "cpu_vendor" in n:
        print(f"numerics      {n['cpu_vendor']} {n['cpu_model']} ({' '.join(n['cpu_flags'])}); torch {n['torch']}, "
              f"MKL {n['mkl']}, oneDNN {n['onednn']}, ATen kernels {n['cpu_capability']}")
    source = r.get("source") or {}
    if source.get("commit"):
        print(f"source        commit {source['commit'][:12]}" + (" with uncommitted changes" if source["dirty"] else ""))
    bpt = r["tokenizer"]["bytes_per_token"].get("synthetic")
    print(f"tokenizer     {bpt:.2f} bytes/token on held-out synthetic text" if bpt else "tokenizer     trained")
    print(f"base          final train loss {r['base']['metrics'].get('train/loss', float('nan')):.3f}")
    print(f"SFT           categorical {r['sft']['categorical_acc']:.3f}, generative {r['sft']['generative_acc']:.3f}")
    for label, d in (("before RL", before), ("after RL ", after)):
        cat, gen = d.get("eval/synthetic_categorical_acc"), d.get("eval/synthetic_acc")
        print(f"{label}     categorical {cat:.3f}, generative {gen:.3f}, pass@k {d.get('rl/pass@k', float('nan')):.3f}")
    # probes log on their own cadence, not in the per-step history: read their first and last values back
    first, last = _probe_metrics(root / "rl" / "metrics.jsonl")
    for line in probe_summary(first, last):
        print(line)
    p = r["patching"]
    if p.get("skipped"):
        print(f"patching      skipped: {p['skipped']}")
    else:
        print(f"patching      {p['n_pairs']} pairs, clean logit diff {p['clean_logit_diff_mean']:.3f}, corrupted "
              f"{p['corrupted_logit_diff_mean']:.3f}"
              + (" (every pair failed the pair screen: all patched, flagged on the page)" if p.get("kept_all") else ""))
    print(f"\nthe GRPO stage in numbers ({root}/rl/metrics.jsonl; probe rows: first and last probe step)")
    for line in headline_lines(r["headline"]):
        print("  " + line)
    faith = faith_lines(r["headline"])
    if faith:
        print(f"\nis the rationale used? ({_panel('faith/early_answer_aoc').split(' › ')[0]} dashboard; docs/probes.md "
              "'Is the rationale used?' says how each is measured)")
        for line in faith:
            print("  " + line)
    print("\nartifacts")
    print(f"  metrics          {root}/rl/metrics.jsonl")
    print(f"  offline W&B run  {root}/rl/wandb/  (sync later: wandb sync {root}/rl/wandb/offline-run-*)")
    print(f"  dashboard        {r['dashboards']['report']}")
    print(f"  workspace JSON   {Path(r['dashboards']['workspaces'][0]).parent}/")
    if not p.get("skipped"):
        print(f"  patching         {p['html']}")
    print(f"  checkpoints      {root}/{{base,sft,rl}}/checkpoints/")
    print("\nnext")
    print("  push the templates to W&B (needs network + `wandb login`):")
    print("    aquainterp dashboard push --template all --entity YOUR_ENTITY --project YOUR_PROJECT")
    print("  the same pipeline at depth 20 on 8×H100:")
    print("    WANDB_RUN=d20 bash training/speedrun.sh")
    print(f"\nwhat to look at (dashboard: {r['dashboards']['report']})")
    for line in what_to_look_at(r):
        print(line)


def _probe_metrics(path: Path) -> tuple[dict, dict]:
    """(first, last) logged value of each probe metric in metrics.jsonl (probes log on their own cadence)."""
    first: dict = {}
    last: dict = {}
    if not path.exists():
        return first, last
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        for k, v in row.items():
            if k.startswith(("rl/kl_", "rl/letter_", "rl/probe_", "rl/rollout_", "probe/")) \
                    and isinstance(v, int | float) and not isinstance(v, bool):
                first.setdefault(k, v)
                last[k] = v
    return first, last


def probe_summary(first: dict, last: dict) -> list[str]:
    """The summary's probe lines: what the probes read at the answer step of the policy's own greedy
    completions on the probe set, at the first and the last probe step of the RL stage."""
    def pair(name: str, fmt: str) -> str | None:
        if name not in last:
            return None
        return f"{format(first[name], fmt)} -> {format(last[name], fmt)}"

    lines = []
    gold = pair("rl/letter_gold_margin_mean", ".2f")
    if gold is not None:
        lines.append(f"probes        gold letter margin {gold} logits at the answer step of the policy's own "
                     f"greedy completions (first -> last probe step)")
    agree, no_answer = pair("rl/probe_decision_agreement", ".0%"), pair("rl/probe_no_answer_frac", ".0%")
    if agree is not None:
        lines.append(f"              top letter logit = letter written: {agree}; completions without an answer: "
                     f"{no_answer}")
    lens = sorted((k for k in last if k.startswith("probe/logit_lens_gold_margin/layer")),
                  key=lambda k: int(k.rsplit("layer", 1)[1]))
    if lens:
        lines.append("              logit lens, gold margin by layer (last probe step): "
                     + ", ".join(f"L{k.rsplit('layer', 1)[1]} {last[k]:.2f}" for k in lens))
    kl, seq_kl = last.get("rl/kl_letter_mean"), last.get("rl/kl_sequence_mean")
    lines.append(f"KL drift      letter {kl:.4f}, sequence {seq_kl:.4f} (nats, vs the pre-RL policy, last probe step)"
                 if kl is not None and seq_kl is not None else "KL drift      (no probe step logged)")
    return lines
