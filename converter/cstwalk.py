"""Fast read-only traversal of LibCST trees (LibCST's visitor dispatch costs ~10x more).

Only syntax-bearing fields are followed: whitespace, parentheses, commas and other
punctuation are skipped, which is all that collecting names and nodes needs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import libcst as cst

_SKIP = (
    "whitespace",
    "lpar",
    "rpar",
    "comma",
    "semicolon",
    "leading_lines",
    "newline",
    "lines_after_decorators",
    "header",
    "footer",
    "equal",
    "colon",
    "dot",
    "asynchronous",
    "first_line",
    "trailing",
    "operator",
)
_FIELDS: dict[type, tuple[str, ...]] = {}


def _fields(cls: type) -> tuple[str, ...]:
    names = _FIELDS.get(cls)
    if names is None:
        names = tuple(
            f.name for f in dataclasses.fields(cls) if not any(s in f.name for s in _SKIP)
        )
        _FIELDS[cls] = names
    return names


def children(node: cst.CSTNode) -> Iterator[cst.CSTNode]:
    for name in _fields(type(node)):
        value = getattr(node, name)
        if isinstance(value, cst.CSTNode):
            yield value
        elif isinstance(value, (list, tuple)):
            for item in value:
                if isinstance(item, cst.CSTNode):
                    yield item


def nodes_of(node: cst.CSTNode, *types: type) -> list:
    """Every node of `types` under `node` (itself included), in pre-order."""
    out = []
    stack = [node]
    while stack:
        current = stack.pop()
        if isinstance(current, types):
            out.append(current)
        stack.extend(reversed(list(children(current))))
    return out


def names_read(node: cst.CSTNode) -> set[str]:
    """Names a subtree reads: not attribute fields, call keywords or parameter names."""
    found: set[str] = set()
    stack = [node]
    while stack:
        current = stack.pop()
        if isinstance(current, cst.Name):
            found.add(current.value)
        elif isinstance(current, cst.Attribute):
            stack.append(current.value)
        elif isinstance(current, cst.Arg):
            stack.append(current.value)
        elif isinstance(current, cst.Param):
            stack.extend(p for p in (current.annotation, current.default) if p is not None)
        elif isinstance(current, (cst.Import, cst.ImportFrom)):
            continue
        else:
            stack.extend(children(current))
    return found


def call_name(call: cst.Call) -> str | None:
    """The called name: `softmax` for `torch.softmax(...)`, `x.softmax(...)` or `softmax(...)`."""
    func = call.func
    if isinstance(func, cst.Attribute):
        return func.attr.value
    return func.value if isinstance(func, cst.Name) else None


def has_softmax(node: cst.CSTNode) -> bool:
    """Whether `node` calls a softmax (the anchor of an eager attention core)."""
    return any(call_name(c) == "softmax" for c in nodes_of(node, cst.Call))


def assigned_names(stmts) -> set[str]:
    """Names assigned (at any depth) in a list of statements."""
    out: set[str] = set()
    for stmt in stmts:
        for target in nodes_of(stmt, cst.AssignTarget):
            out |= {n.value for n in nodes_of(target.target, cst.Name)}
    return out


def reachable_methods(methods: dict[str, cst.FunctionDef], roots: set[str]) -> set[str]:
    """`roots` and every method they reach through `self.<name>` references."""
    keep = set(roots)
    work = list(keep)
    while work:
        for ref in self_refs(methods[work.pop()]):
            if ref in methods and ref not in keep:
                keep.add(ref)
                work.append(ref)
    return keep


def self_refs(node: cst.CSTNode) -> set[str]:
    """Attribute names read as ``self.<name>``."""
    return {
        n.attr.value
        for n in nodes_of(node, cst.Attribute)
        if isinstance(n.value, cst.Name) and n.value.value == "self"
    }


def dotted(node: cst.BaseExpression) -> str | None:
    """``self.model.decoder`` -> "self.model.decoder"; None for anything else."""
    if isinstance(node, cst.Name):
        return node.value
    if isinstance(node, cst.Attribute):
        base = dotted(node.value)
        return f"{base}.{node.attr.value}" if base else None
    return None
