"""The package's layers: the library never imports the application, and imports inside the library
go one way (a DAG). Every import counts, lazy ones inside functions included; only imports under
``if TYPE_CHECKING:`` (never run) are left out."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "factnet"
APPLICATION = "factnet.app"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _type_checking_only(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return True
    return False


def _resolve(name: str) -> str | None:
    """The factnet module ``name`` refers to (itself, or the package holding an attribute ``name``)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def imports(module: str) -> set[str]:
    """The factnet modules ``module`` imports (at import time or in any function)."""
    path = MODULES[module]
    tree = ast.parse(path.read_text())
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if _type_checking_only(node, parents):
            continue
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        found |= {resolved for t in targets if t.startswith("factnet") and (resolved := _resolve(t)) is not None}
    found.discard(module)
    return found


def _layer(module: str) -> str:
    return "application" if module == APPLICATION or module.startswith(APPLICATION + ".") else "library"


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph``, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt):], nxt]
            if nxt not in state and (found := visit(nxt)) is not None:
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)) is not None:
            return found
    return None


def test_the_checker_sees_lazy_imports_and_cycles():
    assert "factnet.file.writer" in imports("factnet.adapter")  # a lazy import inside Adapter.save
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_the_application_is_a_subpackage():
    assert APPLICATION in MODULES
    assert {"factnet.app.cli", "factnet.app.training", "factnet.app.demo"} <= set(MODULES)


def test_the_library_never_imports_the_application():
    wrong = {m: sorted(i for i in imports(m) if _layer(i) == "application")
             for m in MODULES if _layer(m) == "library"}
    assert not {m: i for m, i in wrong.items() if i}


def test_the_application_uses_the_librarys_public_api():
    """The application imports the library as ``factnet`` (the README's "Use" API), never its modules."""
    wrong = {m: sorted(i for i in imports(m) if _layer(i) == "library" and i != "factnet")
             for m in MODULES if _layer(m) == "application"}
    assert not {m: i for m, i in wrong.items() if i}


@pytest.mark.parametrize("layer", ["library", "application"])
def test_imports_go_one_way(layer):
    members = {m for m in MODULES if _layer(m) == layer}  # the package itself too: no module imports it back
    graph = {m: imports(m) & members for m in members}
    assert _cycle(graph) is None, f"import cycle: {' -> '.join(_cycle(graph))}"


def _underscore_imports(module: str) -> list[str]:
    """``module.name`` for each underscore name ``module`` imports from another factnet module (dunders aside)."""
    found = []
    for node in ast.walk(ast.parse(MODULES[module].read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("factnet"):
            found += [f"{node.module}.{alias.name}" for alias in node.names
                      if alias.name.startswith("_") and not alias.name.startswith("__")]
    return found


def test_the_checker_sees_underscore_imports(tmp_path, monkeypatch):
    path = tmp_path / "probe.py"
    path.write_text("from factnet.x import _y, __version__, z\nfrom factnet.w import _v\n")
    monkeypatch.setitem(MODULES, "probe", path)
    assert _underscore_imports("probe") == ["factnet.x._y", "factnet.w._v"]


def test_no_module_imports_another_modules_underscore_names():
    """A name one module shares with another is public in its own module (the library and the application)."""
    wrong = {m: found for m in MODULES if (found := _underscore_imports(m))}
    assert not wrong, wrong

