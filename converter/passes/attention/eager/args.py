"""PagedAttention arguments of a hand-written eager core (converter/passes/attention/eager/).

- scale: the factors multiplied into (``*``, ``*=``, ``alpha=``) or divided out of
  (``/``, ``/=``) the q·kᵀ chain before the softmax; none means 1.0. Factors applied
  after the ALiBi bias joined the chain (Falcon: ``(qkᵀ + alibi) * inv_norm``) scale the
  bias too (``Alibi(..., scale=)``), since the kernel adds it after scaling q·kᵀ.
- heads: the query's (key's) ``[B, H, T, D]`` dims at the cache update, as the head-shape
  interpreter reads them (`converter.analysis.head_shapes`: through views, helper
  methods such as Bloom's ``_reshape`` or GPT-Neo's ``_split_heads``, and forward locals
  such as ``n_kv = self.a if self.flag else self.b``, which ``__init__`` can read too).
- ALiBi: ``[<type>.alibi]`` in rules/architectures.toml (see eager_core), emitted as
  ``alibi=Alibi(<slopes>, scale=<factors after the bias>, dtype=torch.<rule dtype>)``.
"""

from __future__ import annotations

from collections.abc import Callable

import libcst as cst

from converter.analysis.shape_ops import Shape
from converter.context import ConversionContext
from converter.cst_helpers import (
    bound_names,
    code,
    has_softmax,
    methods_of,
    names_read,
    nodes_of,
)
from converter.passes.attention.eager.masks import mask_names, window_of
from converter.passes.attention.eager.static import (
    forward_only,
    shapes_before,
    static_dim,
    static_sizes,
)
from converter.passes.attention.interface import (
    rule_overrides,
)

ALIBI_DTYPES = ("float32", "bfloat16")  # runtime.attention.params.Alibi's dtypes


def scale_of(
    stmts, product: cst.CSTNode, bias: str | None, masks: frozenset[str] = frozenset()
) -> tuple[str, list[str]]:
    """(scale, factors that also multiply the bias) of the q·kᵀ chain before the softmax.
    Factors reading `masks` (causal mask buffers, `eager_masks.mask_names`) are masks, not
    scales; factors under ``if <test>:`` apply only when the test holds."""
    factors: list[str] = []
    bias_factors: list[str] = []
    if isinstance(product, cst.Call):
        alpha = [a.value for a in product.args if a.keyword and a.keyword.value == "alpha"]
        factors += [code(a) for a in alpha]
    chain: set[str] = set()
    biased: set[str] = set()  # chain names that already hold the bias

    def found(into: list) -> Callable[[str, bool], None]:
        def add(factor: str, with_bias: bool) -> None:
            if names_read(cst.parse_expression(factor)) & masks:
                return
            into.append((factor, with_bias))

        return add

    def walk(block, add) -> bool:
        for stmt in block:
            if isinstance(stmt, cst.If) and stmt.orelse is None and not has_softmax(stmt):
                inner: list = []
                walk(stmt.body.body, found(inner))
                if inner:
                    joined = " * ".join(f for f, _ in inner)
                    add(f"({joined} if {code(stmt.test)} else 1.0)", any(b for _, b in inner))
                continue
            _factors(stmt, add)
            if has_softmax(stmt):
                return True
        return False

    def _factors(stmt, add) -> None:
        if set(bound_names(stmt)) & masks:
            return  # a mask cropped to the scores' size is no part of the chain
        for node in nodes_of(stmt, cst.BinaryOperation, cst.AugAssign):
            if isinstance(node, cst.AugAssign):
                if isinstance(node.target, cst.Name) and node.target.value in chain:
                    has_bias = node.target.value in biased
                    if isinstance(node.operator, cst.MultiplyAssign):
                        add(code(node.value), has_bias)
                    elif isinstance(node.operator, cst.DivideAssign):
                        add(f"1 / ({code(node.value)})", has_bias)
                continue
            left_in = _reaches(node.left, chain, product)
            right_in = _reaches(node.right, chain, product)
            side = node.left if left_in else node.right
            has_bias = bool(names_read(side) & (biased | {bias}))
            if isinstance(node.operator, cst.Multiply) and left_in != right_in:
                add(code(node.right if left_in else node.left), has_bias)
            elif isinstance(node.operator, cst.Divide) and left_in and not right_in:
                add(f"1 / ({code(node.right)})", has_bias)
        if _reaches(stmt, chain, product):
            targets = set(bound_names(stmt))
            chain.update(targets)
            if _value_reads(stmt) & (biased | {bias}):
                biased.update(targets)

    collected: list = []
    walk(stmts, found(collected))
    factors += [f for f, _ in collected]
    bias_factors += [f for f, b in collected if b]
    return (" * ".join(factors) if factors else "1.0"), bias_factors


