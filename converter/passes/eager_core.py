"""Attention sink for hand-written eager cores (no attention interface): Bloom, MPT.

Anchored on the ``softmax`` of the attention forward (catalogue pattern P2):

- the span starts after the KV-cache update ``k, v = cache.update(k, v, ...)``: by the
  ``Cache`` contract its operands are ``[B, H, T, D]`` there, and the query is the score
  product's first operand as it stands at that point (later reshapes are the core's);
- it ends at the assignment of the value the output projection (an owned module of the
  class) reads: merge-heads output, ``[B, T, H*D]``;
- the paged call goes right after the anchor, ``X = self.attn(q.transpose(1, 2)[0], ...,
  kv_cache, input_metadata)[None]``; span statements whose results nothing after the span
  reads are deleted (scores, alibi slices, masks, softmax, merge-heads), and later reads
  of the attention probabilities become ``None``.

The scale is the source's own: factors multiplied into (``*``, ``*=``, ``alpha=``) or
divided out of (``/``, ``/=``) the q·kᵀ chain before the softmax; none means 1.0.
ALiBi comes from ``[<type>.alibi]`` in rules/architectures.toml: ``bias`` (the forward
parameter holding the bias) and ``slopes`` (an ``__init__`` expression: per-head slopes
from the model's own builder). Slopes times key position equals the source's bias up to
a per-query-row constant, which the softmax ignores.
"""

from __future__ import annotations

import libcst as cst

from converter.analysis import bound_names, methods_of, self_attr
from converter.context import ConversionContext
from converter.cstwalk import names_read, nodes_of
from converter.passes.attention_args import _assignments, _statements, head_shape

SOFTMAX = ("softmax",)
PRODUCTS = ("matmul", "bmm", "baddbmm")
_EMPTY = cst.Module(body=[])


def _code(node: cst.CSTNode) -> str:
    return _EMPTY.code_for_node(node)


def has_softmax(node: cst.CSTNode) -> bool:
    return any(_method(c) in SOFTMAX for c in nodes_of(node, cst.Call))


def _method(call: cst.Call) -> str | None:
    func = call.func
    if isinstance(func, cst.Attribute):
        return func.attr.value
    return func.value if isinstance(func, cst.Name) else None


def _targets(stmt: cst.CSTNode) -> set[str]:
    return set(bound_names(stmt))


def _cache_update(stmt: cst.CSTNode) -> cst.Call | None:
    for call in nodes_of(stmt, cst.Call):
        positional = [a for a in call.args if a.keyword is None and not a.star]
        if _method(call) == "update" and len(positional) >= 2:
            if all(isinstance(a.value, cst.Name) for a in positional[:2]):
                return call
    return None


def _product(stmts) -> tuple[cst.CSTNode, cst.BaseExpression] | None:
    """The first q·kᵀ product (matmul/bmm/baddbmm call or ``@``) and its q operand."""
    for stmt in stmts:
        for node in nodes_of(stmt, cst.Call, cst.BinaryOperation):
            if isinstance(node, cst.BinaryOperation) and isinstance(
                node.operator, cst.MatrixMultiply
            ):
                return node, node.left
            if isinstance(node, cst.Call) and _method(node) in PRODUCTS:
                args = {a.keyword.value: a.value for a in node.args if a.keyword}
                positional = [a.value for a in node.args if a.keyword is None]
                if "batch1" in args:
                    return node, args["batch1"]
                if isinstance(node.func, cst.Attribute) and _method(node) == "baddbmm":
                    # alibi.baddbmm(q, k): the method form's first argument is batch1
                    return node, positional[0]
                return node, positional[0]
    return None


