"""Docs that cannot drift: docs/api.md's signatures exist in the code with the parameters it names,
every flag the README or a docs/ page shows for a command is one that command's --help lists, the README
stays a landing page (at most 200 lines), and every relative link in README.md and docs/*.md reaches an
existing file and heading.

api.md: each `## module` section's code block is read line by line; `class X`, `def f(...)` (top level or
indented under a class), `a.b.c(...)` and `.method(...)` under a dotted class are resolved with importlib and
their documented parameter names compared with inspect.signature. README.md and docs/*.md: every fenced
bash command (`python -m training.X`, `aquainterp X`, `python benchmarks/X.py`, `torchrun ... -m training.X`) is
parsed, and each `--flag` on it (snake_case spelling accepted, as the CLIs accept it) must appear in
that command's own --help.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import io
import re
import shlex
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _resolve(dotted: str, default_modules=()):
    """An object from a dotted name: absolute, under aquainterp., or inside one of the section's modules."""
    candidates = [dotted, f"aquainterp.{dotted}"]
    for name in candidates:
        parts = name.split(".")
        for cut in range(len(parts), 0, -1):
            try:
                obj = importlib.import_module(".".join(parts[:cut]))
            except ImportError:
                continue
            try:
                for attr in parts[cut:]:
                    obj = getattr(obj, attr)
                return obj
            except AttributeError:
                break
    for module in default_modules:
        obj = module
        for attr in dotted.split("."):
            obj = getattr(obj, attr, None)
            if obj is None:
                break
        if obj is not None:
            return obj
    return None


def _split_top(text: str) -> list[str]:
    depth, parts, current, quote = 0, [], "", None
    for ch in text:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if ch == "," and depth == 0 and not quote:
            parts.append(current)
            current = ""
        else:
            current += ch
    return parts + [current]


def _param_names(args: str) -> list[str]:
    names = []
    for part in _split_top(args):
        part = part.strip()
        if not part or part.startswith(("*", '"', "'")) or part == "..." or part[0].isdigit():
            continue
        m = IDENT.match(part)
        if m and m.group(0) not in ("self", "cls"):
            names.append(m.group(0))
    return names


def _call_args(text: str, start: int) -> str | None:
    """The text inside the parentheses that open at text[start] (may span lines), or None if unbalanced."""
    depth = 0
    for i in range(start, len(text)):
        if text[i] == "(":
            depth += 1
        elif text[i] == ")":
            depth -= 1
            if depth == 0:
                return text[start + 1 : i]
    return None


def _api_entries():
    """(where, object name, resolved object or None, documented parameter names or None)."""
    text = (REPO / "docs" / "api.md").read_text()
    entries = []
    for section in re.split(r"^## ", text, flags=re.M)[1:]:
        header, _, body = section.partition("\n")
        modules = []  # "## a.b, a.c (notes)": names are looked up in each listed module
        for module_name in re.findall(r"[A-Za-z_][\w.]*", header.split("(")[0]):
            try:
                modules.append(importlib.import_module(module_name))
            except ImportError:
                pass
        for block in re.findall(r"```python\n(.*?)```", body, re.S):
            owner = None  # the class whose methods the indented lines document
            for m in re.finditer(r"^(?P<indent>[ \t]*)(?P<kw>class |def )?(?P<name>\.?[A-Za-z_][\w.]*)"
                                 r"(?P<open>\(|:)?", block, re.M):
                indent, kw, name = m.group("indent"), m.group("kw"), m.group("name")
                where = f"docs/api.md ## {header.strip()}: {name}"
                if kw == "class ":
                    obj = _resolve(name, modules)
                    entries.append((where, name, obj, None))
                    owner = obj if not indent else owner
                    continue
                if m.group("open") != "(":
                    continue
                args = _call_args(block, m.end("open") - 1)
                if kw == "def ":
                    if indent and owner is not None:
                        obj = getattr(owner, name, None)
                    elif not indent:
                        owner = None
                        obj = _resolve(name, modules)
                    else:
                        continue
                elif name.startswith("."):
                    if owner is None:
                        continue
                    obj = getattr(owner, name[1:], None)
                elif "." in name and not indent:
                    obj = _resolve(name)
                    if inspect.isclass(obj):
                        owner = obj
                else:
                    continue
                entries.append((where, name, obj, _param_names(args) if args is not None else None))
    return entries


def test_api_md_names_exist_with_the_documented_parameters():
    problems = []
    entries = _api_entries()
    assert len(entries) > 60  # the parser really reads the page
    for where, _name, obj, params in entries:
        if obj is None:
            problems.append(f"{where}: no such object in the code")
            continue
        if not params:
            continue
        target = obj.__init__ if inspect.isclass(obj) else obj
        try:
            signature = inspect.signature(target)
        except (TypeError, ValueError):
            continue
        if any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values()):
            continue
        missing = [p for p in params if p not in signature.parameters]
        if missing:
            problems.append(f"{where}: documented parameters {missing} are not in {signature}")
    assert not problems, "\n".join(problems)


# ---- README flags --------------------------------------------------------------------------------------

