"""No module of tailsfw imports one that imports it back, directly or through
others: every import counts, at module level, in a function or under
TYPE_CHECKING (a circle is a knot in the design wherever it is written)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "tailsfw"


def imports(source: str, package: set[str]) -> set[str]:
    """The package's modules that a module's source imports, anywhere in it."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names if a.name.startswith("tailsfw.")]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level == 0 and base != "tailsfw" and not base.startswith("tailsfw."):
                continue
            base = base.removeprefix("tailsfw").lstrip(".")
            # `from . import a, b` and `from tailsfw import a` name modules;
            # `from .a import b` names a's contents (or a submodule of a package).
            names = [base] if base else [alias.name for alias in node.names]
        else:
            continue
        found |= {name.removeprefix("tailsfw.").split(".")[0] for name in names} & package
    return found


def graph(directory: Path) -> dict[str, set[str]]:
    modules = {path.stem for path in directory.glob("*.py")} - {"__init__"}
    return {m: imports((directory / f"{m}.py").read_text(), modules) - {m} for m in modules}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """One circle through each module that is on one (depth first search)."""
    found: list[list[str]] = []
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            circle = path[path.index(module) :]
            if not any(set(circle) <= set(c) for c in found):
                found.append([*circle, module])
            return
        if module in done:
            return
        for target in sorted(edges[module]):
            visit(target, [*path, module])
        done.add(module)

    for module in sorted(edges):
        visit(module, [])
    return found


def test_no_module_imports_one_that_imports_it_back() -> None:
    edges = graph(PACKAGE)
    assert len(edges) > 20 and edges["daemon"], "the package was not read"
    assert cycles(edges) == [], "\n".join(" -> ".join(c) for c in cycles(edges))


def test_every_kind_of_import_is_seen() -> None:
    source = """
import os
import tailsfw.nft
from . import compiler, policy
from .events import LinksChanged
from tailsfw import users
from tailsfw.status import Status
if TYPE_CHECKING:
    from .links import Snapshot
def later():
    from .verify import matches
"""
    package = {"nft", "compiler", "policy", "events", "users", "status", "links", "verify", "os"}
    assert imports(source, package) == package - {"os"}


def test_a_circle_is_found_through_other_modules() -> None:
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(edges) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
