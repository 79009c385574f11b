"""Rewrites the layer constructors of one class's ``__init__`` for the TP pass
(converter/passes/tp/): a sharded linear's parallel layer, the fused layer in place of
the last member of a fusion (the others dropped), a config-chosen style's switch."""

from __future__ import annotations

from collections.abc import Callable

import libcst as cst

from converter.cst_helpers import ctor_call, self_attr, with_ctor
from converter.passes.tp.args import expr
from converter.passes.tp.fuse import Fusion
from converter.passes.tp.switch import InlineLater, assigned_attrs, attr_values


class InitRewriter(cst.CSTTransformer):
    """Rewrites the ctor calls of one class's __init__: `ctor_for(attr, call)` is the TP
    pass's layer for one linear, `fused_ctor(fusion)` its fused layer."""

    def __init__(
        self,
        ctor_for: Callable[[str, cst.Call], cst.BaseExpression],
        fused_ctor: Callable[[Fusion], cst.Call],
        fusions: list[Fusion],
    ) -> None:
        self.ctor_for, self.fused_ctor, self.fusions = ctor_for, fused_ctor, fusions
        self.member_of = {m: f for f in fusions for m in f.members}
        self.values: dict[str, cst.BaseExpression] = {}
        self.seen: set[str] = set()  # self attributes assigned by the statements left so far

    def visit_FunctionDef(self, node: cst.FunctionDef) -> None:
        if node.name.value == "__init__":
            self.values = attr_values(node)

    def leave_SimpleStatementLine(
        self, original: cst.SimpleStatementLine, updated: cst.SimpleStatementLine
    ) -> cst.SimpleStatementLine | cst.RemovalSentinel:
        new = self.rewrite(updated)
        self.seen |= assigned_attrs(original)
        return new

    def rewrite(
        self, updated: cst.SimpleStatementLine
    ) -> cst.SimpleStatementLine | cst.RemovalSentinel:
        small = updated.body[0] if len(updated.body) == 1 else None
        if not isinstance(small, cst.Assign) or len(small.targets) != 1:
            return updated
        attr = self_attr(small.targets[0].target)
        call = ctor_call(small.value)
        if attr is None or call is None:
            return updated
        fusion = self.member_of.get(attr)
        if fusion is not None:
            if attr != fusion.members[-1]:
                return cst.RemovalSentinel.REMOVE
            new = self.fused_ctor(fusion)
            return updated.with_changes(
                body=[
                    small.with_changes(
                        targets=[cst.AssignTarget(expr(f"self.{fusion.fused}"))], value=new
                    )
                ]
            )
        new_call = self.ctor_for(attr, call)
        if new_call is call:
            return updated
        if isinstance(new_call, cst.IfExp):  # config-chosen style, built here
            new_call = new_call.visit(InlineLater(self.values, self.seen))
        new_value = with_ctor(small.value, new_call)
        return updated.with_changes(body=[small.with_changes(value=new_value)])
