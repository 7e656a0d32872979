"""The package layout's two rules (docs/design.md, "Layout"): imports inside aquainterp never form a
circle, and aquainterp never imports the packages built on it (training, probes, dashboards).

Every import statement counts, also those inside functions (a lazy import is still a dependency)."""

import ast
from pathlib import Path

import aquainterp

ROOT = Path(aquainterp.__file__).parent
BUILT_ON_IT = {"training", "probes", "dashboards"}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(source: str, modules: set[str]) -> set[str]:
    """What one file imports: aquainterp modules by full name ("from aquainterp.cli import settings"
    names aquainterp.cli.settings), the packages built on aquainterp by their top-level name."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return {name for name in found if name in modules} | {
        name.split(".")[0] for name in found if name.split(".")[0] in BUILT_ON_IT}


def import_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in ROOT.rglob("*.py")}
    return {name: imports_of(path.read_text(), set(files)) for name, path in files.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if state.get(nxt) is None and (found := visit(nxt, path + [nxt])):
                return found
        state[node] = 2
        return None

    for start in sorted(graph):
        if state.get(start) is None and (found := visit(start, [start])):
            return found
    return None


def test_find_cycle_finds_a_planted_circle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_circle_inside_aquainterp():
    graph = import_graph()
    assert "aquainterp.checkpoints.load" in graph and "aquainterp.model.gpt" in graph  # the walk saw the tree
    assert graph["aquainterp.checkpoints.load"] >= {"aquainterp.checkpoints.native", "aquainterp.model.gpt"}
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_aquainterp_never_imports_what_is_built_on_it():
    source = "def f():\n    from training.demo import run\n    import probes.suite\nfrom aquainterp.cli import settings\n"
    assert imports_of(source, {"aquainterp.cli.settings"}) == {"training", "probes", "aquainterp.cli.settings"}
    offenders = {name: sorted(deps & BUILT_ON_IT) for name, deps in import_graph().items()}
    assert {name: deps for name, deps in offenders.items() if deps} == {}


def test_public_names_resolve_from_the_package():
    from aquainterp.checkpoints.load import load_model
    from aquainterp.model.engine import Engine
    from aquainterp.model.gpt import GPT, GPTConfig
    from aquainterp.patching.patcher import Patcher
    from aquainterp.tokenizer import Tokenizer

    assert (aquainterp.load_model, aquainterp.GPT, aquainterp.GPTConfig, aquainterp.Engine,
            aquainterp.Tokenizer, aquainterp.Patcher) == (load_model, GPT, GPTConfig, Engine, Tokenizer, Patcher)
    try:
        aquainterp.NoSuchThing  # noqa: B018
    except AttributeError as e:
        assert "NoSuchThing" in str(e)
    else:
        raise AssertionError("an unknown name must raise AttributeError")


def test_importing_the_package_and_the_command_line_loads_no_torch():
    """`aquainterp --help` stays fast: the re-exports above resolve on first use, not at import."""
    import subprocess
    import sys

    code = ("import sys, aquainterp, aquainterp.cli.main; "
            "print(sorted(m for m in ('torch', 'numpy', 'transformer_lens') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
