"""Reads of what an eager core's span deleted (eager_core): the attention probabilities,
scores, masks. After the paged call they are ``None`` — except the tail of a dropped
list/tuple whose length is known: OpenAI GPT's core returns ``outputs = [context]`` and
appends the probabilities only under ``output_attentions`` (an API flag fixed false at
inference, rules/training.toml ``[flags]``), so ``attn_outputs[1:]`` is ``[]``, not
``None[1:]``.

A display's length counts when every other statement of the span that mutates it
(``.append``/``.extend``/``.insert``/``+=``) sits under ``if <false flag>:``; plain
aliases (``b = a``) share it.
"""

from __future__ import annotations

import libcst as cst

from converter.analysis.shape_ops import as_int
from converter.cst_helpers import bound_names, names_read, nodes_of

MUTATORS = ("append", "extend", "insert")


def _mutated(stmt: cst.CSTNode, name: str) -> bool:
    for call in nodes_of(stmt, cst.Call):
        func = call.func
        if isinstance(func, cst.Attribute) and func.attr.value in MUTATORS:
            if isinstance(func.value, cst.Name) and func.value.value == name:
                return True
    return any(
        isinstance(a.target, cst.Name) and a.target.value == name
        for a in nodes_of(stmt, cst.AugAssign)
    )


def _under_false_flag(stmt: cst.CSTNode, false: set[str]) -> bool:
    return (
        isinstance(stmt, cst.If)
        and stmt.orelse is None
        and isinstance(stmt.test, cst.Name)
        and stmt.test.value in false
    )


def lengths(span: list, false: set[str]) -> dict[str, tuple[int, str]]:
    """{name: (length, "[]" or "()")} of the list/tuple displays `span` binds."""
    out: dict[str, tuple[int, str]] = {}
    for stmt in span:
        small = stmt.body[0] if isinstance(stmt, cst.SimpleStatementLine) else None
        if isinstance(small, cst.Assign) and len(small.targets) == 1:
            target, value = small.targets[0].target, small.value
            if isinstance(target, cst.Name):
                if isinstance(value, (cst.List, cst.Tuple)) and not any(
                    isinstance(e, cst.StarredElement) for e in value.elements
                ):
                    empty = "[]" if isinstance(value, cst.List) else "()"
                    out[target.value] = (len(value.elements), empty)
                    continue
                if isinstance(value, cst.Name) and value.value in out:
                    out[target.value] = out[value.value]
                    continue
        for name in list(out):
            rebound = name in bound_names(stmt)
            if rebound or (_mutated(stmt, name) and not _under_false_flag(stmt, false)):
                del out[name]
    return out


class _NoneFor(cst.CSTTransformer):
    """Reads of `names` -> ``None``; ``X[k:]`` of a display of length <= k -> empty
    (assignment targets, attribute fields and keywords keep their names)."""

    def __init__(self, names: set[str], sized: dict[str, tuple[int, str]]) -> None:
        self.names, self.sized = names, sized

    def leave_Subscript(self, original: cst.Subscript, updated) -> cst.BaseExpression:
        base = original.value
        if isinstance(base, cst.Name) and base.value in self.names and base.value in self.sized:
            size, empty = self.sized[base.value]
            item = original.slice[0].slice if len(original.slice) == 1 else None
            if isinstance(item, cst.Slice) and item.upper is None and item.step is None:
                lower = as_int(item.lower) if item.lower is not None else 0
                if lower is not None and lower >= size:
                    return cst.parse_expression(empty)
        return updated

    def leave_BinaryOperation(self, original, updated: cst.BinaryOperation):
        """``[a] + []`` -> ``[a]`` (the empty tail just made; same display kind)."""
        if isinstance(updated.operator, cst.Add):
            left, right = updated.left, updated.right
            for keep, empty in ((left, right), (right, left)):
                if type(keep) is type(empty) and isinstance(empty, (cst.List, cst.Tuple)):
                    if not empty.elements:
                        return keep
        return updated

    def leave_Name(self, original: cst.Name, updated: cst.Name) -> cst.BaseExpression:
        return cst.Name("None") if updated.value in self.names else updated

    def leave_AssignTarget(self, original, updated: cst.AssignTarget) -> cst.AssignTarget:
        return updated.with_changes(target=original.target)

    def leave_Attribute(self, original, updated: cst.Attribute) -> cst.Attribute:
        return updated.with_changes(attr=original.attr)

    def leave_Arg(self, original: cst.Arg, updated: cst.Arg) -> cst.Arg:
        return updated.with_changes(keyword=original.keyword)


def none_for(after: list, names: set[str], sized: dict[str, tuple[int, str]]) -> list:
    """`after` with reads of the dropped `names` -> None (or an empty tail), until a
    statement rebinds one."""
    out = []
    for stmt in after:
        out.append(stmt.visit(_NoneFor(names, sized)) if names & names_read(stmt) else stmt)
        names = names - set(bound_names(stmt))
    return out
