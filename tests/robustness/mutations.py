"""Source mutations for the converter fuzz tests: delete a statement, rename an
attribute (one use or every use), swap two arguments of a call.

Each mutation is `(kind, index)`: `index` picks the candidate (modulo how many the
file has), so hypothesis can draw plain integers and every draw is a valid mutation.
The result is always syntactically valid Python (a deleted statement becomes `pass`,
so no block is ever left empty).
"""

from __future__ import annotations

import libcst as cst

KINDS = ("delete", "rename_one", "rename_all", "swap_args")


def _swappable(call: cst.Call) -> list[int]:
    """Positions j where args j and j+1 are both positional or both keyword (no stars)."""
    out = []
    for j in range(len(call.args) - 1):
        a, b = call.args[j], call.args[j + 1]
        if a.star or b.star:
            continue
        if (a.keyword is None) == (b.keyword is None):
            out.append(j)
    return out


def _statement(node: cst.CSTNode, elifs: set[int]) -> bool:
    """A whole statement (an `elif` is an If nested in `orelse`, not a statement)."""
    if isinstance(node, cst.If) and isinstance(node.orelse, cst.If):
        elifs.add(id(node.orelse))
    if id(node) in elifs:
        return False
    return isinstance(node, (cst.SimpleStatementLine, cst.BaseCompoundStatement))


class _Collect(cst.CSTVisitor):
    """Counts the candidates of every kind."""

    def __init__(self) -> None:
        self.statements = 0
        self.elifs: set[int] = set()
        self.attributes = 0
        self.attr_names: list[str] = []
        self.swaps = 0

    def on_visit(self, node: cst.CSTNode) -> bool:
        if _statement(node, self.elifs):
            self.statements += 1
        elif isinstance(node, cst.Attribute):
            self.attributes += 1
            if node.attr.value not in self.attr_names:
                self.attr_names.append(node.attr.value)
        elif isinstance(node, cst.Call):
            self.swaps += len(_swappable(node))
        return True


_PASS = cst.SimpleStatementLine(body=[cst.Pass()])


class _Delete(cst.CSTTransformer):
    """Replace the `target`-th statement (pre-order, as `_Collect` counts) with `pass`."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.seen = -1
        self.elifs: set[int] = set()
        self.hit: cst.CSTNode | None = None

    def on_visit(self, node: cst.CSTNode) -> bool:
        if self.hit is not None:
            return False
        if _statement(node, self.elifs):
            self.seen += 1
            if self.seen == self.target:
                self.hit = node
                return False
        return True

    def on_leave(self, original: cst.CSTNode, updated: cst.CSTNode) -> cst.CSTNode:
        return _PASS if original is self.hit else updated


class _RenameOne(cst.CSTTransformer):
    def __init__(self, target: int) -> None:
        self.target = target
        self.seen = -1

    def leave_Attribute(self, original: cst.Attribute, updated: cst.Attribute) -> cst.Attribute:
        self.seen += 1
        if self.seen == self.target:
            return updated.with_changes(attr=cst.Name(updated.attr.value + "_renamed"))
        return updated


class _RenameAll(cst.CSTTransformer):
    def __init__(self, name: str) -> None:
        self.name = name

    def leave_Attribute(self, original: cst.Attribute, updated: cst.Attribute) -> cst.Attribute:
        if updated.attr.value == self.name:
            return updated.with_changes(attr=cst.Name(self.name + "_renamed"))
        return updated


class _Swap(cst.CSTTransformer):
    def __init__(self, target: int) -> None:
        self.target = target
        self.seen = -1

    def leave_Call(self, original: cst.Call, updated: cst.Call) -> cst.Call:
        # post-order, but any fixed order numbers the candidates one-to-one
        for j in _swappable(original):
            self.seen += 1
            if self.seen == self.target:
                args = list(updated.args)
                a, b = args[j], args[j + 1]
                args[j] = a.with_changes(value=b.value)
                args[j + 1] = b.with_changes(value=a.value)
                return updated.with_changes(args=args)
        return updated


def mutate(source: str, kind: str, index: int) -> tuple[str, str]:
    """Apply one mutation; returns (new source, a short description for failure reports)."""
    module = cst.parse_module(source)
    found = _Collect()
    module.visit(found)
    if kind == "delete":
        k = index % found.statements
        fixer: cst.CSTTransformer = _Delete(k)
        what = f"delete statement #{k}"
    elif kind == "rename_one":
        k = index % found.attributes
        fixer = _RenameOne(k)
        what = f"rename attribute use #{k}"
    elif kind == "rename_all":
        name = found.attr_names[index % len(found.attr_names)]
        fixer = _RenameAll(name)
        what = f"rename every .{name}"
    elif kind == "swap_args":
        if not found.swaps:
            return source, "no swappable arguments"
        k = index % found.swaps
        fixer = _Swap(k)
        what = f"swap arguments #{k}"
    else:
        raise ValueError(f"unknown mutation kind {kind!r}")
    return module.visit(fixer).code, what
