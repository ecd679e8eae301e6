"""The package's shape: no import cycles among its modules, every internal import resolvable."""

from __future__ import annotations

import ast
from pathlib import Path

import crystal_gpt

ROOT = Path(crystal_gpt.__file__).parent


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


# Function-level imports that close a cycle on purpose: CrystalGPT.from_pretrained is a thin
# wrapper over the checkpoint loader, which builds a CrystalGPT.
LAZY_CYCLE_EDGES = {("crystal_gpt.model.transformer", "crystal_gpt.model.checkpoints")}


def _is_type_checking(node) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _imports(tree: ast.Module, functions: bool):
    """Import statements that run: at import time (``functions=False``: not inside a function
    or class body), or at all; never those under ``if TYPE_CHECKING``."""
    stack = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        elif _is_type_checking(node):
            stack.extend(node.orelse)
        elif functions or not isinstance(
            node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef
        ):
            stack.extend(ast.iter_child_nodes(node))


def _targets(node, name: str, is_package: bool, modules: dict) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    base = node.module or ""
    if node.level:  # relative import
        here = name.split(".") if is_package else name.split(".")[:-1]
        here = here[: len(here) - (node.level - 1)]
        base = ".".join([*here, base] if base else here)
    return [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]


def import_graph(functions: bool = False) -> dict[str, set[str]]:
    """Module -> the package modules it imports at module level (or anywhere: ``functions``)."""
    modules = _modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        for node in _imports(tree, functions):
            for target in _targets(node, name, path.name == "__init__.py", modules):
                if target.split(".")[0] == "crystal_gpt" and target != name:
                    graph[name].add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                return [*path[path.index(n) :], n]
            if n not in state and (cycle := visit(n)):
                return cycle
        path.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (cycle := visit(m)):
            return cycle
    return None


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_import_cycles_through_function_level_imports():
    graph = import_graph(functions=True)
    for a, b in LAZY_CYCLE_EDGES:
        graph[a].discard(b)
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle (function-level imports included): " + " -> ".join(cycle)


def test_internal_imports_resolve_inside_the_package():
    # a stale path (crystal_gpt.metrics) could otherwise resolve through an editable install
    graph = import_graph(functions=True)
    modules = set(graph)
    for name, targets in graph.items():
        missing = sorted(t for t in targets if t not in modules)
        assert not missing, f"{name} imports modules the package does not have: {missing}"


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_every_command_line_option_says_what_it_does():
    import argparse

    from crystal_gpt.cli import build_parser

    def walk(parser, path):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    yield from walk(sub, f"{path} {name}")
            elif not isinstance(action, argparse._HelpAction):
                yield path, action

    missing = [
        f"{p} {a.option_strings or a.dest}" for p, a in walk(build_parser(), "") if not a.help
    ]
    assert not missing, missing


def test_readme_and_evaluate_help_agree_on_the_reference_build_time():
    import re

    from crystal_gpt.cli import build_parser

    readme = (ROOT.parent / "README.md").read_text()
    sub = build_parser()._subparsers._group_actions[0].choices["evaluate"]
    pattern = r"(\d+) min of\s+CrystalNN"
    assert re.findall(pattern, readme) == re.findall(pattern, sub.description) != []
