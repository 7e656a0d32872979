"""The `aquainterp` command: one entry point, one subcommand per user task.

Subcommands are listed in COMMANDS by module name and imported only when run, so `aquainterp --help`
answers without importing torch. Each subcommand module defines:

    def add_arguments(parser: argparse.ArgumentParser) -> None
    def run(args: argparse.Namespace) -> int | None

Flags are kebab-case; the snake_case spelling is accepted too (nanochat scripts use both).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from aquainterp import __version__
from aquainterp.cli.args import OneLineParser, guarded, pop_debug

# name -> (module that implements it, one-line help). Only commands that exist are listed here.
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("training.demo", "the whole pipeline on a CPU in minutes: tokenizer, base, SFT, GRPO + probes, dashboards, patching"),
    "info": ("aquainterp.cli.info", "print versions, devices and the Rust core this install runs on"),
    "chat": ("aquainterp.chat", "talk to a checkpoint (ours or nanochat's) in the terminal, replies streamed as they are sampled"),
    "eval": ("aquainterp.evaluate", "accuracy of a checkpoint: synthetic/AQuA (categorical, generative, pass@k, confusion), nanochat's GSM8K, ARC, MMLU"),
    "patch": ("aquainterp.patching.command", "activation patching of a checkpoint: tensors, JSON, HTML heatmaps"),
    "export": ("aquainterp.checkpoints.huggingface", "write a checkpoint as an HF NanoChatForCausalLM directory (or --format nanochat: nanochat's own layout)"),
    "import-nanochat": ("aquainterp.checkpoints.nanochat", "convert a nanochat checkpoint (model_<step>.pt + meta + tokenizer.pkl) to an aquainterp checkpoint"),
    "dashboard": ("dashboards.cli", "dashboard templates: W&B workspace push/export/load, offline HTML report"),
}


def normalize_flag_spelling(argv: list[str]) -> list[str]:
    """Rewrite `--max_steps` to `--max-steps` (values after `=` are left alone)."""
    out = []
    for arg in argv:
        if arg.startswith("--") and len(arg) > 2:
            name, sep, value = arg[2:].partition("=")
            arg = "--" + name.replace("_", "-") + sep + value
        out.append(arg)
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="aquainterp",
        description="Train nanochat's GPT on AQuA-style multiple-choice math and look inside it: "
        "probes, W&B dashboards, activation patching.",
    )
    parser.add_argument("--version", action="version", version=f"aquainterp {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error (anywhere on the line)")
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    for name, (_module, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def subcommand_parser(name: str) -> tuple[argparse.ArgumentParser, object]:
    """(parser, module) of one subcommand, as `main` builds them."""
    module = importlib.import_module(COMMANDS[name][0])
    sub = OneLineParser(prog=f"aquainterp {name}", description=COMMANDS[name][1])
    module.add_arguments(sub)
    return sub, module


def main(argv: list[str] | None = None) -> int:
    """Arguments are checked before anything runs; errors end as one line on stderr: exit 2 for usage,
    1 for runtime failures, a traceback only with --debug (aquainterp.cli.args)."""
    argv, debug = pop_debug(list(sys.argv[1:] if argv is None else argv))
    argv = normalize_flag_spelling(argv)
    parser = build_parser()
    if not argv or argv[0] not in COMMANDS:
        args = parser.parse_args(argv)  # handles --help/--version/unknown commands
        parser.print_help()
        return 0 if args.command is None and not argv else 2
    name = argv[0]
    prog = f"aquainterp {name}"
    sub, module = subcommand_parser(name)
    try:
        args = sub.parse_args(argv[1:])
    except SystemExit as e:  # usage errors (one line already printed) and --help: a status, as below
        return e.code if isinstance(e.code, int) else 2
    return guarded(prog, lambda: module.run(args), debug)


if __name__ == "__main__":
    sys.exit(main())
