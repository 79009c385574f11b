"""Attention sink for hand-written eager cores (no attention interface): Bloom, MPT,
Falcon, GPT-Neo, GPT-NeoX-Japanese, OpenAI GPT.

First a softmax helper method is inlined (`eager_inline`) and a fused-kernel arm next
to the softmax arm dropped (`eager_arms.keep_eager_arms`); a core inside the arms of a
branch is rewritten arm by arm (`_branch`, `eager_arms.merge_arm_args`). Then each core
is anchored on its ``softmax`` (catalogue pattern P2):

- the span starts after the KV-cache update ``k, v = cache.update(k, v, ...)``: by the
  ``Cache`` contract its operands are ``[B, H, T, D]`` there, and the query is the score
  product's first operand as it stands at that point (later reshapes are the core's);
- a core with no cache update (OpenAI GPT) starts where q, k and v are final: the paged
  call stores K/V itself (`eager_operands`: a bare key operand is stored transposed);
- it ends at the assignment of the value the output projection (an owned module of the
  class) reads: merge-heads output, ``[B, T, H*D]``;
- the paged call goes right after the anchor, ``X = self.attn(q.transpose(1, 2)[0], ...,
  kv_cache, input_metadata)[None]``; span statements whose results nothing after the span
  reads are deleted (scores, alibi slices, masks, softmax, merge-heads), and later reads
  of the attention probabilities become ``None``.

The PagedAttention arguments (`eager_args`): the scale is the source's own factors on
the q·kᵀ chain; ALiBi comes from ``[<type>.alibi]`` in rules/architectures.toml: ``bias``
(the forward parameter holding the bias), ``slopes`` (an ``__init__`` expression: per-head
slopes from the model's own builder), optionally ``enabled`` and ``dtype`` (the one the
model's builder computes ``slope * position`` in: ``"bfloat16"`` for Falcon). Slopes
times key position equals the source's bias up to a per-query-row constant, which the
softmax ignores. Mask buffers: `eager_masks`.
"""

from __future__ import annotations

import libcst as cst

from converter.context import ConversionContext
from converter.cst_helpers import (
    bound_names,
    call_name,
    dotted,
    has_softmax,
    methods_of,
    names_read,
    nodes_of,
    self_attr,
)
from converter.passes.attention.eager.args import ctor_args
from converter.passes.attention.eager.arms import (
    BiasTests,
    keep_eager_arms,
    merge_arm_args,
    same_arms,
)
from converter.passes.attention.eager.inline import inline_softmax_helpers
from converter.passes.attention.eager.none import lengths, none_for
from converter.passes.attention.eager.operands import (
    final_point,
    key_operand,
    key_shape_agrees,
    value_operand,
)
from converter.passes.attention.eager.point import split_point
from converter.passes.attention.eager.static import shapes_before

SOFTMAX = ("softmax",)
PRODUCTS = ("matmul", "bmm", "baddbmm")


def _bound(stmt: cst.CSTNode) -> set[str]:
    return set(bound_names(stmt))


def _cache_update(stmt: cst.CSTNode) -> cst.Call | None:
    for call in nodes_of(stmt, cst.Call):
        positional = [a for a in call.args if a.keyword is None and not a.star]
        if call_name(call) == "update" and len(positional) >= 2:
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
            if isinstance(node, cst.Call) and call_name(node) in PRODUCTS:
                args = {a.keyword.value: a.value for a in node.args if a.keyword}
                positional = [a.value for a in node.args if a.keyword is None]
                if "batch1" in args:
                    return node, args["batch1"]
                if call_name(node) == "baddbmm" and dotted(node.func) in (
                    "torch.baddbmm",
                    "baddbmm",
                ):
                    # torch.baddbmm(input, q, k): the function form's batch1 comes second
                    return node, positional[1]
                # alibi.baddbmm(q, k): the method form's first argument is batch1
                return node, positional[0]
    return None


