"""Branches a converted model never takes.

An ``if self.<flag>:`` arm of ``forward`` that, once prune removed what depends on inputs a
paged model does not take (cross-attention's encoder states), no longer binds a name the
code after the branch reads, while the other arm does: GPT-BigCode's cross-attention arm
is left computing only the query, and the paged call after it reads ``key`` and ``value``.
The flag is a constructor parameter, so `pin_parameter` refuses that value in ``__init__``
with one line and folds the arm (and what ``__init__`` built for it) away.
"""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from converter.context import ConversionContext
from converter.cst_helpers import assigned_names, methods_of, names_read, self_attr
from converter.passes.pin import holders, pin_parameter


def run(module: cst.Module, ctx: ConversionContext) -> cst.Module:
    body = []
    for stmt in module.body:
        if isinstance(stmt, cst.ClassDef):
            stmt = _pin_unreachable(ctx, stmt)
        body.append(stmt)
    return module.with_changes(body=body)


def _pin_unreachable(ctx: ConversionContext, cls: cst.ClassDef) -> cst.ClassDef:
    methods = methods_of(cls)
    init, forward = methods.get("__init__"), methods.get("forward")
    if init is None or forward is None:
        return cls
    flags = {a: p.name.value for p in init.params.params for a in holders(init, p.name.value)}
    bound = {p.name.value for p in (*forward.params.params, *forward.params.kwonly_params)}
    for branch, missing in _unbound_arms(list(forward.body.body), bound):
        test, taken = branch.test, True
        if m.matches(test, m.UnaryOperation(operator=m.Not())):
            test, taken = test.expression, False
        param = flags.get(self_attr(test))
        if param is None:
            continue
        value = not taken if missing[0] == "body" else taken
        names = ", ".join(sorted(missing[1]))
        ctx.log.append(f"{cls.name.value}: {param}={value} (the other arm leaves {names} unbound)")
        return _pin_unreachable(
            ctx,
            pin_parameter(
                cls,
                param,
                value,
                f"selects a branch of forward that needs inputs a paged decoder never passes "
                f"(it leaves {names} uncomputed); only {param}={value} converts",
            ),
        )
    return cls


def _unbound_arms(stmts: list[cst.BaseStatement], bound: set[str]):
    """(if statement, ("body" | "orelse", names)) for each if/else in `stmts` (at any depth)
    whose one arm leaves names unbound that the other binds and the statements after it
    read."""
    for i, stmt in enumerate(stmts):
        if isinstance(stmt, cst.If) and isinstance(stmt.orelse, cst.Else):
            later = set().union(*(names_read(s) for s in stmts[i + 1 :]))
            arms = {"body": list(stmt.body.body), "orelse": list(stmt.orelse.body.body)}
            binds = {k: assigned_names(v) for k, v in arms.items()}
            for arm, other in (("body", "orelse"), ("orelse", "body")):
                if _raises(arms[arm]):
                    continue
                missing = (binds[other] - binds[arm] - bound) & later
                if missing:
                    yield stmt, (arm, missing)
        for block in _blocks(stmt):
            yield from _unbound_arms(block, bound | assigned_names(stmts[:i]))
        bound = bound | assigned_names([stmt])


def _raises(stmts: list[cst.BaseStatement]) -> bool:
    last = stmts[-1] if stmts else None
    return isinstance(last, cst.SimpleStatementLine) and isinstance(last.body[-1], cst.Raise)


def _blocks(stmt: cst.BaseStatement) -> list[list[cst.BaseStatement]]:
    out = []
    if isinstance(getattr(stmt, "body", None), cst.BaseSuite):
        out.append(list(stmt.body.body))
    orelse = getattr(stmt, "orelse", None)
    if isinstance(orelse, cst.Else):
        out.append(list(orelse.body.body))
    elif isinstance(orelse, cst.If):
        out.append([orelse])
    return out