def _scale(stmts, product: cst.CSTNode) -> str:
    """Product of the factors applied to the q·kᵀ chain before the softmax."""
    factors: list[str] = []
    if isinstance(product, cst.Call):
        alpha = [a.value for a in product.args if a.keyword and a.keyword.value == "alpha"]
        factors += [_code(a) for a in alpha]
    chain: set[str] = set()
    for stmt in stmts:
        for node in nodes_of(stmt, cst.BinaryOperation, cst.AugAssign):
            if isinstance(node, cst.AugAssign):
                if isinstance(node.target, cst.Name) and node.target.value in chain:
                    if isinstance(node.operator, cst.MultiplyAssign):
                        factors.append(_code(node.value))
                    elif isinstance(node.operator, cst.DivideAssign):
                        factors.append(f"1 / ({_code(node.value)})")
                continue
            left_in = _reaches(node.left, chain, product)
            right_in = _reaches(node.right, chain, product)
            if isinstance(node.operator, cst.Multiply) and left_in != right_in:
                factors.append(_code(node.right if left_in else node.left))
            elif isinstance(node.operator, cst.Divide) and left_in and not right_in:
                factors.append(f"1 / ({_code(node.right)})")
        if _reaches(stmt, chain, product):
            chain |= _targets(stmt)
        if has_softmax(stmt):
            break
    return " * ".join(factors) if factors else "1.0"


def _reaches(node: cst.CSTNode, chain: set[str], product: cst.CSTNode) -> bool:
    return bool(names_read(node) & chain) or any(
        n is product for n in nodes_of(node, type(product))
    )


def _o_proj_input(stmt: cst.CSTNode, owned: set[str], tainted: set[str]) -> str | None:
    """``X`` of a ``self.<owned module>(X)`` call in `stmt` that reads the core's output."""
    for call in nodes_of(stmt, cst.Call):
        attr = self_attr(call.func) if isinstance(call.func, cst.Attribute) else None
        if attr in owned and call.args and names_read(call.args[0].value) & tainted:
            arg = call.args[0].value
            return arg.value if isinstance(arg, cst.Name) else None
    return None


class _NoneFor(cst.CSTTransformer):
    def __init__(self, names: set[str]) -> None:
        self.names = names

    def leave_Name(self, original: cst.Name, updated: cst.Name) -> cst.BaseExpression:
        return cst.Name("None") if updated.value in self.names else updated


def rewrite(ctx: ConversionContext, cls: str, node: cst.ClassDef, forward: cst.FunctionDef):
    """(new forward, PagedAttention args) for the eager core of `cls`."""
    scope = f"{cls}.forward"
    body = list(forward.body.body)
    soft = [i for i, s in enumerate(body) if has_softmax(s)]
    if len(soft) != 1:
        raise ctx.error(
            f"eager attention core: expected one top-level statement with a softmax, found {len(soft)}",
            forward,
            scope=scope,
            hint="branch-local eager cores are not supported yet; extend converter/passes/eager_core.py",
        )
    i_sm = soft[0]
    anchors = [i for i in range(i_sm) if _cache_update(body[i]) is not None]
    if not anchors:
        raise ctx.error(
            "eager attention core without a KV-cache update before the softmax",
            forward,
            scope=scope,
            hint="extend converter/passes/eager_core.py",
        )
    anchor = anchors[-1]
    update = _cache_update(body[anchor])
    k, v = (a.value.value for a in update.args[:2])
    found = _product(body[anchor + 1 : i_sm + 1])
    if found is None or not isinstance(found[1], cst.Name):
        raise ctx.error(
            "eager attention core: no q·kᵀ product of a named query", forward, scope=scope
        )
    product, q_expr = found
    q = q_expr.value

    owned = set(ctx.classes[cls].children)
    tainted = _targets(body[i_sm])
    end = out = None
    for j in range(i_sm + 1, len(body)):
        if not names_read(body[j]) & tainted:
            continue
        out = _o_proj_input(body[j], owned, tainted)
        if out is not None:
            end = max(i for i in range(i_sm, j) if out in _targets(body[i]))
            break
        tainted |= _targets(body[j])
    if end is None:
        raise ctx.error(
            "eager attention core: no output projection reads the attention output",
            forward,
            scope=scope,
        )
    after = body[end + 1 :]
    live_after = set().union(*(names_read(s) for s in after)) if after else set()
    span = body[anchor + 1 : end + 1]
    kept, dropped = [], set()
    for stmt in span:
        targets = _targets(stmt)
        if targets & (live_after - {out}) and not targets & tainted:
            kept.append(stmt)
        else:
            dropped |= targets
    paged = cst.parse_statement(
        f"{out} = self.attn({q}.transpose(1, 2)[0], {k}.transpose(1, 2)[0], "
        f"{v}.transpose(1, 2)[0], kv_cache, input_metadata)[None]  # [1, T, Hq*D]\n"
    )
    rest = [s.visit(_NoneFor((dropped | tainted) & live_after - {out})) for s in after]
    new_body = [*body[: anchor + 1], paged, *kept, *rest]
    new_forward = forward.with_changes(body=forward.body.with_changes(body=new_body))
    args = _ctor_args(
        ctx, cls, node, body[: anchor + 1], q, k, body[anchor + 1 : i_sm + 1], product
    )
    return new_forward, args


