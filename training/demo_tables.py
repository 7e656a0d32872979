"""The demo's tables in the docs, generated from the demo's summary.json (never typed by hand).

    python -m training.demo_tables runs/demo/summary.json            # markdown, as the docs hold it

The headline table goes in README.md and docs/demo.md, the is-the-rationale-used table in docs/probes.md.
Each table has a column for the SFT policy (the first eval / probe step of the GRPO stage) and one for the
policy after GRPO (the last). tests/test_docs.py checks that those pages hold this output for the summary
committed in docs/demo/.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from training.demo_summary import faith_rows
from training.demo_summary import format_value as _num


def faith_markdown(summary: dict) -> str:
    rows = faith_rows(summary["headline"])
    if not rows:
        return ""
    steps = summary["headline"]["faith"]["steps"]
    lines = [f"| is the rationale used? | SFT policy (step {steps[0]}) | after GRPO (step {steps[1]}) |",
             "| --- | ---: | ---: |"]
    lines += [f"| {label} | {first} | {last} |" for label, first, last in rows]
    return "\n".join(lines)


def headline_markdown(summary: dict) -> str:
    h = summary["headline"]
    lines = ["| held-out | SFT policy | after GRPO | gain |", "| --- | ---: | ---: | ---: |",
             f"| greedy accuracy | {_num(h['greedy_before'], '.3f')} | {_num(h['greedy_after'], '.3f')} | "
             f"**{h['gain_points']:+.1f}** points |"]
    for name in ("sampled", "pass@k"):
        lines.append(f"| {name} | {_num(h[f'{name}_before'], '.3f')} | {_num(h[f'{name}_after'], '.3f')} | |")
    for label, name, fmt in (("gold letter margin at the answer step (logits)", "gold_margin", ".2f"),
                             ("letter KL vs the SFT policy (nats)", "letter_kl", ".4f")):
        if f"{name}_first" in h:
            lines.append(f"| {label} | {_num(h[f'{name}_first'], fmt)} | {_num(h[f'{name}_last'], fmt)} | |")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__.split("\n\n")[0]
    parser.add_argument("summary", type=Path, help="a demo's summary.json (runs/demo/summary.json)")
    parser.add_argument("--table", choices=("headline", "faith", "all"), default="all", help="which table to print")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.demo_tables")
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        summary = json.loads(args.summary.read_text())
    except (OSError, json.JSONDecodeError) as e:
        print(f"demo_tables: cannot read {args.summary}: {e}", file=sys.stderr)
        return 2
    if "headline" not in summary or "greedy_before" not in summary["headline"]:
        print(f"demo_tables: {args.summary} is not a demo summary (no 'headline')", file=sys.stderr)
        return 2
    if args.table in ("headline", "all"):
        print(headline_markdown(summary))
    if args.table in ("faith", "all"):
        print(("\n" if args.table == "all" else "") + faith_markdown(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
