"""Mask buffers an eager core reads (GPT-Neo's and OpenAI GPT's ``self.bias``).

The paged kernel masks causally on its own, so a core's mask buffer may only be dropped
when it is causal: built in ``__init__`` as ``tril(ones(...))`` (any ``.view``), maybe
banded under a condition, ``bias = bitwise_xor(bias, tril(bias, -W))`` (GPT-Neo's local
layers): key j visible to query i iff ``i - W < j <= i``, PagedAttention's
``sliding_window=W``. Any other buffer the scores read stops the conversion.
"""

from __future__ import annotations

import libcst as cst

from converter.cst_helpers import (
    bound_names,
    code,
    dotted,
    methods_of,
    names_read,
    nodes_of,
    self_attr,
)


def _name(call: cst.Call) -> str:
    return (dotted(call.func) or "").rsplit(".", 1)[-1]


def _buffers(init: cst.FunctionDef) -> dict[str, cst.BaseExpression]:
    """``self.X = nn.Buffer(V, ...)`` / ``self.register_buffer("X", V, ...)`` -> {X: V}."""
    out = {}
    for call in nodes_of(init.body, cst.Call):
        if _name(call) == "register_buffer" and len(call.args) >= 2:
            key = call.args[0].value
            if isinstance(key, cst.SimpleString):
                out[key.evaluated_value] = call.args[1].value
    for assign in nodes_of(init.body, cst.Assign):
        value = assign.value
        if isinstance(value, cst.Call) and _name(value) == "Buffer" and value.args:
            for target in assign.targets:
                if (attr := self_attr(target.target)) is not None:
                    out[attr] = value.args[0].value
    return out


def _is_causal(expr: cst.BaseExpression) -> bool:
    """``tril(ones(...))`` possibly wrapped in ``.view(...)`` / ``.to(...)``."""
    return any(
        _name(c) == "tril" and c.args and any(_name(o) == "ones" for o in nodes_of(c, cst.Call))
        for c in nodes_of(expr, cst.Call)
    )


def _band(expr: cst.BaseExpression, name: str) -> str | None:
    """W of ``bitwise_xor(name, tril(name, -W))``, else None."""
    if not (isinstance(expr, cst.Call) and _name(expr) == "bitwise_xor" and len(expr.args) == 2):
        return None
    first, second = (a.value for a in expr.args)
    if not (isinstance(first, cst.Name) and first.value == name and isinstance(second, cst.Call)):
        return None
    if _name(second) != "tril" or len(second.args) != 2:
        return None
    offset = second.args[1].value
    if isinstance(offset, cst.UnaryOperation) and isinstance(offset.operator, cst.Minus):
        return code(offset.expression)
    return None


def _assignments(body, name: str, cond: str | None = None):
    """(condition or None, value) of each ``name = value`` in `body`, ifs included."""
    out = []
    for stmt in body:
        if isinstance(stmt, cst.SimpleStatementLine):
            for small in stmt.body:
                if isinstance(small, cst.Assign) and any(
                    isinstance(t.target, cst.Name) and t.target.value == name for t in small.targets
                ):
                    out.append((cond, small.value))
        elif isinstance(stmt, cst.If) and stmt.orelse is None and cond is None:
            out += _assignments(stmt.body.body, name, code(stmt.test))
        elif any(n.value == name for n in nodes_of(stmt, cst.Name)):
            out.append(("?", stmt))  # assigned some other way: unknown
    return out


def window_of(ctx, node: cst.ClassDef, core, scope: str) -> str | None:
    """PagedAttention's ``sliding_window`` expression for the mask buffers `core` reads."""
    init = methods_of(node)["__init__"]
    buffers = _buffers(init)
    read = {self_attr(a) for s in core for a in nodes_of(s, cst.Attribute)} & set(buffers)
    windows = []
    for attr in sorted(read):

        def refuse(attr=attr):
            return ctx.error(
                f"eager attention core reads the buffer self.{attr}, which is not a causal mask",
                init,
                scope=scope,
                hint="extend converter/passes/attention/eager/masks.py (or PagedAttention)",
            )

        value = buffers[attr]
        if _is_causal(value):
            continue
        if not isinstance(value, cst.Name):
            raise refuse()
        steps = _assignments(init.body.body, value.value)
        if not steps or steps[0][0] is not None or not _is_causal(steps[0][1]):
            raise refuse()
        for cond, expr in steps[1:]:
            width = _band(expr, value.value) if cond != "?" else None
            if width is None:
                raise refuse()
            windows.append(width if cond is None else f"{width} if {cond} else None")
    if len(windows) > 1:
        raise ctx.error("eager attention core reads several banded masks", init, scope=scope)
    return windows[0] if windows else None


