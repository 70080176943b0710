"""The layers are enforced: data flows one way (docs/ARTIFACTS.md), and no package imports
itself in a circle.

``dermedge`` is the contracts layer and imports no stage. Each stage imports ``dermedge`` and,
across stages, only what is written below, each through one module. Every import counts, also
one inside a function: a lazy import is still a dependency. Both checks read the source (ast),
so they run in a second and need no TensorFlow.
"""

from __future__ import annotations

import ast
import functools
import shutil
from collections import defaultdict
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("dermedge", "trainer", "export", "edge_demo")
# (importer package, imported package) -> the only modules allowed to cross, and why.
CROSSINGS: dict[tuple[str, str], dict[str, str]] = {
    ("export", "trainer"): {"export.training": "QAT fine-tunes as `trainer fit` trained"},
    ("edge_demo", "trainer"): {"edge_demo.explain": "Grad-CAM runs on the float Keras model"},
}


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@functools.lru_cache(maxsize=1024)
def _import_nodes(source: str) -> tuple[ast.Import | ast.ImportFrom, ...]:
    return tuple(node for node in ast.walk(ast.parse(source))
                 if isinstance(node, ast.Import | ast.ImportFrom))


def import_graph(root: Path) -> dict[str, dict[str, int]]:
    """``{module: {imported module of the four packages: line}}`` for every ``*.py`` under the
    packages in ``root``, counting imports at any depth (inside functions too)."""
    files = {module_name(root, p): p for pkg in PACKAGES for p in (root / pkg).rglob("*.py")}
    graph: dict[str, dict[str, int]] = defaultdict(dict)
    for mod, path in files.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in _import_nodes(path.read_text()):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                base = node.module or ""
                if node.level:
                    up = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([node.module] if node.module else []))
                # `from trainer import data` imports trainer.data; a name that is not a
                # module (`from trainer.data import cache_images`) counts as its module.
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base
                           for a in node.names]
            for target in targets:
                while target and target not in files:
                    target = target.rpartition(".")[0]
                if target and target != mod:
                    graph[mod].setdefault(target, node.lineno)
    return graph


def forbidden_imports(root: Path) -> list[str]:
    """Every import from one package into another that the layers do not allow."""
    problems = []
    for mod, targets in sorted(import_graph(root).items()):
        src = mod.split(".")[0]
        for target, line in sorted(targets.items()):
            dst = target.split(".")[0]
            if dst == src or dst == "dermedge" and src != "dermedge":
                continue
            allowed = CROSSINGS.get((src, dst), {})
            if mod in allowed:
                continue
            via = (f" (only {', '.join(allowed)} may: {'; '.join(allowed.values())})"
                   if allowed else "")
            problems.append(f"{mod} (line {line}) imports {target}: {src} may not import "
                            f"{dst}{via}")
    return problems


def import_cycles(root: Path) -> list[list[str]]:
    """The import cycles inside each package (strongly connected modules), each as a list."""
    graph = import_graph(root)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's algorithm, restricted to v's own package
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, {}):
            if w.split(".")[0] != v.split(".")[0]:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            scc = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                scc.append(w)
                if w == v:
                    break
            if len(scc) > 1:
                cycles.append(sorted(scc))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def test_no_package_imports_a_layer_it_may_not():
    problems = forbidden_imports(REPO)
    assert not problems, ("Imports across the layers (docs/ARTIFACTS.md: each stage reads the "
                          "artifact before it, through dermedge): " + "; ".join(problems))


def test_no_import_cycle_inside_a_package():
    cycles = import_cycles(REPO)
    assert not cycles, ("Import cycles (move what both need into a module both import): "
                        + "; ".join(" <-> ".join(c) for c in cycles))


# --- both checks fail on a planted bad import --------------------------------------------
@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    """A copy of the four packages' sources (each test plants one import, then restores)."""
    root = tmp_path_factory.mktemp("layers")
    for pkg in PACKAGES:
        shutil.copytree(REPO / pkg, root / pkg,
                        ignore=shutil.ignore_patterns("__pycache__", "web", "static",
                                                      "templates", "*.json"))
    assert forbidden_imports(root) == [] and import_cycles(root) == []
    return root


@pytest.fixture
def plant(tree):
    """``plant(file, code)``: ``code`` appended to ``tree/file`` inside a function."""
    originals: dict[Path, str] = {}

    def _plant(where: str, code: str) -> Path:
        path = tree / where
        originals.setdefault(path, path.read_text())
        path.write_text(originals[path] + f"\n\ndef _planted():\n    {code}\n")
        return tree

    yield _plant
    for path, text in originals.items():
        path.write_text(text)


@pytest.mark.parametrize("where, code, needle", [
    ("edge_demo/tiers.py", "from trainer.data import read_splits",
     "edge_demo.tiers (line"),
    ("edge_demo/service.py", "import export.api", "edge_demo may not import export"),
    ("dermedge/card.py", "from edge_demo import policy", "dermedge may not import edge_demo"),
    ("export/rundir.py", "from trainer.data import read_splits",
     "only export.training may: QAT fine-tunes"),
    ("trainer/fit.py", "from export.api import export_run", "trainer may not import export"),
])
def test_a_planted_forbidden_import_is_named(plant, where, code, needle):
    problems = forbidden_imports(plant(where, code))
    assert len(problems) == 1 and needle in problems[0], problems


@pytest.mark.parametrize("where, code, cycle", [
    ("trainer/losses.py", "from trainer.callbacks import EpochLog",
     ["trainer.callbacks", "trainer.losses"]),
    ("dermedge/labels.py", "from dermedge import card", ["dermedge.card", "dermedge.labels"]),
    ("edge_demo/imaging.py", "from . import service",
     ["edge_demo.imaging", "edge_demo.service"]),
])
def test_a_planted_cycle_is_named(plant, where, code, cycle):
    [found] = import_cycles(plant(where, code))
    assert set(cycle) <= set(found), found
