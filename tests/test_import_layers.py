"""Imports run downward only: no module of petl_surgery imports, at any depth of its code (function-level
imports included), a module that imports it back."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Set

import petl_surgery

PACKAGE = Path(petl_surgery.__file__).parent


def module_names() -> Dict[str, Path]:
    names = {}
    for path in PACKAGE.rglob("*.py"):
        parts = ("petl_surgery", *path.relative_to(PACKAGE).with_suffix("").parts)
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def import_edges(names: Dict[str, Path]) -> Dict[str, Set[str]]:
    """module -> our modules it imports (relative imports: the package, whose __init__ runs, and each
    imported name that is a module)."""
    edges: Dict[str, Set[str]] = {name: set() for name in names}
    for name, path in names.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
                for target in (base, *(f"{base}.{alias.name}" for alias in node.names)):
                    if target in names and target != name:
                        edges[name].add(target)
    return edges


def cycles(edges: Dict[str, Set[str]]) -> List[List[str]]:
    found: List[List[str]] = []
    state: Dict[str, int] = {}
    stack: List[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for target in sorted(edges[node]):
            if state.get(target) == 1:
                found.append(stack[stack.index(target):] + [target])
            elif target not in state:
                visit(target)
        stack.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)
    return found


def test_no_module_imports_a_module_that_imports_it_back():
    assert cycles(import_edges(module_names())) == []


def test_the_check_finds_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
