"""Where an eager core's paged call goes: the first statement from the KV-cache update on
after which the query is ``[B, H, T, D]``.

By the ``Cache`` contract k/v are ``[B, H, T, D]`` at the update. Most sources have split
the query's heads before it (Bloom, MPT, Falcon): the call goes right after the update.
Others split it later, next to the core (XGLM: ``q.view(B, T, H, D).transpose(1, 2)``
after the update, then ``reshape(B * H, T, D)`` for ``bmm``): the call goes after that
view, before the core flattens the heads into the batch. The query's shape comes from the
head-shape interpreter (`head_shapes`).
"""

from __future__ import annotations

import libcst as cst

from converter.analysis.head_shapes import forward_interpreter
from converter.analysis.shape_ops import Shape
from converter.cst_helpers import methods_of


def split_point(
    node: cst.ClassDef, forward: cst.FunctionDef, body: list, anchor: int, q: str, product: int
) -> int:
    """Index in `body` after which the paged call goes: `anchor` (the cache update)
    unless the query `q` is not yet 4-d there and a later statement before the
    `product` statement (q·kᵀ) makes it so."""
    interp, env = forward_interpreter(forward, methods_of(node))
    interp.run(body[: anchor + 1], env)
    at_anchor = env.get(q)
    if not isinstance(at_anchor, Shape) or len(at_anchor.dims) == 4:
        return anchor  # split already, or unknown: the cache contract's place
    for i in range(anchor + 1, product):
        interp.run([body[i]], env)
        value = env.get(q)
        if isinstance(value, Shape) and len(value.dims) == 4:
            return i
    return anchor
