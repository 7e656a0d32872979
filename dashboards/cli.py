"""`aquainterp dashboard <action>`: templates to W&B workspaces (push, export, load) and offline HTML.

    aquainterp dashboard list
    aquainterp dashboard export --template NAME|all [-o OUT]   workspace JSON, no network
    aquainterp dashboard load WORKSPACE.json [-o TEMPLATE.json] W&B workspace JSON -> our template
    aquainterp dashboard push --template NAME --entity E --project P   saved workspace on W&B (network)
    aquainterp dashboard html --run RUN_DIR --template NAME|all -o report.html [--screenshot PNG] [--first-view PNG]
    aquainterp dashboard sample --run RUN_DIR                  record a synthetic run to try the above
"""

from __future__ import annotations

import argparse
import json
import netrc
import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from dashboards.template import Template, TemplateError, all_templates, get_template, template_names

DEFAULT_BASE_URL = "https://api.wandb.ai"


@dataclass
class DashboardConfig:
    """One `aquainterp dashboard <action>` as a value: `run(DashboardConfig("html", run=RUN_DIR, output=...))`
    is the library entry (the demo calls it); the command line fills the same fields from the action's flags
    (add_arguments), the others keep these defaults. entity/project None: $WANDB_ENTITY / $WANDB_PROJECT or
    aquainterp, as the export flags."""

    action: str  # list | export | load | push | html | sample
    template: str = "all"
    entity: str | None = None
    project: str | None = None
    output: str | None = None
    workspace: str | None = None  # load: the workspace JSON to read
    run: str | None = None  # html: the run folder to report; sample: the folder to write
    source: str = "auto"
    screenshot: str | None = None
    first_view: str | None = None
    steps: int = 30
    mode: str = "disabled"
    overwrite: bool = False  # export/load/html: replace an output file (or folder's files) not written by it


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from aquainterp.cli.args import existing_path, positive_int
    from aquainterp.cli.rundir import output_path

    overwrite = "replace an output this command did not write, or that was edited since (never one of its inputs)"

    sub = parser.add_subparsers(dest="action", metavar="<action>", required=True)
    sub.add_parser("list", help="list the shipped templates")

    p = sub.add_parser("export", help="write a template's W&B workspace model as JSON (no network)")
    p.add_argument("--template", required=True, help="template name or title, a .json path, or 'all'")
    p.add_argument("--entity", help="W&B entity written into the workspace (default $WANDB_ENTITY or aquainterp)")
    p.add_argument("--project", help="W&B project written into the workspace (default $WANDB_PROJECT or aquainterp)")
    p.add_argument("-o", "--output", type=output_path("file|dir"),
                   help="output file (a folder for --template all); default stdout")
    p.add_argument("--overwrite", action="store_true", help=overwrite)

    p = sub.add_parser("load", help="read a W&B workspace JSON back into our template JSON")
    p.add_argument("workspace", type=existing_path("file"), help="workspace JSON written by export (or W&B's view model)")
    p.add_argument("-o", "--output", type=output_path("file"), help="template JSON to write; default stdout")
    p.add_argument("--overwrite", action="store_true", help=overwrite)

    p = sub.add_parser("push", help="save the template as a W&B workspace (needs network and a login)")
    p.add_argument("--template", required=True, help="template name or title, a .json path, or 'all'")
    p.add_argument("--entity", required=True, help="W&B entity (user or team) that owns the project")
    p.add_argument("--project", required=True, help="W&B project the workspace is saved in")

    p = sub.add_parser("html", help="self-contained plotly HTML report of a run")
    p.add_argument("--run", type=existing_path("dir"), required=True, help="run directory (metrics.jsonl and/or wandb/)")
    p.add_argument("--template", default="all", help="template name, or 'all' (default)")
    p.add_argument("-o", "--output", type=output_path("file"), required=True, help="HTML file to write")
    p.add_argument("--source", choices=("auto", "jsonl", "wandb"), default="auto",
                   help="read metrics.jsonl or the offline W&B run (auto: jsonl when present)")
    p.add_argument("--screenshot", type=output_path("file"),
                   help="also open the page in headless Chromium and save a PNG of the whole page here")
    p.add_argument("--first-view", type=output_path("file"),
                   help="also save a PNG of what a 1400 x 900 window shows on opening the page")
    p.add_argument("--overwrite", action="store_true", help=overwrite)

    p = sub.add_parser("sample", help="record a synthetic RL run through the Logger (for trying reports)")
    p.add_argument("--run", type=output_path("dir"), required=True,
                   help="run directory to write: a new or empty folder, or one sample wrote (never a real run)")
    p.add_argument("--steps", type=positive_int(1_000_000), default=30, help="RL steps to record (default 30)")
    p.add_argument("--mode", choices=("disabled", "offline"), default="disabled",
                   help="also write an offline W&B run (offline) or only metrics.jsonl (disabled)")


