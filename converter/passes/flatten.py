"""Pass 4, flatten: the paged entry points and the cache plumbing through the stack.

- classes whose forward calls (through the ownership graph) an attention class, up to the
  decoder layer, take ``kv_cache`` and ``input_metadata`` and pass them on;
- the decoder-stack loop becomes ``for i, layer in enumerate(...)`` passing
  ``kv_cache=kv_caches[i]``; the stack class (and classes above it, up to the base model)
  take ``kv_caches`` and ``input_metadata``;
- a stack applied several times per forward, whose attention offsets its cache index by a
  forward argument, indexes ``kv_caches[<offset> + i]`` instead (converter/passes/cache_slots.py);
- the base model's ``position_ids`` is renamed ``positions``;
- the ``*ForCausalLM`` gets the generated ``forward(input_ids, positions, kv_caches,
  input_metadata)`` -> ``[T, hidden]`` (the base model runs on a batch of one, ``[1, T]``)
  and ``compute_logits(hidden_states, input_metadata)``: the rows at
  ``input_metadata.logits_indices``, then the HF forward's statements after the
  base-model call (lm_head and post-processing). The pruner cleans up what they read.

The last two (the entry points) live in converter/passes/flatten_lm.py.
"""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from converter.analysis import child_class, dotted, methods_of, nodes_of
from converter.context import ConversionContext
from converter.cstedit import add_params
from converter.passes.cache_slots import cache_offset, declare_slots, offset_argument
from converter.passes.flatten_lm import (
    RenamePositions,
    base_signature,
    lm_methods,
    unwrap_outputs,
)

KV = [("kv_cache", "torch.Tensor"), ("input_metadata", "InputMetadata")]
KVS = [("kv_caches", "list[torch.Tensor]"), ("input_metadata", "InputMetadata")]
KV_ARGS = "kv_cache=kv_cache, input_metadata=input_metadata"
KVS_ARGS = "kv_caches=kv_caches, input_metadata=input_metadata"


def _callees(ctx: ConversionContext, cls: str, node: cst.CSTNode) -> set[str]:
    """Local classes whose instances `cls`'s method `node` calls (``self.a.b(...)``)."""
    out = set()
    for call in nodes_of(node, cst.Call):
        parts = (dotted(call.func) or "").split(".")
        if parts[0] == "self" and len(parts) > 1:
            target = child_class(ctx, cls, parts[1:])
            if target:
                out.add(target)
    return out


def _closure(callees: dict[str, set[str]], seed: set[str], stop: set[str]) -> set[str]:
    """Classes that (transitively) call into `seed`, not crossing `stop`."""
    marked = set(seed)
    changed = True
    while changed:
        changed = False
        for cls, called in callees.items():
            if cls not in marked and cls not in stop and called & marked:
                marked.add(cls)
                changed = True
    return marked - seed


class _AddKwargs(cst.CSTTransformer):
    """Append `extra` keyword arguments to calls into `targets` (or calls of `names`)."""

    def __init__(self, ctx, cls, targets: set[str], extra: str, names: set[str] = frozenset()):
        self.ctx, self.cls, self.targets, self.names = ctx, cls, targets, names
        self.extra = list(cst.parse_expression(f"f({extra})").args)
        self.count = 0

    def leave_Call(self, original: cst.Call, updated: cst.Call) -> cst.Call:
        name = dotted(updated.func) or ""
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


def _slot(loop: cst.For, layer: str, index: str, offset: str | None, ctx) -> str:
    """The cache index of the loop's layer call: ``i``, or ``<offset value> + i`` where
    the attention offsets its cache index (`converter.passes.cache_slots`)."""
    if offset is None:
        return index
    calls = [c for c in nodes_of(loop.body, cst.Call) if dotted(c.func) == layer]
    value = offset_argument(calls[0], offset) if calls else None
    if value is None:
        raise ctx.error(
            f"the attention offsets its cache index by {offset!r}, which the stack loop "
            "does not pass to its layer",
            loop,
            scope=f"{ctx.stack_class}.forward",
            hint="extend converter/passes/cache_slots.py",
        )
    return f"{cst.Module([]).code_for_node(value)} + {index}"