def mask_names(ctx, node: cst.ClassDef, core, scope: str) -> frozenset[str]:
    """Names `core` binds from the mask buffers it reads (``b = self.bias[..., :T, :S]``).
    Scores may meet them only in a blend, ``s * b + C * (1 - b)`` with C a negative
    constant (OpenAI GPT's ``-1e4``): masked scores become C, which the softmax zeroes as
    the kernel's causal mask does; a bare ``s * b`` leaves them 0 and stops the conversion."""
    buffers = set(_buffers(methods_of(node)["__init__"]))
    names: set[str] = set()
    for stmt in core:
        targets = set(bound_names(stmt))
        reads = {self_attr(a) for a in nodes_of(stmt, cst.Attribute)} & buffers
        small = stmt.body if isinstance(stmt, cst.SimpleStatementLine) else [stmt]
        rhs = [getattr(x, "value", None) or x for x in small]
        values = set().union(*(names_read(v.visit(_NoSizes())) for v in rhs)) - {"self", "_"}
        if targets and not targets & values and (reads or (values and values <= names)):
            names |= targets
    for stmt in core:
        for mul in nodes_of(stmt, cst.BinaryOperation):
            if not isinstance(mul.operator, cst.Multiply):
                continue
            left, right = names_read(mul.left), names_read(mul.right)
            scores = (left & names and right - names) or (right & names and left - names)
            if scores and not _in_blend(stmt, mul, names):
                raise ctx.error(
                    f"eager attention core multiplies its scores by a mask ({code(mul)}) "
                    "outside a blend s * m + C * (1 - m)",
                    stmt,
                    scope=scope,
                    hint="extend converter/passes/attention/eager/masks.py",
                )
    return frozenset(names)


class _NoSizes(cst.CSTTransformer):
    """``x.size(i)`` / ``x.shape`` read no values (a mask cropped to the scores' size)."""

    def leave_Call(self, original: cst.Call, updated: cst.Call) -> cst.BaseExpression:
        if isinstance(original.func, cst.Attribute) and original.func.attr.value == "size":
            return cst.Name("_")
        return updated

    def leave_Attribute(self, original, updated: cst.Attribute) -> cst.BaseExpression:
        return cst.Name("_") if updated.attr.value == "shape" else updated


def _negative(expr: cst.BaseExpression) -> bool:
    """A negative constant: ``-1e4``, ``-10000``, ``torch.finfo(x.dtype).min``."""
    if isinstance(expr, cst.UnaryOperation) and isinstance(expr.operator, cst.Minus):
        return isinstance(expr.expression, (cst.Integer, cst.Float))
    return isinstance(expr, cst.Attribute) and expr.attr.value == "min"


def _complement(expr: cst.BaseExpression, names: set[str]) -> bool:
    """``1 - m`` (``1.0 - m``) of a mask name."""
    return (
        isinstance(expr, cst.BinaryOperation)
        and isinstance(expr.operator, cst.Subtract)
        and isinstance(expr.left, (cst.Integer, cst.Float))
        and float(expr.left.value) == 1.0
        and bool(names_read(expr.right) & names)
    )


def _in_blend(stmt, mul: cst.BinaryOperation, names: set[str]) -> bool:
    """`mul` is the ``s * m`` of an ``s * m + C * (1 - m)`` in `stmt` (either order)."""
    for add in nodes_of(stmt, cst.BinaryOperation):
        if not isinstance(add.operator, cst.Add) or mul not in (add.left, add.right):
            continue
        other = add.right if add.left is mul else add.left
        if isinstance(other, cst.BinaryOperation) and isinstance(other.operator, cst.Multiply):
            a, b = other.left, other.right
            if (_negative(a) and _complement(b, names)) or (_negative(b) and _complement(a, names)):
                return True
    return False
