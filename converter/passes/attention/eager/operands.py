"""Operands of an eager core with no KV-cache update (OpenAI GPT recomputes the whole
sequence at every step): the paged call stores this step's K/V itself, so it goes where
q, k and v are final, after the last statement before the q·kᵀ product that binds one.

- k: the product's second operand. ``k.transpose(-1, -2)`` (either order of the last two
  axes) or ``k.mT`` reads a ``[B, H, T, D]`` key. A bare name (``matmul(q, k)``) is a key
  stored transposed, ``[B, H, D, T]`` (OpenAI GPT's ``split_heads(key, k=True)`` permutes
  it so): the paged call reads it as ``k.permute(0, 3, 1, 2)``. Where the head-shape
  interpreter knows both, k's axis -2 must be the query's head size.
- v: the other operand of the first product after the softmax that reads the
  probabilities (``matmul(probs, v)``, ``probs @ v``).
"""

from __future__ import annotations

import libcst as cst

from converter.analysis.shape_ops import Shape, as_int
from converter.cst_helpers import bound_names, call_name, names_read, nodes_of

PRODUCTS = ("matmul", "bmm")
_LAST_TWO = ({-1, -2}, {2, 3})


def _operands(node: cst.CSTNode) -> tuple[cst.BaseExpression, cst.BaseExpression] | None:
    if isinstance(node, cst.BinaryOperation) and isinstance(node.operator, cst.MatrixMultiply):
        return node.left, node.right
    if isinstance(node, cst.Call) and call_name(node) in PRODUCTS:
        values = [a.value for a in node.args if not a.star]
        if len(values) == 2:
            return values[0], values[1]
    return None


def key_operand(product: cst.CSTNode) -> tuple[str, bool] | None:
    """(key name, stored transposed) of a q·kᵀ `product`, or None if not a plain key."""
    pair = _operands(product)
    if pair is None:
        return None
    key = pair[1]
    if isinstance(key, cst.Name):
        return key.value, True
    if (
        isinstance(key, cst.Attribute)
        and key.attr.value == "mT"
        and isinstance(key.value, cst.Name)
    ):
        return key.value.value, False
    if isinstance(key, cst.Call) and call_name(key) in ("transpose", "swapaxes"):
        base = key.func.value if isinstance(key.func, cst.Attribute) else None
        axes = {as_int(a.value) for a in key.args}
        if isinstance(base, cst.Name) and axes in _LAST_TWO:
            return base.value, False
    return None


def value_operand(body: list, start: int, probs: set[str]) -> str | None:
    """v of the first product in `body[start:]` whose other operand reads `probs`."""
    for stmt in body[start:]:
        for node in nodes_of(stmt, cst.Call, cst.BinaryOperation):
            pair = _operands(node)
            if pair is None or not names_read(pair[0]) & probs:
                continue
            return pair[1].value if isinstance(pair[1], cst.Name) else None
    return None


def final_point(body: list, product_at: int, names: set[str]) -> int:
    """Index of the last statement before `product_at` that binds one of `names` (-1)."""
    binds = [i for i in range(product_at) if set(bound_names(body[i])) & names]
    return binds[-1] if binds else -1


def key_shape_agrees(env: dict, q: str, k: str, transposed: bool) -> bool:
    """False when the interpreter knows q's head size and k holds it on the other axis."""
    qs, ks = env.get(q), env.get(k)
    if not (isinstance(qs, Shape) and isinstance(ks, Shape)) or len(ks.dims) != 4:
        return True
    d = qs.dims[-1]
    if d is None:
        return True
    axis, other = (ks.dims[-2], ks.dims[-1]) if transposed else (ks.dims[-1], ks.dims[-2])
    return axis == d or (axis is None and other != d)