def _stack_loop(
    ctx: ConversionContext, forward: cst.FunctionDef, offset: str | None = None
) -> cst.FunctionDef:
    stack = m.Attribute(value=m.Name("self"), attr=m.Name(ctx.stack_attr))
    iterable = stack | m.Subscript(value=stack)
    loops: list[cst.For] = []

    for node in nodes_of(forward, cst.For):
        it = node.iter
        if m.matches(it, iterable) or m.matches(
            it, m.Call(func=m.Name("enumerate"), args=[m.Arg(iterable)])
        ):
            loops.append(node)
    scope = f"{ctx.stack_class}.forward"
    if len(loops) != 1:
        raise ctx.error(
            f"expected one loop over self.{ctx.stack_attr}, found {len(loops)}",
            forward,
            scope=scope,
            hint="extend converter/passes/flatten.py",
        )
    loop = loops[0]
    if m.matches(loop.iter, m.Call(func=m.Name("enumerate"))):
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
    adder = _AddKwargs(
        ctx,
        ctx.stack_class,
        set(),
        f"kv_cache=kv_caches[{_slot(loop, layer, index, offset, ctx)}], "
        "input_metadata=input_metadata",
        {layer},
    )
    new_loop = new_loop.with_changes(body=new_loop.body.visit(adder))
    if adder.count != 1:
        raise ctx.error(f"the stack loop calls its layer {adder.count} times", loop, scope=scope)

    class _Swap(cst.CSTTransformer):
        def leave_For(self, original, updated):
            return new_loop if original is loop else updated

    return forward.visit(_Swap())


def run(module: cst.Module, ctx: ConversionContext) -> cst.Module:
    classes = {s.name.value: s for s in module.body if isinstance(s, cst.ClassDef)}
    forwards = {
        c: methods_of(n)["forward"] for c, n in classes.items() if "forward" in methods_of(n)
    }
    attention = set(ctx.attention_classes)
    callees = {c: _callees(ctx, c, f) for c, f in forwards.items()}
    kv_users = _closure(callees, attention, {ctx.stack_class, ctx.lm_class})
    above = _closure(callees, {ctx.stack_class}, {ctx.lm_class})
    new_forward: dict[str, cst.FunctionDef] = {}
    for cls in kv_users:
        adder = _AddKwargs(ctx, cls, attention | kv_users, KV_ARGS)
        new_forward[cls] = add_params(forwards[cls].visit(adder), KV)
    offset = cache_offset(ctx)
    stack = add_params(_stack_loop(ctx, forwards[ctx.stack_class], offset), KVS)
    new_forward[ctx.stack_class] = stack
    for cls in above:
        adder = _AddKwargs(ctx, cls, above | {ctx.stack_class}, KVS_ARGS)
        forward = unwrap_outputs(ctx, cls, forwards[cls].visit(adder), above | {ctx.stack_class})
        new_forward[cls] = add_params(forward, KVS)
    base = ctx.base_model_class
    new_forward[base] = base_signature(
        ctx, new_forward.get(base, forwards[base]).visit(RenamePositions())
    )
    lm_defs = lm_methods(ctx, forwards[ctx.lm_class])
    body = []
    for stmt in module.body:
        if isinstance(stmt, cst.ClassDef) and stmt.name.value in forwards:
            cls = stmt.name.value
            old = forwards[cls]
            if cls == ctx.lm_class:
                inner = []
                for s in stmt.body.body:
                    is_init = isinstance(s, cst.FunctionDef) and s.name.value == "__init__"
                    inner += (
                        lm_defs if s is old else [declare_slots(s) if offset and is_init else s]
                    )
            else:
                inner = [new_forward.get(cls, old) if s is old else s for s in stmt.body.body]
            stmt = stmt.with_changes(body=stmt.body.with_changes(body=inner))
        body.append(stmt)
    return module.with_changes(body=body)