def _o_proj_input(stmt: cst.CSTNode, owned: set[str], tainted: set[str]) -> str | None:
    """``X`` of a ``self.<owned module>(X)`` call in `stmt` that reads the core's output."""
    for call in nodes_of(stmt, cst.Call):
        attr = self_attr(call.func) if isinstance(call.func, cst.Attribute) else None
        if attr in owned and call.args and names_read(call.args[0].value) & tainted:
            arg = call.args[0].value
            return arg.value if isinstance(arg, cst.Name) else None
    return None


def rewrite(
    ctx: ConversionContext, cls: str, node: cst.ClassDef, forward: cst.FunctionDef
) -> tuple[cst.FunctionDef, dict[str, cst.BaseExpression]]:
    """(new forward, PagedAttention arguments) for the eager core(s) of `cls`. Inside this
    package the arguments are the code its arms compare; the stage gets expressions."""
    scope = f"{cls}.forward"
    body = keep_eager_arms(inline_softmax_helpers(ctx, node, list(forward.body.body), scope))
    new_body, args = _block(ctx, cls, node, forward, body, [], None, scope)
    new_forward = forward.with_changes(body=forward.body.with_changes(body=new_body))
    if "alibi" in args:
        new_forward = new_forward.visit(BiasTests(_alibi(ctx)["bias"]))
    return new_forward, {name: cst.parse_expression(text) for name, text in args.items()}


def _alibi(ctx: ConversionContext) -> dict:
    return ctx.rules.get("architectures", {}).get(ctx.model_type, {}).get("alibi") or {}


def _block(ctx, cls, node, forward, body, before, kv, scope):
    """(new statements, PagedAttention args) for the one core in `body`; `before` holds
    the statements that run before it, `kv` the cache update an enclosing block made."""
    soft = [i for i, s in enumerate(body) if has_softmax(s)]
    if len(soft) != 1:
        raise ctx.error(
            f"eager attention core: expected one top-level statement with a softmax, found {len(soft)}",
            forward,
            scope=scope,
            hint="extend converter/passes/attention/eager/",
        )
    i_sm = soft[0]
    anchors = [i for i in range(i_sm) if _cache_update(body[i]) is not None]
    if anchors:
        anchor = anchors[-1]
        update = _cache_update(body[anchor])
        k, v = (a.value.value for a in update.args[:2])
    elif kv is not None:
        anchor, (update, k, v) = -1, kv  # the update ran before this block
    else:  # no cache: the paged call stores this step's K/V (eager_operands)
        return _no_cache(ctx, cls, node, forward, body, i_sm, before, scope)
    if isinstance(body[i_sm], cst.If) and _product([body[i_sm]]) is not None:
        return _branch(ctx, cls, node, forward, body, i_sm, before, (update, k, v), scope)
    found = _product(body[anchor + 1 : i_sm + 1])
    if found is None or not isinstance(found[1], cst.Name):
        raise ctx.error(
            "eager attention core: no q·kᵀ product of a named query", forward, scope=scope
        )
    product, q_expr = found
    q = q_expr.value
    if anchor >= 0:  # the query's heads may be split after the cache update (XGLM)
        at = next(j for j in range(anchor + 1, i_sm + 1) if _product([body[j]]) is not None)
        anchor = split_point(node, forward, body, anchor, q, at)
    return _rewrite(
        ctx, cls, node, forward, body, i_sm, before, scope, anchor, q, product, update, k, v
    )


