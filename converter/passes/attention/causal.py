"""Causality: paged attention is causal only, and the attention interface's contract says
whether a layer is through ``self.is_causal``.

- ``self.is_causal = False``: the conversion stops (a bidirectional layer).
- ``self.is_causal = not <param>`` / ``= <param>`` of a constructor parameter (GPT-2's
  ``not is_cross_attention``): every instance that builds has that parameter pinned, so
  ``__init__`` refuses the other value first and the parameter, and any attribute that
  holds it, are that constant in the class (the cross-attention arms go: GPT-2's
  ``q_attn`` and its two-projection ``c_attn``).
- any other expression: a guard after the layer is built refuses the bidirectional
  configuration.
"""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from converter.context import ConversionContext
from converter.cst_helpers import flat_statements, methods_of, self_attr

TRUE, FALSE = cst.Name("True"), cst.Name("False")
SUPER_INIT = m.SimpleStatementLine(
    body=[m.Expr(m.Call(func=m.Attribute(m.Call(func=m.Name("super")), m.Name("__init__"))))]
)


def causal_flag(init: cst.FunctionDef) -> cst.BaseExpression | None:
    """The value assigned to ``self.is_causal`` in ``__init__``, if any."""
    for small in flat_statements(init.body.body):
        if isinstance(small, cst.Assign) and any(
            self_attr(t.target) == "is_causal" for t in small.targets
        ):
            return small.value
    return None


def pinned_parameter(init: cst.FunctionDef) -> tuple[str, bool] | None:
    """(parameter, the value it has in every instance that builds) when ``self.is_causal``
    is a constructor parameter or its negation."""
    flag = causal_flag(init)
    negated = m.matches(flag, m.UnaryOperation(operator=m.Not(), expression=m.Name()))
    name = flag.expression if negated else flag
    params = {p.name.value for p in init.params.params}
    if isinstance(name, cst.Name) and name.value in params:
        return name.value, not negated
    return None


def pin(ctx: ConversionContext, cls: cst.ClassDef) -> cst.ClassDef:
    """`cls` with a pinned constructor parameter (`pinned_parameter`) refused at the top
    of ``__init__`` and folded into the class as a constant."""
    init = methods_of(cls).get("__init__")
    found = pinned_parameter(init) if init is not None else None
    if found is None:
        return cls
    param, value = found
    attrs = {
        self_attr(t.target)
        for s in flat_statements(init.body.body)
        if isinstance(s, cst.Assign) and m.matches(s.value, m.Name(param))
        for t in s.targets
    } - {None}
    folded = cls.visit(_Fold(param, value, attrs))
    name = cls.name.value
    guard = cst.parse_statement(
        f"if {'not ' if value else ''}{param}:\n"
        f'    raise ValueError("{name}: {param}={not value} makes attention bidirectional; '
        'paged attention is causal only")\n'
    )
    ctx.log.append(f"{name}: {param}={value} in every instance that builds (is_causal)")
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


def guard(ctx: ConversionContext, cls: str, init: cst.FunctionDef) -> list[cst.BaseStatement]:
    """The statements ``__init__`` ends with for its ``self.is_causal``: none when causal,
    a refusal of the bidirectional configuration when the config decides it."""
    flag = causal_flag(init)
    if flag is None or m.matches(flag, m.Name("True")):
        return []
    if m.matches(flag, m.Name("False")):
        raise ctx.error(
            f"{cls} is not causal (is_causal = False)",
            init,
            scope=f"{cls}.__init__",
            hint="paged attention is causal only; extend PagedAttention for bidirectional layers",
        )
    # configuration-dependent: refuse the bidirectional configuration at build time
    return [
        cst.parse_statement(
            "if not self.is_causal:\n"
            f'    raise ValueError("{cls}: this configuration makes attention bidirectional; '
            'paged attention is causal only")\n'
        )
    ]


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
