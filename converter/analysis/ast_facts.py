"""Facts read with Python's `ast` (fast: no LibCST positions or visitors): statement
lines by scope, and per class the config fields it reads and whether it looks up the
attention interface."""

from __future__ import annotations

import ast

INTERFACE_REGISTRY = "ALL_ATTENTION_FUNCTIONS"


def line_index(source: str) -> dict[tuple[str, str], int]:
    """(enclosing def/class qualname, first code line of a statement) -> line, from
    Python's `ast` (cheap; LibCST positions cost a second pass over the code)."""
    lines = source.splitlines()
    index: dict[tuple[str, str], int] = {}

    def walk(node: ast.AST, scope: list[str]) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.stmt):
                key = lines[child.lineno - 1].strip()
                index.setdefault((".".join(scope), key), child.lineno)
                index.setdefault(("", key), child.lineno)
            if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                walk(child, scope + [child.name])
            else:
                walk(child, scope)

    walk(ast.parse(source), [])
    return index


def class_facts(source: str) -> dict[str, tuple[int, set[str], bool]]:
    """Per top-level class, from Python's `ast` (fast): line, config fields read
    (``config.X`` / ``self.config.X``), whether it looks up the attention interface."""
    facts = {}
    for node in ast.parse(source).body:
        if not isinstance(node, ast.ClassDef):
            continue
        reads: set[str] = set()
        interface = False
        for sub in ast.walk(node):
            if isinstance(sub, ast.Attribute):
                base = sub.value
                if (isinstance(base, ast.Name) and base.id == "config") or (
                    isinstance(base, ast.Attribute)
                    and base.attr == "config"
                    and isinstance(base.value, ast.Name)
                    and base.value.id == "self"
                ):
                    reads.add(sub.attr)
                if isinstance(base, ast.Name) and base.id == INTERFACE_REGISTRY:
                    interface = True
            elif isinstance(sub, ast.Subscript):
                if isinstance(sub.value, ast.Name) and sub.value.id == INTERFACE_REGISTRY:
                    interface = True
        facts[node.name] = (node.lineno, reads, interface)
    return facts