def _rewrite(ctx, cls, node, forward, body, i_sm, before, scope, anchor, q, product, update, k, v):
    """The span rewrite once the paged call's place (after `anchor`), the query and the
    k/v names are known (`update`: the cache update, None for an uncached core)."""
    k_transposed = update is None and key_operand(product)[1]

    owned = set(ctx.classes[cls].children)
    tainted = _bound(body[i_sm])
    end = out = None
    for j in range(i_sm + 1, len(body)):
        if not names_read(body[j]) & tainted:
            continue
        out = _o_proj_input(body[j], owned, tainted)
        if out is not None:
            end = max(i for i in range(i_sm, j) if out in _bound(body[i]))
            break
        tainted |= _bound(body[j])
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
        targets = _bound(stmt)
        if targets & (live_after - {out}) and not targets & tainted:
            kept.append(stmt)
        else:
            dropped |= targets
    k_read = f"{k}.permute(0, 3, 1, 2)[0]" if k_transposed else f"{k}.transpose(1, 2)[0]"
    paged = cst.parse_statement(
        f"{out} = self.attn({q}.transpose(1, 2)[0], {k_read}, "
        f"{v}.transpose(1, 2)[0], kv_cache, input_metadata)[None]  # [1, T, Hq*D]\n"
    )
    false = set(ctx.rules.get("training", {}).get("flags", {}).get("false", []))
    rest = none_for(after, (dropped | tainted) & live_after - {out}, lengths(span, false))
    new_body = [*body[: anchor + 1], paged, *kept, *rest]
    views = [*before, *body[: anchor + 1]]
    core = body[anchor + 1 : i_sm + 1]
    return new_body, ctor_args(ctx, cls, node, views, q, k, core, product, update, forward)


def _no_cache(ctx, cls, node, forward, body, i_sm, before, scope):
    """A core with no KV-cache update: the paged call goes where q, k and v are final."""
    found = _product(body[: i_sm + 1])
    key = key_operand(found[0]) if found is not None else None
    if key is None or not isinstance(found[1], cst.Name):
        raise ctx.error(
            "eager attention core without a KV-cache update: no q·kᵀ product of a named "
            "query and key (k, k.transpose(-1, -2) or k.mT)",
            forward,
            scope=scope,
            hint="extend converter/passes/attention/eager/operands.py",
        )
    (product, q_expr), (k, transposed) = found, key
    v = value_operand(body, i_sm + 1, _bound(body[i_sm]))
    if v is None:
        raise ctx.error(
            "eager attention core: no product of the probabilities with a named value",
            forward,
            scope=scope,
        )
    at = next(j for j in range(i_sm + 1) if _product([body[j]]) is not None)
    anchor = final_point(body, at, {q_expr.value, k, v})
    env = shapes_before(forward, methods_of(node), [*before, *body[: anchor + 1]])
    if not key_shape_agrees(env, q_expr.value, k, transposed):
        raise ctx.error(
            f"eager attention core: the key {k} is read as "
            f"{'[B, H, D, T]' if transposed else '[B, H, T, D]'}, but its shape says otherwise",
            forward,
            scope=scope,
        )
    return _rewrite(
        ctx,
        cls,
        node,
        forward,
        body,
        i_sm,
        before,
        scope,
        anchor,
        q_expr.value,
        product,
        None,
        k,
        v,
    )


def _branch(ctx, cls, node, forward, body, i, before, kv, scope):
    """Cores in the arms of an if/else (Falcon: rotary arm, ALiBi arm): each arm is
    rewritten with the cache update made before the branch; one set of arguments."""
    outer = [*before, *body[:i]]
    found: list[dict[str, str]] = []

    def arm(block):
        if not any(has_softmax(s) for s in block):
            return block
        new, args = _block(ctx, cls, node, forward, block, outer, kv, scope)
        found.append(args)
        return new

    def visit(stmt: cst.If) -> cst.If:
        orelse = stmt.orelse
        if isinstance(orelse, cst.If):
            orelse = visit(orelse)
        elif orelse is not None:
            orelse = orelse.with_changes(body=orelse.body.with_changes(body=arm(orelse.body.body)))
        return stmt.with_changes(
            body=stmt.body.with_changes(body=arm(stmt.body.body)), orelse=orelse
        )

    new_if = visit(body[i])
    init = methods_of(node)["__init__"]
    config = (
        "config" if any(p.name.value == "config" for p in init.params.params) else "self.config"
    )
    args = merge_arm_args(ctx, found, body[i], scope, config)
    return [*body[:i], *same_arms(new_if), *body[i + 1 :]], args