def _templates(name: str) -> list[Template]:
    return all_templates() if name == "all" else [get_template(name)]


def owner(action: str) -> str:
    return f"aquainterp dashboard {action}"


def _write(text: str, output: str | None, action: str) -> None:
    """stdout, or a file claimed before (aquainterp.cli.rundir.claim_output), written atomically and recorded."""
    from aquainterp.cli.rundir import write_output

    if output is None:
        sys.stdout.write(text)
    else:
        write_output(output, text, owner(action))
        print(f"wrote {output}", file=sys.stderr)


def push_blocker(environ=os.environ) -> str | None:
    """Why a push cannot work here, found without any network call; None when it may go ahead."""
    mode = environ.get("WANDB_MODE", "").lower()
    if mode in ("offline", "disabled", "dryrun"):
        return (f"dashboard push needs W&B online, but WANDB_MODE={mode}. Unset WANDB_MODE (or set it to "
                "online), or use `aquainterp dashboard export` to write the workspace JSON without network.")
    if environ.get("WANDB_DISABLED", "").lower() in ("true", "1"):
        return "dashboard push needs W&B, but WANDB_DISABLED is set. Unset it and run `wandb login`."
    base = environ.get("WANDB_BASE_URL", DEFAULT_BASE_URL)
    host = urlparse(base).hostname or base
    if not environ.get("WANDB_API_KEY") and not environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        try:
            path = environ.get("NETRC") or str(Path(environ.get("HOME", "~")).expanduser() / ".netrc")
            logged_in = netrc.netrc(path).authenticators(host) is not None
        except (FileNotFoundError, netrc.NetrcParseError, OSError):
            logged_in = False
        if not logged_in:
            return (f"not logged in to W&B: no WANDB_API_KEY and no entry for {host} in ~/.netrc. "
                    "Run `wandb login` (or set WANDB_API_KEY) and retry.")
    return None


def _reachable(base_url: str, timeout: float = 5.0) -> str | None:
    parsed = urlparse(base_url)
    host, port = parsed.hostname, parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
        return None
    except OSError as e:
        return (f"cannot reach W&B at {host}:{port} ({e}); dashboard push needs network. "
                "Use `aquainterp dashboard export` to write the workspace JSON offline.")


def run(config: DashboardConfig | argparse.Namespace) -> int:
    """Do `config.action`; 0, or after one line on stderr 2 (usage) or 1 (a failed push or page check).
    `aquainterp dashboard` passes its parsed flags (the same fields)."""
    from aquainterp.cli.args import one_line

    if isinstance(config, argparse.Namespace):
        config = DashboardConfig(**vars(config))
    try:
        return _run(config)
    except (TemplateError, FileNotFoundError, ValueError) as e:  # one line, as every command (cliargs)
        print(f"aquainterp dashboard {config.action}: error: {one_line(str(e))}", file=sys.stderr)
        return 2


