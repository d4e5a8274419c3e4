"""The project's imports run one way: ``run.py`` -> ``interventions.pipeline`` ->
``interventions.executors`` -> ``interventions.mechanisms`` -> ``tasks``, with ``figures`` beside
the pipeline as a reader of saved results.

The graph is read from the source (AST), every ``import`` counted wherever it stands: at module
level, inside functions (deferred) and under ``TYPE_CHECKING``, relative imports resolved. Each
module is a node; ``from package import name`` points at the submodule when ``name`` is one.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("interventions", "tasks", "figures")
SCRIPTS = ("run.py",)


def project_modules(root: Path = ROOT) -> dict[str, Path]:
    """Dotted module name -> source file, for every module of ``PACKAGES`` and ``SCRIPTS``."""
    modules = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    for script in SCRIPTS:
        modules[Path(script).stem] = root / script
    return modules


def imported_names(source: str, module: str, is_package: bool) -> set[str]:
    """Every dotted name ``module``'s source imports (relative imports made absolute); for
    ``from X import a``, both ``X`` and ``X.a`` (the caller keeps those that are modules)."""
    package = module if is_package else module.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            names.add(target)
            names.update(f"{target}.{alias.name}" for alias in node.names)
    return names


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """Module -> the project modules it imports (self-imports left out)."""
    modules = project_modules(root)
    graph = {}
    for module, path in modules.items():
        names = imported_names(path.read_text(), module, path.name == "__init__.py")
        targets = set()
        for name in names:
            # ``import a.b.c`` names a.b.c; an attribute ``from a.b import f`` names a.b.
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and name != module:
                targets.add(name)
        graph[module] = targets
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as ``[a, b, ..., a]``, or ``None`` when it has none (depth-first
    search; a node met again while still on the path closes a cycle)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for succ in sorted(graph.get(node, ())):
            if state.get(succ) == 1:
                return path[path.index(succ):] + [succ]
            if succ not in state:
                found = visit(succ)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            found = visit(start)
            if found:
                return found
    return None


def package_graph(graph: dict[str, set[str]], depth: int) -> dict[str, set[str]]:
    """``graph`` with each module merged into its package, cut to ``depth`` parts
    (``interventions.pipeline.jobs`` -> ``interventions.pipeline`` at depth 2, ``figures.render``
    -> ``figures``); a top-level script stays itself."""
    packages = {m.rpartition(".")[0] for m in graph} - {""}

    def group(module: str) -> str:
        package = module if module in packages else (module.rpartition(".")[0] or module)
        return ".".join(package.split(".")[:depth])

    merged: dict[str, set[str]] = {}
    for module, targets in graph.items():
        merged.setdefault(group(module), set()).update(
            group(t) for t in targets if group(t) != group(module))
    return merged


# What each layer may not import (prefixes of module names). A package's own __init__ counts
# with its layer.
FORBIDDEN = {
    "tasks": ("interventions", "figures", "run"),
    "interventions.mechanisms": ("interventions.executors", "interventions.pipeline",
                                 "figures", "run"),
    "interventions.executors": ("interventions.pipeline", "figures", "run"),
    "interventions": ("figures", "run"),
    "figures": ("run",),
}


def _within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    """``"a -> b"`` for every edge that runs against :data:`FORBIDDEN`."""
    bad = []
    for module, targets in sorted(graph.items()):
        for layer, banned in FORBIDDEN.items():
            if _within(module, layer):
                bad += [f"{module} -> {t}" for t in sorted(targets)
                        if any(_within(t, b) for b in banned)]
    return sorted(set(bad))


# -- the checkers themselves, on graphs small enough to see ------------------------------------


def test_find_cycle_on_synthetic_graphs():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b", "c"}, "b": {"d"}, "c": {"d"}, "d": set()}) is None  # diamond
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"x": {"y"}, "y": {"y"}}) == ["y", "y"]
    cycle = find_cycle({"p": {"q"}, "q": {"r"}, "r": {"q"}})
    assert cycle == ["q", "r", "q"]


def test_imported_names_resolve_relative_and_deferred_imports():
    source = ("from ..errors import UserError\n"
              "from . import results\n"
              "import tasks.store\n"
              "def f():\n"
              "    from ..executors.remote import executor\n"
              "if TYPE_CHECKING:\n"
              "    from .jobs import Job\n")
    names = imported_names(source, "interventions.pipeline.taskrun", is_package=False)
    assert {"interventions.errors", "interventions.errors.UserError",
            "interventions.pipeline.results", "tasks.store",
            "interventions.executors.remote.executor",
            "interventions.pipeline.jobs"} <= names
    # In a package's __init__, "." is the package itself.
    assert "figures.render" in imported_names("from . import render\n", "figures", True)


def test_layer_violations_and_package_graph_on_a_synthetic_graph():
    graph = {"interventions.mechanisms.cama": {"interventions.executors.fast"},
             "interventions.pipeline.jobs": {"figures.render"},
             "figures.render": {"interventions.pipeline.results"},
             "interventions.pipeline.results": set(),
             "interventions.executors.fast": {"interventions.mechanisms.cama"},
             "tasks": set()}
    assert layer_violations(graph) == [
        "interventions.mechanisms.cama -> interventions.executors.fast",
        "interventions.pipeline.jobs -> figures.render"]
    packages = package_graph(graph, 2)
    assert packages["figures"] == {"interventions.pipeline"}
    assert packages["interventions.pipeline"] == {"figures"}
    assert find_cycle(packages) == ["figures", "interventions.pipeline", "figures"]
    assert find_cycle(package_graph(graph, 1)) == ["figures", "interventions", "figures"]


# -- the project --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def graph():
    found = import_graph()
    # The graph was read: the modules and edges every layer must have are there.
    assert {"run", "tasks", "figures.render", "interventions.pipeline.jobs",
            "interventions.executors.fast", "interventions.mechanisms.cama"} <= set(found)
    assert "interventions.mechanisms.plan" in found["interventions.executors.fast"]
    return found


def test_no_import_cycle_between_modules(graph):
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_no_import_cycle_between_packages(graph):
    # Top-level packages (interventions <-> figures) and sub-packages (pipeline <-> figures).
    for depth in (1, 2):
        cycle = find_cycle(package_graph(graph, depth))
        assert cycle is None, f"depth {depth}: " + " -> ".join(cycle)


def test_layers_import_downwards_only(graph):
    assert layer_violations(graph) == []
