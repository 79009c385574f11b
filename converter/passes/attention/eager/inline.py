"""Eager cores written in a helper method (GPT-Neo's and GPT-NeoX-Japanese's ``_attn``).

A forward statement ``out, w = self._attn(q, k, v, mask)`` whose helper computes the
softmax becomes the helper's body: each parameter bound to its argument (``param =
arg``, omitted when the names agree; defaults for the rest) and the final ``return a, b``
turned into ``out, w = a, b``. The eager-core rewrite then sees one forward, and its span
deletion removes the inlined scores, masks and softmax.

Refused: a helper with another return than its last statement, ``*`` arguments, or
one that binds a name the forward reads after the call before rebinding it (the inlined
body would clobber it).
"""

from __future__ import annotations

import libcst as cst

from converter.analysis.liveness import block as live_block
from converter.cst_helpers import (
    bound_names,
    code,
    has_softmax,
    methods_of,
    nodes_of,
    self_attr,
)


def _helper_call(stmt, methods) -> tuple[cst.Assign, cst.Call, str] | None:
    """(assignment, call, helper name) for ``T = self.<helper>(...)``."""
    if not isinstance(stmt, cst.SimpleStatementLine) or len(stmt.body) != 1:
        return None
    small = stmt.body[0]
    if not isinstance(small, cst.Assign) or not isinstance(small.value, cst.Call):
        return None
    name = self_attr(small.value.func) if isinstance(small.value.func, cst.Attribute) else None
    if name in methods and name != "forward" and has_softmax(methods[name]):
        return small, small.value, name
    return None


def inline_softmax_helpers(ctx, node: cst.ClassDef, body, scope: str) -> list:
    """`body` with each ``T = self.<softmax helper>(...)`` statement inlined."""
    methods = methods_of(node)
    out: list[cst.BaseStatement] = []
    for i, stmt in enumerate(body):
        found = _helper_call(stmt, methods)
        if found is None:
            out.append(stmt)
            continue
        assign, call, name = found
        later = live_block(body[i + 1 :], set(), False)[1]  # read before rebound
        out += _inline(ctx, methods[name], assign, call, later, stmt, scope)
    return out


def _inline(ctx, helper: cst.FunctionDef, assign, call, later, stmt, scope):
    def refuse(why: str):
        return ctx.error(
            f"cannot inline the attention helper {helper.name.value}: {why}",
            stmt,
            scope=scope,
            hint="extend converter/passes/attention/eager/inline.py",
        )

    params = [*helper.params.posonly_params, *helper.params.params][1:]  # without self
    names = [p.name.value for p in params]
    bound: dict[str, cst.BaseExpression] = {}
    for pos, arg in enumerate(a for a in call.args if a.keyword is None):
        if arg.star or pos >= len(names):
            raise refuse("a * argument or one more argument than it takes")
        bound[names[pos]] = arg.value
    for arg in call.args:
        if arg.keyword is not None:
            bound[arg.keyword.value] = arg.value
    lines, renames = [], {}
    for param in params:
        value = bound.get(param.name.value, param.default)
        if value is None:
            raise refuse(f"no argument for {param.name.value}")
        if isinstance(value, cst.Name) and value.value not in ("None", "True", "False"):
            renames[param.name.value] = value.value  # so q/k/v keep the caller's names
        else:
            lines.append(cst.parse_statement(f"{param.name.value} = {code(value)}"))
    inner = [s.visit(_Rename(renames)) for s in helper.body.body]
    last = inner[-1] if inner else None
    ret = last.body[0] if isinstance(last, cst.SimpleStatementLine) else None
    if not isinstance(ret, cst.Return) or ret.value is None:
        raise refuse("its last statement is not `return <value>`")
    own = {n for s in helper.body.body for n in bound_names(s)} - set(renames)
    if len(set(renames.values())) != len(renames) or own & set(renames.values()):
        raise refuse("an argument's name is taken by another of its parameters or locals")
    if len(nodes_of(helper.body, cst.Return)) != 1:
        raise refuse("it returns from more than one place")
    targets = set(bound_names(cst.SimpleStatementLine([assign])))
    binds = {n for s in [*lines, *inner] for n in bound_names(s)}
    clobbered = sorted((binds & later) - targets)
    if clobbered:
        raise refuse(f"it binds {clobbered}, which the forward reads after the call")
    result = assign.with_changes(value=ret.value)
    return [*lines, *inner[:-1], stmt.with_changes(body=[result])]


class _Rename(cst.CSTTransformer):
    """Parameter names -> argument names (attribute fields and keywords untouched)."""

    def __init__(self, names: dict[str, str]) -> None:
        self.names = names

    def leave_Name(self, original: cst.Name, updated: cst.Name) -> cst.Name:
        new = self.names.get(updated.value)
        return updated.with_changes(value=new) if new else updated

    def leave_Attribute(self, original: cst.Attribute, updated: cst.Attribute):
        return updated.with_changes(attr=original.attr)

    def leave_Arg(self, original: cst.Arg, updated: cst.Arg) -> cst.Arg:
        return updated.with_changes(keyword=original.keyword)