def _ctor_args(ctx, cls, node, before, q, k, core, product) -> dict[str, str]:
    methods = methods_of(node)
    init = methods["__init__"]
    config = (
        "config" if any(p.name.value == "config" for p in init.params.params) else "self.config"
    )
    q_dims = _view_dims(q, before, methods)
    k_dims = _view_dims(k, before, methods)
    if q_dims is None:
        raise ctx.error(
            "eager attention core: cannot find the view that splits the query's heads",
            init,
            scope=f"{cls}.forward",
        )
    args = {
        "num_heads": _heads_of(q_dims) or f"{config}.num_attention_heads",
        "head_dim": _code(q_dims[-1]),
        "scale": _scale(core, product),
    }
    kv = _heads_of(k_dims) if k_dims else None
    if kv is not None and kv != args["num_heads"]:
        args["num_kv_heads"] = kv
    alibi = ctx.rules.get("architectures", {}).get(ctx.model_type, {}).get("alibi")
    if alibi and any(alibi["bias"] in names_read(s) for s in core):
        args["alibi_slopes"] = alibi["slopes"]
    # Any other forward input the scores read (beyond q/k/v and masks) is a bias the
    # paged kernel would silently drop (e.g. a learned relative-position bias): refuse.
    params = {p.name.value for p in methods["forward"].params.params} - {"self"}
    read = set().union(*(names_read(s) for s in core))
    update = _cache_update(before[-1])  # the anchor: its cache object is no score input
    read -= names_read(update.func) if update is not None else set()
    extra = sorted(n for n in params & read if "mask" not in n and n != (alibi or {}).get("bias"))
    if extra:
        raise ctx.error(
            f"eager attention core adds forward input(s) {extra} to its scores",
            methods["forward"],
            scope=f"{cls}.forward",
            hint="ALiBi biases: declare [<type>.alibi] in rules/architectures.toml; "
            "other biases need a PagedAttention feature",
        )
    return args


def _view_dims(name: str, before, methods) -> list[cst.BaseExpression] | None:
    """Dims of the view splitting `name`'s heads: in the forward, else in a ``self.<m>()``
    helper the name is computed by (Bloom's ``_reshape``)."""
    assigns = _assignments(_statements(before))
    dims = head_shape(name, assigns)
    if dims is not None:
        return dims
    for rhs in assigns.get(name, []):
        for call in nodes_of(rhs, cst.Call):
            helper = self_attr(call.func) if isinstance(call.func, cst.Attribute) else None
            if helper in methods:
                stmts = _statements(methods[helper].body.body)
                for views in _assignments(stmts).values():
                    for value in views:
                        for c in nodes_of(value, cst.Call):
                            if _method(c) in ("view", "reshape") and len(c.args) >= 4:
                                return [a.value for a in c.args]
    return None


def _heads_of(dims) -> str | None:
    """The head-count dim: the last non-literal dim before head_dim (``view(B, T, H, 3, D)``
    has a literal 3 for the fused q/k/v index)."""
    literal = (cst.Integer, cst.UnaryOperation)
    candidates = [dims[-2]] + ([dims[-3]] if len(dims) >= 5 else [])
    for dim in candidates:
        if not isinstance(dim, literal):
            return _code(dim)
    return None