def alibi_value(ctx: ConversionContext, alibi: dict, bias_factors: list[str]) -> str:
    """``Alibi(<slopes>, scale=<factors on the bias>, dtype=torch.<dtype>)`` from the rule:
    factors applied after the bias joined the scores scale the built bias."""
    parts = [alibi["slopes"]]
    if bias_factors:
        parts.append(f"scale={' * '.join(bias_factors)}")
    dtype = alibi.get("dtype", "float32")
    if dtype not in ALIBI_DTYPES:
        raise ctx.error(
            f"[{ctx.model_type}.alibi] dtype = {dtype!r} in rules/architectures.toml",
            hint=f"PagedAttention builds ALiBi in one of {ALIBI_DTYPES}",
        )
    if dtype != "float32":
        parts.append(f"dtype=torch.{dtype}")
    return f"Alibi({', '.join(parts)})"


def _value_reads(stmt: cst.CSTNode) -> set[str]:
    """Names a statement reads, not counting the names its assignments bind."""
    if isinstance(stmt, cst.SimpleStatementLine):
        values = [getattr(s, "value", None) or s for s in stmt.body]
        return set().union(*(names_read(v) for v in values))
    return names_read(stmt)


def _reaches(node: cst.CSTNode, chain: set[str], product: cst.CSTNode) -> bool:
    return bool(names_read(node) & chain) or any(
        n is product for n in nodes_of(node, type(product))
    )


def ctor_args(ctx: ConversionContext, cls, node, before, q, k, core, product, update, forward):
    """PagedAttention arguments; `before` runs before the core, `update` is the cache
    update (its cache object is no score input). Size reads the forward makes at run time
    become their static dims (`eager_static`)."""
    methods = methods_of(node)
    env = shapes_before(forward, methods, before)
    init = methods["__init__"]
    config = (
        "config" if any(p.name.value == "config" for p in init.params.params) else "self.config"
    )
    q_heads, head_dim = _heads(env.get(q))
    if head_dim is None:
        raise ctx.error(
            "eager attention core: cannot tell the query's head size from the code building it",
            init,
            scope=f"{cls}.forward",
            hint="extend the head-shape interpreter (converter/analysis/head_shapes.py)",
        )
    alibi = ctx.rules.get("architectures", {}).get(ctx.model_type, {}).get("alibi") or {}
    masks = mask_names(ctx, node, core, f"{cls}.forward")
    scale, bias_factors = scale_of(core, product, alibi.get("bias"), masks)
    args = {
        "num_heads": q_heads or f"{config}.num_attention_heads",
        "head_dim": head_dim,
        "scale": static_sizes(scale, env),
    }
    if stray := sorted(forward_only(args["scale"], methods["forward"], init)):
        raise ctx.error(
            f"eager attention core: its scores are multiplied by forward value(s) {stray}",
            methods["forward"], scope=f"{cls}.forward", hint="extend converter/passes/attention/eager/masks.py",
        )  # fmt: skip
    kv = _heads(env.get(k))[0]
    if kv is not None and kv != args["num_heads"]:
        args["num_kv_heads"] = kv
    # [<type>.paged_attention]: what no view tells
    args.update({k: code(v) for k, v in rule_overrides(ctx).items()})
    window = window_of(ctx, node, core, f"{cls}.forward")  # a banded mask buffer
    if window is not None:
        args["sliding_window"] = window
    if alibi and any(alibi["bias"] in names_read(s) for s in core):
        args["alibi"] = alibi_value(ctx, alibi, bias_factors)
    # Any other forward input the scores read (beyond q/k/v and masks) is a bias the
    # paged kernel would silently drop (e.g. a learned relative-position bias): refuse.
    params = {p.name.value for p in methods["forward"].params.params} - {"self"}
    read = set().union(*(names_read(s.visit(_NoMetadata())) for s in core))
    read -= names_read(update.func) if update is not None else set()
    extra = sorted(n for n in params & read if "mask" not in n and n != alibi.get("bias"))
    if extra:
        raise ctx.error(
            f"eager attention core adds forward input(s) {extra} to its scores",
            methods["forward"],
            scope=f"{cls}.forward",
            hint="ALiBi biases: declare [<type>.alibi] in rules/architectures.toml; "
            "other biases need a PagedAttention feature",
        )
    return args


class _NoMetadata(cst.CSTTransformer):
    """``x.dtype`` / ``x.device`` / ``x.shape`` read no values (a softmax's ``dtype=``)."""

    def leave_Attribute(self, original, updated: cst.Attribute) -> cst.BaseExpression:
        if updated.attr.value in ("dtype", "device", "shape"):
            return cst.Name("_")
        return updated


def _heads(shape) -> tuple[str | None, str | None]:
    """(head count, head size) of a ``[B, H, T, D]`` operand (a key read transposed,
    ``[B, H, D, T]``, has its heads at the same place), each None where unknown, inferred
    or not computable in ``__init__``."""
    if not isinstance(shape, Shape) or len(shape.dims) != 4:
        return None, None
    heads = static_dim(shape.dims[1]) if shape.dims[1] != "-1" else None
    return heads, static_dim(shape.dims[3])
