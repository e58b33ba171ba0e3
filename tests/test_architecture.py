"""The house as ARCHITECTURE.md draws it: layers that import downwards only, and no cycle.

The import graph is read from the source (every ``import``, those inside functions too,
since a function-level import can hide a cycle; ``if TYPE_CHECKING:`` blocks excluded, since
they never run). The only edges left out are the lazy registries' imports of the modules they
name: ``escala.backends.create`` and ``escala.store.open_store`` load one backend or store on
first use, by design.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

SRC = pathlib.Path(__file__).resolve().parent.parent / "src" / "escala"

#: The lazy registries: (package, function whose imports load its members on first use).
REGISTRIES = {("escala.backends", "create"), ("escala.store", "open_store")}

#: Layers from the bottom up; a module may import its own layer or those below it.
#: The clients (service, store, load, bench, cli) use the public face like any user.
LAYERS = [
    ("escala._errors",),
    ("escala._options", "escala._task"),
    ("escala._worker",),
    ("escala.backends",),
    ("escala._core",),
    ("escala.advisor",),
    ("escala._auto",),
    ("escala._api", "escala._pool"),
    ("escala",),
    ("escala.store", "escala.bench"),
    ("escala.service", "escala.load"),
    ("escala.cli", "escala.__main__"),
]


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.with_suffix("").relative_to(SRC.parent).parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, pathlib.Path]:
    return {_module_name(path): path for path in SRC.rglob("*.py")}


class _Imports(ast.NodeVisitor):
    """Collect (target, function) for every import of an escala module in one file."""

    def __init__(self, name: str, is_package: bool, known: set[str]) -> None:
        self.name, self.package, self.known = name, is_package, known
        self.found: list[tuple[str, str | None]] = []
        self._function: list[str] = []

    def visit_If(self, node: ast.If) -> None:
        test = node.test
        if isinstance(test, ast.Name) and test.id == "TYPE_CHECKING":
            for child in node.orelse:
                self.visit(child)
            return
        self.generic_visit(node)

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        self._function.append(node.name)
        self.generic_visit(node)
        self._function.pop()

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(alias.name)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:
            parts = self.name.split(".")
            if not self.package:
                parts.pop()
            if node.level > 1:
                parts = parts[: len(parts) - (node.level - 1)]
            base = ".".join(parts + ([node.module] if node.module else []))
        else:
            base = node.module or ""
        for alias in node.names:
            full = f"{base}.{alias.name}"
            self._add(full if full in self.known else base)

    def _add(self, target: str) -> None:
        if not target.startswith("escala"):
            return
        while target not in self.known and "." in target:
            target = target.rsplit(".", 1)[0]
        if target in self.known and target != self.name:
            self.found.append((target, self._function[0] if self._function else None))


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        visitor = _Imports(name, path.name == "__init__.py", set(modules))
        visitor.visit(ast.parse(path.read_text(), str(path)))
        for target, function in visitor.found:
            if (name, function) in REGISTRIES and target.startswith(name + "."):
                continue
            graph[name].add(target)
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """Return one import cycle as a path of module names, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                return [*path[path.index(target) :], target]
            if target not in state and (found := visit(target)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def _layer(module: str) -> int:
    best, rank = -1, -1
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, rank = len(prefix), index
    return rank


def test_the_graph_is_read_from_the_source() -> None:
    """The reader sees the edges it must: a check on the check itself."""
    graph = _graph()
    assert "escala._core.scheduler" in graph["escala._core.run"]
    assert "escala._worker.messages" in graph["escala.backends.processes"]
    # a registry's lazy import is left out, its other imports are not
    assert "escala.backends.threads" not in graph["escala.backends"]
    assert "escala._errors" in graph["escala.backends"]


def test_no_import_cycle() -> None:
    cycle = _cycle(_graph())
    assert cycle is None, "import cycle: " + " → ".join(cycle or [])


def test_layers_import_downwards_only() -> None:
    upward = []
    for module, targets in sorted(_graph().items()):
        rank = _layer(module)
        assert rank >= 0, f"{module} belongs to no layer: add it to LAYERS and ARCHITECTURE.md"
        upward += [f"{module} → {t}" for t in sorted(targets) if _layer(t) > rank]
    assert not upward, "imports against the layers:\n" + "\n".join(upward)


@pytest.mark.parametrize("package", ["_core", "_worker", "backends", "advisor", "cli"])
def test_the_tree_shows_the_layers(package: str) -> None:
    """``ls src/escala`` draws the house: each layer is a folder, not loose modules."""
    assert (SRC / package / "__init__.py").is_file()
    loose = sorted(p.name for p in SRC.glob("*.py"))
    assert loose == [
        "__init__.py",
        "__main__.py",
        "_api.py",
        "_auto.py",
        "_errors.py",
        "_options.py",
        "_pool.py",
        "_task.py",
    ]
