"""The house rules of the layout (docs/design.md), checked on the source itself: no import circles, Beam code never
imports the trainer, installed code never imports the lab, no module over 800 lines, a README that is a front door."""
from __future__ import annotations

import ast
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INSTALLED = ("archive_vision", "pipelines", "trainer", "serving")
PACKAGES = INSTALLED + ("research", "bench")
MAX_LINES = 800


def _modules():
    """module name -> file, for every .py file of the project's packages."""
    found = {}
    for package in PACKAGES:
        for folder, _, files in os.walk(os.path.join(REPO, package)):
            for name in files:
                if name.endswith(".py"):
                    path = os.path.join(folder, name)
                    module = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
                    found[module.removesuffix(".__init__")] = path
    return found


def _imports(module: str, path: str, modules) -> set:
    """The project modules `module` imports anywhere in its file (imports inside functions count: they run too)."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = module.split(".")
                package = parts if path.endswith("__init__.py") else parts[:-1]
                base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
            names = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and name != module:
                out.add(name)
    return out


@pytest.fixture(scope="module")
def graph():
    modules = _modules()
    return {module: _imports(module, path, modules) for module, path in modules.items()}


def _cycles(graph) -> list:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(node):
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def _without_package_reexports(graph) -> dict:
    """A package's __init__ that re-exports its submodules, imported by them for a shared name, is one unit: the
    edges between a package and its own submodules are not circles between rooms."""
    return {module: {t for t in targets if not (t.startswith(module + ".") or module.startswith(t + "."))}
            for module, targets in graph.items()}


def test_no_import_circles(graph):
    assert _cycles(_without_package_reexports(graph)) == []


def test_the_cycle_finder_finds_a_circle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_beam_code_never_imports_the_trainer(graph):
    reached = {(module, target) for module, targets in graph.items() if module.startswith("pipelines")
               for target in targets if target.startswith("trainer")}
    assert reached == set()


def test_installed_code_never_imports_the_lab(graph):
    reached = {(module, target) for module, targets in graph.items() if module.split(".")[0] in INSTALLED
               for target in targets if target.split(".")[0] in ("research", "bench")}
    assert reached == set()


def test_no_module_over_800_lines():
    too_long = {}
    for module, path in _modules().items():
        with open(path, encoding="utf-8") as f:
            lines = sum(1 for _ in f)
        if lines > MAX_LINES:
            too_long[module] = lines
    assert too_long == {}


def test_the_readme_is_a_front_door():
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        lines = f.read().splitlines()
    assert len(lines) <= 200
    assert lines[3].startswith("make demo") and lines[4].startswith("make test")  # the two commands come first
    assert any(line.startswith("## Score your own archive") for line in lines[:40])
