"""A constructor parameter pinned to the one value a converted model can build with.

Where only one value of an attention class's constructor parameter gives a layer the
paged model can run (GPT-2's ``is_cross_attention=False``: paged attention is causal;
a branch of ``forward`` whose inputs the paged model never passes), ``__init__`` refuses
the other value first, with one line saying why, and the parameter, and every attribute
that holds it, become that constant in the class: the arms it decided fold away.
"""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from converter.cst_helpers import flat_statements, methods_of, self_attr

TRUE, FALSE = cst.Name("True"), cst.Name("False")
SUPER_INIT = m.SimpleStatementLine(
    body=[m.Expr(m.Call(func=m.Attribute(m.Call(func=m.Name("super")), m.Name("__init__"))))]
)


def holders(init: cst.FunctionDef, param: str) -> set[str]:
    """Attributes ``__init__`` assigns the parameter to (``self.x = param``)."""
    return {
        self_attr(t.target)
        for s in flat_statements(init.body.body)
        if isinstance(s, cst.Assign) and m.matches(s.value, m.Name(param))
        for t in s.targets
    } - {None}


def pin_parameter(cls: cst.ClassDef, param: str, value: bool, why: str) -> cst.ClassDef:
    """`cls` with ``param`` refused unless it is `value` (the error says ``why`` the other
    value cannot build), and folded into the class as that constant."""
    init = methods_of(cls)["__init__"]
    folded = cls.visit(_Fold(param, value, holders(init, param)))
    name = cls.name.value
    guard = cst.parse_statement(
        f"if {'not ' if value else ''}{param}:\n"
        f'    raise ValueError("{name}: {param}={not value} {why}")\n'
    )
    new_init = methods_of(folded)["__init__"]
    body = list(new_init.body.body)
    at = next((i + 1 for i, s in enumerate(body) if m.matches(s, SUPER_INIT)), 0)
    new_init = new_init.with_changes(
        body=new_init.body.with_changes(body=[*body[:at], guard, *body[at:]])
    )
    return folded.with_changes(
        body=folded.body.with_changes(
            body=[new_init if s is methods_of(folded)["__init__"] else s for s in folded.body.body]
        )
    )


class _Fold(cst.CSTTransformer):
    """The parameter (in ``__init__``) and the attributes holding it (everywhere) as a
    constant; if/else arms, conditional expressions and boolean operators on constants
    folded."""

    def __init__(self, param: str, value: bool, attrs: set[str]) -> None:
        self.param, self.value, self.attrs = param, value, attrs
        self.in_init = False
        self.stores: set[int] = set()
        self.elifs: set[int] = set()  # `elif` branches: folded with the `if` they continue
        self.fields: set[int] = set()  # names that are no variables: `x.<name>`, `f(<name>=)`

    def visit_FunctionDef(self, node: cst.FunctionDef) -> None:
        self.in_init = node.name.value == "__init__"

    def visit_Param(self, node: cst.Param) -> bool:
        return False  # the signature keeps its parameter

    def visit_If(self, node: cst.If) -> None:
        if isinstance(node.orelse, cst.If):
            self.elifs.add(id(node.orelse))

    def visit_AssignTarget(self, node: cst.AssignTarget) -> None:
        self.stores.add(id(node.target))

    def visit_Attribute(self, node: cst.Attribute) -> None:
        self.fields.add(id(node.attr))

    def visit_Arg(self, node: cst.Arg) -> None:
        if node.keyword is not None:
            self.fields.add(id(node.keyword))

    def leave_Name(self, original: cst.Name, updated: cst.Name) -> cst.BaseExpression:
        if self.in_init and updated.value == self.param and id(original) not in self.fields:
            return TRUE if self.value else FALSE
        return updated

    def leave_Attribute(self, original: cst.Attribute, updated: cst.Attribute):
        if id(original) not in self.stores and self_attr(updated) in self.attrs:
            return TRUE if self.value else FALSE
        return updated

    def leave_UnaryOperation(self, original, updated: cst.UnaryOperation):
        truth = _truth(updated.expression)
        if isinstance(updated.operator, cst.Not) and truth is not None:
            return FALSE if truth else TRUE
        return updated

    def leave_BooleanOperation(self, original, updated: cst.BooleanOperation):
        left, right = _truth(updated.left), _truth(updated.right)
        is_or = isinstance(updated.operator, cst.Or)
        if left is not None:
            return (TRUE if is_or else FALSE) if left == is_or else updated.right
        if right is not None and right != is_or:
            return updated.left  # `x or False`, `x and True`
        return updated

    def leave_IfExp(self, original, updated: cst.IfExp) -> cst.BaseExpression:
        truth = _truth(updated.test)
        if truth is None:
            return updated
        return updated.body if truth else updated.orelse

    def leave_If(self, original, updated: cst.If):
        truth = _truth(updated.test)
        if truth is None or id(original) in self.elifs:
            return updated
        if truth:
            return _flattened(updated.body.body, updated.leading_lines)
        orelse = updated.orelse
        if orelse is None:
            return cst.RemoveFromParent()
        if isinstance(orelse, cst.If):
            return orelse.with_changes(leading_lines=updated.leading_lines)
        return _flattened(orelse.body.body, updated.leading_lines)


def _flattened(stmts, leading_lines) -> cst.FlattenSentinel:
    """An arm's statements in place of its `if`, the `if`'s blank lines kept."""
    first, *rest = stmts
    return cst.FlattenSentinel([first.with_changes(leading_lines=leading_lines), *rest])


def _truth(node: cst.BaseExpression) -> bool | None:
    if m.matches(node, m.Name("True")):
        return True
    if m.matches(node, m.Name("False")):
        return False
    return None