def _help_text(command: tuple[str, ...]) -> str:
    """--help of one command, run in-process (argparse prints and exits)."""
    kind, *rest = command
    if kind == "training":
        main = importlib.import_module(f"training.{rest[0]}").main
        argv = ["--help"]
    elif kind == "benchmarks":
        spec = importlib.util.spec_from_file_location(f"bench_{rest[0]}", REPO / "benchmarks" / f"{rest[0]}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        main, argv = module.main, ["--help"]
    else:
        from aquainterp.cli.main import main
        argv = [*rest, "--help"]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            code = main(argv)
        except SystemExit as stop:  # argparse's own exit (the aquainterp CLI returns the status instead)
            code = stop.code
    assert code in (0, None), f"{command}: --help exited {code}"
    return out.getvalue()


DOC_PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def _readme_commands():
    """(command key, flags, the line) for each command in the bash blocks of README.md and docs/*.md."""
    text = "\n".join(page.read_text() for page in DOC_PAGES)
    found = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            if not line or line.startswith("#"):
                continue
            try:
                words = shlex.split(line)
            except ValueError:
                continue
            key = None
            for i, word in enumerate(words):
                if word == "-m" and i + 1 < len(words) and words[i + 1].startswith("training."):
                    key, rest = ("training", words[i + 1].split(".", 1)[1]), words[i + 2:]
                    break
                if word.startswith("benchmarks/") and word.endswith(".py"):
                    key, rest = ("benchmarks", Path(word).stem), words[i + 1:]
                    break
                if Path(word).name == "aquainterp" and i + 1 < len(words):
                    sub = [w for w in words[i + 1: i + 3] if not w.startswith("-")]
                    key = ("aquainterp", *sub[:1])
                    if sub[:1] == ["dashboard"] and len(sub) > 1:
                        key = ("aquainterp", "dashboard", sub[1])
                    rest = words[i + 1:]
                    break
            if key is None:
                continue
            flags = [w.split("=")[0] for w in rest if w.startswith("--")]
            found.append((key, flags, line))
    return found


def test_readme_flags_are_in_each_commands_help():
    commands = _readme_commands()
    assert len(commands) >= 15  # the parser really finds the commands of the README and docs/ pages
    helps: dict = {}
    problems = []
    for key, flags, line in commands:
        if key not in helps:
            helps[key] = _help_text(key)
        for flag in flags:
            if flag.replace("_", "-") not in helps[key] and flag not in helps[key]:
                problems.append(f"README.md or docs/: `{line}`: {flag} is not in `{' '.join(key)} --help`")
    assert not problems, "\n".join(problems)


def test_training_page_claim_about_every_stage_holds():
    text = (REPO / "docs" / "training.md").read_text().replace("\n", " ")
    m = re.search(r"Every training stage after the tokenizer \((?P<stages>[^)]*)\) takes (?P<flags>.*?);", text)
    assert m, "docs/training.md: the 'Every training stage ... takes' sentence moved; update this test with it"
    stages = re.findall(r"`(\w+)`", m.group("stages"))
    flags = re.findall(r"`(--[\w-]+)", m.group("flags"))
    assert stages == ["base", "mid", "sft", "rl"] and len(flags) == 4
    for stage in stages:
        help_text = _help_text(("training", stage))
        for flag in flags:
            assert flag in help_text, f"docs/training.md says every stage takes {flag}; training.{stage} does not"


def test_demo_tables_are_generated_from_the_committed_summary():
    """The seed-0 demo tables are training.demo_tables' output for docs/demo/seed0-summary.json (the
    summary.json of the run they describe), not typed: a change to the numbers updates them all. The headline
    is in README.md and docs/demo.md, the is-the-rationale-used table in docs/probes.md."""
    import json

    from training.demo_tables import faith_markdown, headline_markdown

    summary = json.loads((REPO / "docs" / "demo" / "seed0-summary.json").read_text())
    for table, pages in ((headline_markdown(summary), ("README.md", "docs/demo.md")),
                         (faith_markdown(summary), ("docs/probes.md",))):
        for page in pages:
            assert table and table in (REPO / page).read_text(), f"{page} does not hold this table:\n{table}"
    assert summary["numerics"]["mkl_cbwr"] == "AVX2,STRICT" and summary["config"]["seed"] == 0


# ---- README as a landing page, links between the pages ----------------------------------------------

def test_readme_is_a_landing_page():
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines: move detail to a docs/ page and link it"
    text = "\n".join(lines)
    for command in ("scripts/demo    #", "scripts/test    #"):  # the two commands, as .ci/run and scripts/ name them
        assert command in text


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens."""
    heading = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower())  # a link: its text
    return re.sub(r"[^\w\- ]", "", heading).replace(" ", "-")


def _anchors(text: str) -> set[str]:
    seen: dict[str, int] = {}
    anchors = set()
    for m in re.finditer(r"^#{1,6} +(.+?) *#*$", re.sub(r"```.*?```", "", text, flags=re.S), re.M):
        slug = _slug(m.group(1))
        anchors.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return anchors


def test_relative_links_reach_a_file_and_heading():
    """Every relative link in README.md and docs/*.md (markdown links and images, outside code blocks) names
    a file that exists, and a heading of it when the link has a #fragment."""
    problems, checked = [], 0
    for page in DOC_PAGES:
        text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
        for link in re.findall(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", text):
            if re.match(r"[a-z][a-z0-9+.-]*:", link):  # https:, mailto:
                continue
            target, _, fragment = link.partition("#")
            path = (page.parent / target).resolve() if target else page
            checked += 1
            if not path.exists():
                problems.append(f"{page.relative_to(REPO)}: ({link}): no file {path}")
            elif fragment and path.suffix == ".md" and fragment not in _anchors(path.read_text()):
                problems.append(f"{page.relative_to(REPO)}: ({link}): no heading #{fragment} in {path.name}")
    assert checked > 30  # the pages really link to each other
    assert not problems, "\n".join(problems)
