"""The decoder-stack loops of the flatten pass: each call of a layer gets its KV cache.

A stack's forward may loop over its whole ``ModuleList`` once, or over slices of it
(dory: input, recurrent and output sections, ``self.layers[a:b]``). Each loop becomes
``for i, layer in enumerate(...)`` passing ``kv_cache=kv_caches[<slot>]``: ``i``, plus
the slice start, plus the cache offset the loop hands its layer where the attention
offsets its cache index (`converter.passes.flatten.cache_slots`; a loop that does not pass it
runs at the parameter's default, 0). A loop nested in another loop applies its layers
several times per forward; without such an offset every application would write the
same cache, so that stops the conversion.
"""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from converter.analysis.ownership import child_class
from converter.context import ConversionContext
from converter.cst_helpers import called_module, code, dotted, nodes_of
from converter.passes.flatten.cache_slots import offset_argument


class AddKwargs(cst.CSTTransformer):
    """Append `extra` keyword arguments to calls into `targets` (or calls of `names`)."""

    def __init__(self, ctx, cls, targets: set[str], extra: str, names: set[str] = frozenset()):
        self.ctx, self.cls, self.targets, self.names = ctx, cls, targets, names
        self.extra = list(cst.parse_expression(f"f({extra})").args)
        self.count = 0

    def leave_Call(self, original: cst.Call, updated: cst.Call) -> cst.Call:
        name = called_module(updated.func) or ""
        parts = name.split(".")
        hit = name in self.names or (
            parts[0] == "self"
            and len(parts) > 1
            and child_class(self.ctx, self.cls, parts[1:]) in self.targets
        )
        if not hit:
            return updated
        self.count += 1
        args = list(updated.args)
        star = [a for a in args if a.star == "**"]
        args = [a for a in args if a.star != "**"]
        if args:
            args[-1] = args[-1].with_changes(comma=cst.MaybeSentinel.DEFAULT)
        return updated.with_changes(args=[*args, *self.extra, *star])


def _sliced_from(iterable: cst.BaseExpression) -> str | None | bool:
    """The start of ``self.<stack>[start:stop]`` (code, or None from 0); False when the
    loop runs over the whole list."""
    if not isinstance(iterable, cst.Subscript):
        return False
    index = iterable.slice[0].slice if len(iterable.slice) == 1 else None
    if not isinstance(index, cst.Slice) or index.step is not None:
        return False
    return None if index.lower is None else code(index.lower)


def _slot(ctx, loop, layer: str, index: str, start, offset: str | None) -> str:
    """The cache index of the loop's layer call."""
    terms = [] if start in (None, False) else [f"({start})" if " " in start else start]
    if offset is not None:
        calls = [c for c in nodes_of(loop.body, cst.Call) if dotted(c.func) == layer]
        value = offset_argument(calls[0], offset) if calls else None
        if value is not None:
            terms.insert(0, code(value))
    return " + ".join([*terms, index])


def _nested(forward: cst.FunctionDef, loop: cst.For) -> bool:
    """Whether `loop` sits inside another for/while loop of `forward`."""
    return any(
        loop is not outer and any(inner is loop for inner in nodes_of(outer, cst.For))
        for outer in [*nodes_of(forward, cst.For), *nodes_of(forward, cst.While)]
    )