def _run(args: DashboardConfig) -> int:
    if args.action == "list":
        for t in all_templates():
            print(f"{t.name:20s} {t.title} ({len(t.panels)} panels)")
        return 0

    if args.action == "export":
        from aquainterp.cli.rundir import claim_output
        from dashboards.workspace import workspace_json

        templates = _templates(args.template)
        entity = os.environ.get("WANDB_ENTITY", "aquainterp") if args.entity is None else args.entity
        project = os.environ.get("WANDB_PROJECT", "aquainterp") if args.project is None else args.project
        if len(templates) > 1 and args.output is None:
            raise ValueError("--template all writes one file per template: give a folder with -o")
        if args.output is not None:  # a file, or for --template all a folder; never over the template read
            claim_output(args.output, "-o", owner=owner("export"), kind="file" if len(templates) == 1 else "dir",
                         inputs=[args.template] if args.template.endswith(".json") else [],
                         overwrite=args.overwrite)
        if len(templates) == 1:
            _write(workspace_json(templates[0], entity, project), args.output, "export")
        else:
            for t in templates:
                _write(workspace_json(t, entity, project), str(Path(args.output) / f"{t.name}.json"), "export")
        return 0

    if args.action == "load":
        from aquainterp.cli.rundir import claim_output
        from dashboards.workspace import template_from_model

        path = Path(args.workspace)
        if args.output:  # never over the workspace being read, nor over a file load did not write
            claim_output(args.output, "-o", owner=owner("load"), kind="file", inputs=[path], overwrite=args.overwrite)
        try:
            model = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: not UTF-8 text (byte {e.start})") from None
        except RecursionError:
            raise ValueError(f"{path}: JSON nested too deeply to be a workspace") from None
        template = template_from_model(model, str(path))
        _write(json.dumps(template.to_dict(), indent=2) + "\n", args.output, "load")
        return 0

    if args.action == "push":
        template = get_template(args.template)  # bad names fail before anything else
        blocker = push_blocker() or _reachable(os.environ.get("WANDB_BASE_URL", DEFAULT_BASE_URL))
        if blocker:
            print(f"aquainterp dashboard push: {blocker}", file=sys.stderr)
            return 2
        from dashboards.workspace import template_to_workspace

        workspace = template_to_workspace(template, args.entity, args.project)
        try:
            workspace.save()
        except Exception as e:
            print(f"aquainterp dashboard push: W&B refused the workspace ({type(e).__name__}: {e})",
                  file=sys.stderr)
            return 1
        print(f"saved workspace {template.title!r} to {args.entity}/{args.project}: {workspace.url}")
        return 0

    if args.action == "html":
        from aquainterp.cli.rundir import claim_output, record_written
        from dashboards.html import write_html

        # never over the run's record or the template being read, nor over a file html did not write
        inputs = [Path(args.run) / "metrics.jsonl", Path(args.run) / "wandb", Path(args.run) / "media",
                  *([args.template] if args.template.endswith(".json") else [])]
        claim_output(args.output, "-o", owner=owner("html"), kind="file", inputs=inputs, overwrite=args.overwrite)
        for flag, shot in (("--screenshot", args.screenshot), ("--first-view", args.first_view)):
            if shot:
                claim_output(shot, flag, owner=owner("html"), kind="file", inputs=[*inputs, args.output],
                             overwrite=args.overwrite)
        templates = _templates(args.template)
        out = write_html(templates, args.run, args.output, args.source)
        record_written([out], owner("html"))
        text = out.read_text(encoding="utf-8")
        drawn, total = text.count("<div class='aq-panel"), sum(len(t.panels) for t in templates)
        print(f"wrote {out} ({drawn} of {total} panels drawn, the rest logged nothing and are named on the page; "
              f"{out.stat().st_size / 1e6:.1f} MB)")
        if args.screenshot or args.first_view:
            from dashboards.browser import inspect_page

            report = inspect_page(out, args.screenshot, first_view=args.first_view)
            shots = [str(p) for p in (report.screenshot, report.first_view) if p is not None]
            record_written(shots, owner("html"))
            print(f"chromium: {report.rendered}/{report.panels} panels rendered, "
                  f"{len(report.console_errors)} console errors, screenshot {' and '.join(shots)}")
            for err in report.console_errors:
                print(f"  {err}", file=sys.stderr)
            if report.console_errors or report.rendered != report.panels:
                return 1
        return 0

    if args.action == "sample":
        import shutil

        from aquainterp.cli.rundir import claim_output, record_written
        from dashboards.sample_run import record_sample_run

        if args.steps < 1:
            raise ValueError(f"--steps must be >= 1, got {args.steps}")
        # a new folder or an earlier sample's, never a real run (its rows would get synthetic ones appended)
        run = claim_output(args.run, "--run", owner=owner("sample"), kind="dir", overwrite=None)
        for name in ("metrics.jsonl", "media", "wandb"):  # the earlier sample's record, written by sample
            old = run / name
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old)
            elif old.exists() or old.is_symlink():
                old.unlink()
        record_sample_run(args.run, steps=args.steps, mode=args.mode)
        record_written([run], owner("sample"))
        print(f"recorded a synthetic run of {args.steps} steps in {args.run} (templates: {', '.join(template_names())})")
        return 0
    raise ValueError(f"unknown action {args.action!r}")