def _rewrite(
    ctx, forward, loop: cst.For, offset: str | None, extra: str, all_caches: bool = False
) -> cst.For:
    scope = f"{ctx.stack_class}.forward"
    enumerated = m.matches(loop.iter, m.Call(func=m.Name("enumerate")))
    if all_caches:
        pair = m.Tuple(elements=[m.Element(m.Name()), m.Element(m.Name())])
        if not m.matches(loop.target, pair if enumerated else m.Name()):
            raise ctx.error("stack loop target is not a layer name", loop, scope=scope)
        layer = loop.target.elements[1].value.value if enumerated else loop.target.value
        return _pass_caches(ctx, loop, loop, layer, "kv_caches=kv_caches", scope, extra)
    if enumerated:
        if not m.matches(loop.target, m.Tuple(elements=[m.Element(m.Name()), m.Element(m.Name())])):
            raise ctx.error(
                "enumerate loop over the stack without (index, layer) names", loop, scope=scope
            )
        index, layer = (e.value.value for e in loop.target.elements)
        new_loop = loop
    else:
        if not isinstance(loop.target, cst.Name):
            raise ctx.error("stack loop target is not a name", loop, scope=scope)
        # a fresh index name: the forward may use `i` for something else (a comprehension)
        used = {n.value for n in nodes_of(forward, cst.Name)}
        index = next(n for n in ("i", *(f"i{k}" for k in range(1, len(used) + 2))) if n not in used)
        layer = loop.target.value
        new_loop = loop.with_changes(
            target=cst.parse_expression(f"({index}, {layer})").with_changes(lpar=[], rpar=[]),
            iter=cst.Call(cst.Name("enumerate"), [cst.Arg(loop.iter)]),
        )
    start = _sliced_from(loop.iter.args[0].value if enumerated else loop.iter)
    slot = _slot(ctx, loop, layer, index, start, offset)
    return _pass_caches(ctx, loop, new_loop, layer, f"kv_cache=kv_caches[{slot}]", scope, extra)


def _pass_caches(
    ctx, loop: cst.For, new_loop: cst.For, layer: str, caches: str, scope: str, extra: str
):
    """`new_loop` with its one call of `layer` passing `caches` and the metadata."""
    adder = AddKwargs(
        ctx,
        ctx.stack_class,
        set(),
        f"{caches}, input_metadata=input_metadata{extra}",
        {layer},
    )
    new_loop = new_loop.with_changes(body=new_loop.body.visit(adder))
    if adder.count != 1:
        raise ctx.error(f"the stack loop calls its layer {adder.count} times", loop, scope=scope)
    return new_loop


def stack_loops(
    ctx: ConversionContext,
    forward: cst.FunctionDef,
    offset: str | None = None,
    extra: str = "",
    all_caches: bool = False,
) -> cst.FunctionDef:
    """`forward` of the stack class with every loop over the stack passing its caches:
    each layer its own, or with `all_caches` every layer the whole list (layers whose
    attentions each pick their own cache by index); and `extra` keyword arguments
    (``", positions=positions"``)."""
    stack = m.Attribute(value=m.Name("self"), attr=m.Name(ctx.stack_attr))
    iterable = stack | m.Subscript(value=stack)
    loops = [
        node
        for node in nodes_of(forward, cst.For)
        if m.matches(node.iter, iterable)
        or m.matches(node.iter, m.Call(func=m.Name("enumerate"), args=[m.Arg(iterable)]))
    ]
    scope = f"{ctx.stack_class}.forward"
    whole = [
        lp
        for lp in loops
        if _sliced_from(lp.iter.args[0].value if isinstance(lp.iter, cst.Call) else lp.iter)
        is False
    ]
    if not loops or (whole and len(loops) > 1):
        raise ctx.error(
            f"expected one loop over self.{ctx.stack_attr} or loops over slices of it, "
            f"found {len(loops)} ({len(whole)} over all of it)",
            forward,
            scope=scope,
            hint="extend converter/passes/flatten/loops.py",
        )
    if offset is None:
        for loop in loops:
            if _nested(forward, loop):
                raise ctx.error(
                    f"a loop over self.{ctx.stack_attr} inside another loop applies its "
                    "layers several times per forward, and the attention's cache update "
                    "gives each application no cache of its own",
                    loop,
                    scope=scope,
                    hint="extend converter/passes/flatten/cache_slots.py",
                )
    elif not any(
        offset_argument(c, offset) is not None
        for loop in loops
        for c in nodes_of(loop.body, cst.Call)
    ):
        raise ctx.error(
            f"the attention offsets its cache index by {offset!r}, which no stack loop "
            "passes to its layer",
            forward,
            scope=scope,
            hint="extend converter/passes/flatten/cache_slots.py",
        )
    new = {id(loop): _rewrite(ctx, forward, loop, offset, extra, all_caches) for loop in loops}

    class _Swap(cst.CSTTransformer):
        def leave_For(self, original, updated):
            return new.get(id(original), updated)

    return forward.visit(_Swap())
