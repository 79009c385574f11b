"""Chunk-local attention masks -> ``PagedAttention(attention_chunk_size=...)``.

transformers builds Llama 4's "chunked_attention" mask with ``create_chunked_causal_mask``
(key ``j`` visible to query ``i`` iff ``j // C == i // C`` and ``j <= i``, ``C`` =
``config.attention_chunk_size``) in the decoder stack's forward, into a mapping keyed by
layer type, and hands each decoder layer the entry of its own type, as the sliding-window
models hand theirs:

- ``mapping = {"full_attention": ..., "chunked_attention": create_chunked_causal_mask(...)}``,
  or a table of ``lambda: builder(...)`` filled into a mapping by ``m[t] = table[t]()``;
- ``layer(..., mapping[self.config.layer_types[i]])`` with ``i`` the layer's index in the
  stack (``enumerate(self.layers)``), or ``mapping[layer.attention_type]`` where the
  decoder layer sets ``self.attention_type = config.layer_types[layer_idx]``;
- the decoder layer passes that parameter on as its attention's mask.

The paged call drops every mask (`mask_source`); a chunked one must become the kernel's
chunk limit on exactly the layers it reaches: their ``PagedAttention`` gets
``attention_chunk_size=config.attention_chunk_size if config.layer_types[layer_idx] ==
"chunked_attention" else None`` (the config field the builder reads, the keys it is
stored under, the layer index the attention's constructor receives). Any other shape of
a chunked mask stops the conversion with one line instead of being dropped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import libcst as cst

from converter.analysis import callgraph
from converter.analysis.ownership import forward_owner
from converter.context import ConversionContext
from converter.cst_helpers import call_name, code, dotted, nodes_of, self_attr
from converter.passes.attention.mask_source import value_reads

# transformers' chunk-local mask builders -> the config field holding the chunk size
BUILDERS = {"create_chunked_causal_mask": "attention_chunk_size"}
HINT = (
    "build it as transformers' Llama 4 does (a mapping keyed by layer type, indexed per "
    "layer by config.layer_types or the layer's attention_type), or extend "
    "converter/passes/attention/chunked.py"
)


@dataclass(frozen=True)
class ChunkedMask:
    """Where the stack's chunked mask goes: the decoder forward's parameter carrying it,
    the layer types it is stored under, the decoder ``__init__`` parameter holding the
    layer index, and the config field of the chunk size; ``funcs`` is the call graph's
    view of the source the attention stage starts from."""

    decoder_param: str
    keys: tuple[str, ...]
    layer_index: str
    config_field: str
    funcs: dict[str, callgraph.Function] = field(compare=False, repr=False)


def find(module: cst.Module, ctx: ConversionContext) -> ChunkedMask | None:
    """The model's chunked mask, None where it builds none; stops on one it cannot map."""
    builders = [c for c in nodes_of(module, cst.Call) if call_name(c) in BUILDERS]
    if not builders:
        return None
    funcs = callgraph.collect(module)
    owner = forward_owner(ctx, ctx.stack_class) if ctx.stack_class else None
    stack = funcs.get(f"{owner}.forward")
    scope = f"{owner}.forward"
    for call in builders:
        if stack is None or not _contains(stack.node, call):
            raise _stop(ctx, module, call, "is built outside the decoder stack's forward")
    fields = {BUILDERS[call_name(c)] for c in builders}
    if len(fields) > 1 or ctx.eager_attention:
        what = "with an eager attention core" if ctx.eager_attention else "of two chunk sizes"
        raise _stop(ctx, stack.node, builders[0], f"is used {what}", scope)
    tables = _tables(stack.node)
    chunked = {t: keys for t, keys in tables.items() if keys}
    for call in builders:
        if not any(_contains(table_node, call) for table_node in _table_nodes(stack.node)):
            what = "is not stored in a mapping keyed by layer type"
            raise _stop(ctx, stack.node, call, what, scope)
    decoder = forward_owner(ctx, ctx.decoder_layer_class)
    dec_fwd, dec_init = funcs.get(f"{decoder}.forward"), funcs.get(f"{decoder}.__init__")
    layer_calls = [c for c, t in callgraph.calls_of(ctx, stack, funcs) if t == f"{decoder}.forward"]
    if dec_fwd is None or dec_init is None or len(layer_calls) != 1:
        raise _stop(ctx, stack.node, builders[0], "reaches no single decoder-layer call", scope)
    layer_call = layer_calls[0]
    bound = callgraph.bind(layer_call, dec_fwd) or []
    found = [(param, arg) for param, arg in bound if value_reads(arg.value) & set(chunked)]
    if len(found) != 1 or found[0][0] is None or found[0][0].startswith("*"):
        what = "is not passed to the decoder layer as one parameter"
        raise _stop(ctx, stack.node, layer_call, what, scope)
    param, arg = found[0]
    value = arg.value
    if not (isinstance(value, cst.Subscript) and isinstance(value.value, cst.Name)):
        raise _stop(ctx, stack.node, layer_call, "is passed whole, not per layer type", scope)
    index = _single_index(value)
    layer_index = _layer_index(ctx, stack, layer_call, index, funcs, dec_init)
    if layer_index is None:
        what = f"is picked by `{code(value)}`, not by the layer's own type"
        raise _stop(ctx, stack.node, layer_call, what, scope)
    keys = chunked[value.value.value]
    return ChunkedMask(param, tuple(sorted(keys)), layer_index, fields.pop(), funcs)


def chunk_size(
    ctx: ConversionContext,
    found: ChunkedMask,
    cls: str,
    init: cst.FunctionDef,
    mask: cst.BaseExpression,
    forward: cst.FunctionDef,
) -> cst.BaseExpression | None:
    """``attention_chunk_size`` of attention class `cls` whose interface call masks with
    `mask`: the per-layer expression where the stack's chunked mask reaches it, else None."""
    params = {p.name.value for p in forward.params.params} - {"self"}
    own = value_reads(mask) & params
    if not own:
        return None  # the call masks with no incoming mask at all
    funcs = found.funcs
    decoder = forward_owner(ctx, ctx.decoder_layer_class)
    dec_fwd = funcs[f"{decoder}.forward"]
    attn = forward_owner(ctx, cls)
    calls = [
        c
        for c, t in callgraph.calls_of(ctx, dec_fwd, funcs)
        if t == f"{attn}.forward" and (dotted(c.func) or "").startswith("self.")
    ]
    scope = f"{decoder}.forward"
    reaches = False
    for call in calls:
        for name, arg in callgraph.bind(call, funcs[f"{attn}.forward"]) or []:
            if found.decoder_param not in value_reads(arg.value):
                continue
            if name not in own or not isinstance(arg.value, cst.Name):
                what = f"reaches {cls} other than as its attention mask"
                raise _stop(ctx, dec_fwd.node, call, what, scope)
            reaches = True
    if not reaches:
        return None
    child = ctx.classes[ctx.decoder_layer_class].children.get(ctx.attention_attr)
    layer_idx = None
    if child is not None:
        init_fn = callgraph.Function(f"{cls}.__init__", cls, init)
        passed = [
            name
            for name, arg in callgraph.bind(child.call, init_fn) or []
            if isinstance(arg.value, cst.Name) and arg.value.value == found.layer_index
        ]
        layer_idx = next((n for n in passed if n and not n.startswith("*")), None)
    if layer_idx is None:
        what = f"reaches {cls}, which is built without the layer index"
        if child is None:
            raise _stop(ctx, dec_fwd.node, calls[0], what, scope)
        line = ctx.line_of(child.call) or child.line
        raise _stop(ctx, child.call, child.call, what, line=line)
    config = (
        "config" if any(p.name.value == "config" for p in init.params.params) else "self.config"
    )
    keys = [json.dumps(k) for k in found.keys]
    test = f"== {keys[0]}" if len(keys) == 1 else f"in ({', '.join(keys)})"
    layer_type = f"{config}.layer_types[{layer_idx}]"
    return cst.parse_expression(f"({config}.{found.config_field} if {layer_type} {test} else None)")


class _NoBuilders(cst.CSTTransformer):
    """The chunked builders' calls -> None (mapped onto the layers; the paged call reads
    no mask), as the strip stage does with the causal ones."""

    def leave_Call(self, original: cst.Call, updated: cst.Call) -> cst.BaseExpression:
        return cst.Name("None") if call_name(updated) in BUILDERS else updated


def drop_builders(module: cst.Module) -> cst.Module:
    return module.visit(_NoBuilders())


# --- the stack forward's mask mappings -------------------------------------------------


def _tables(forward: cst.FunctionDef) -> dict[str, set[str]]:
    """Name -> the string keys under which it holds a chunked mask, for every mapping the
    forward builds: dict literals, ``m[<string>] = ...`` and ``m[k] = table[k]()``."""
    tables: dict[str, set[str]] = {}
    for assign in nodes_of(forward.body, cst.Assign):
        for target in (t.target for t in assign.targets):
            if isinstance(target, cst.Name) and isinstance(assign.value, cst.Dict):
                tables[target.value] = {
                    el.key.evaluated_value
                    for el in assign.value.elements
                    if isinstance(el, cst.DictElement)
                    and isinstance(el.key, cst.SimpleString)
                    and _has_builder(el.value)
                }
            elif isinstance(target, cst.Subscript) and isinstance(target.value, cst.Name):
                name, index = target.value.value, _single_index(target)
                keys = tables.setdefault(name, set())
                if isinstance(index, cst.SimpleString) and _has_builder(assign.value):
                    keys.add(index.evaluated_value)
                source = _subscript_of(assign.value)
                if source is not None and code(_single_index(source)) == code(index):
                    keys |= tables.get(source.value.value, set())
    return tables


def _table_nodes(forward: cst.FunctionDef) -> list[cst.CSTNode]:
    """The values `_tables` reads builders from: dict-literal entries and subscript
    assignments with a string key."""
    out: list[cst.CSTNode] = []
    for assign in nodes_of(forward.body, cst.Assign):
        for target in (t.target for t in assign.targets):
            if isinstance(target, cst.Name) and isinstance(assign.value, cst.Dict):
                out += [
                    el.value
                    for el in assign.value.elements
                    if isinstance(el, cst.DictElement) and isinstance(el.key, cst.SimpleString)
                ]
            elif isinstance(target, cst.Subscript) and isinstance(
                _single_index(target), cst.SimpleString
            ):
                out.append(assign.value)
    return out


def _subscript_of(value: cst.BaseExpression) -> cst.Subscript | None:
    """``t[k]()`` / ``t[k]`` -> ``t[k]`` (``t`` a name)."""
    if isinstance(value, cst.Call) and not value.args:
        value = value.func
    if isinstance(value, cst.Subscript) and isinstance(value.value, cst.Name):
        return value
    return None


def _single_index(sub: cst.Subscript) -> cst.BaseExpression | None:
    if len(sub.slice) == 1 and isinstance(sub.slice[0].slice, cst.Index):
        return sub.slice[0].slice.value
    return None


def _has_builder(node: cst.CSTNode) -> bool:
    return any(call_name(c) in BUILDERS for c in nodes_of(node, cst.Call))


# --- which layer gets which entry -------------------------------------------------------


def _layer_index(ctx, stack, layer_call, index, funcs, dec_init) -> str | None:
    """The decoder ``__init__`` parameter holding the layer index, when `index` (the
    mapping's subscript at the layer call) is the layer's own type: ``config.layer_types[i]``
    with ``i`` its position in the stack, or ``layer.<attr>`` where the decoder sets
    ``self.<attr> = config.layer_types[<param>]``."""
    loop = next((f for f in nodes_of(stack.node, cst.For) if _contains(f, layer_call)), None)
    if loop is None:
        return None
    position, element = _enumerated(loop, ctx.stack_attr)
    if _is_layer_types(index) and position and code(_single_index(index)) == position:
        return _ctor_index(ctx, funcs, dec_init)
    if isinstance(index, cst.Attribute) and dotted(index.value) == element:
        for assign in nodes_of(dec_init.node, cst.Assign):
            if any(self_attr(t.target) == index.attr.value for t in assign.targets):
                value = assign.value
                inner = _single_index(value) if _is_layer_types(value) else None
                params = {p.name.value for p in dec_init.node.params.params}
                if isinstance(inner, cst.Name) and inner.value in params:
                    return inner.value
        return None
    return None


def _is_layer_types(node) -> bool:
    return (
        isinstance(node, cst.Subscript)
        and (dotted(node.value) or "").split(".")[-1] == "layer_types"
        and (dotted(node.value) or "").split(".")[0] in ("config", "self")
    )


def _enumerated(loop: cst.For, stack_attr: str) -> tuple[str | None, str | None]:
    """(position variable, element variable) of ``for i, layer in
    enumerate(self.<stack_attr>[:n])`` (position None without enumerate; the slice, if
    any, must start at 0)."""
    it, target, position = loop.iter, loop.target, None
    if isinstance(it, cst.Call) and dotted(it.func) == "enumerate" and len(it.args) == 1:
        it = it.args[0].value
        if not (isinstance(target, cst.Tuple) and len(target.elements) == 2):
            return None, None
        first, target = (el.value for el in target.elements)
        position = first.value if isinstance(first, cst.Name) else None
    if isinstance(it, cst.Subscript):
        part = it.slice[0].slice if len(it.slice) == 1 else None
        if not isinstance(part, cst.Slice) or part.lower is not None or part.step is not None:
            return None, None
        it = it.value
    if self_attr(it) != stack_attr or not isinstance(target, cst.Name):
        return None, None
    return position, target.value


def _ctor_index(ctx, funcs, dec_init) -> str | None:
    """The decoder ``__init__`` parameter bound to ``i`` of the stack's ``[Layer(..., i)
    for i in range(n)]``."""
    child = ctx.classes[ctx.stack_class].children.get(ctx.stack_attr)
    owner_init = funcs.get(f"{forward_owner(ctx, ctx.stack_class, '__init__')}.__init__")
    if child is None or owner_init is None:
        return None
    for comp in nodes_of(owner_init.node, cst.ListComp):
        loop = comp.for_in
        if not (
            isinstance(comp.elt, cst.Call)
            and dotted(comp.elt.func) == child.ctor
            and isinstance(loop.target, cst.Name)
            and isinstance(loop.iter, cst.Call)
            and dotted(loop.iter.func) == "range"
            and len(loop.iter.args) == 1
            and loop.inner_for_in is None
        ):
            continue
        for name, arg in callgraph.bind(comp.elt, dec_init) or []:
            if isinstance(arg.value, cst.Name) and arg.value.value == loop.target.value:
                return name if name and not name.startswith("*") else None
    return None


# --- helpers -----------------------------------------------------------------------------


def _contains(tree: cst.CSTNode, node: cst.CSTNode) -> bool:
    return any(n is node for n in nodes_of(tree, type(node)))


def _statement_of(tree: cst.CSTNode, node: cst.CSTNode) -> cst.CSTNode:
    """The innermost statement of `tree` holding `node` (for the error's line)."""
    found = node
    for stmt in nodes_of(tree, cst.SimpleStatementLine, cst.BaseCompoundStatement):
        if _contains(stmt, node):
            found = stmt  # pre-order: later matches are nested deeper
    return found


def _stop(ctx, tree, node, what: str, scope: str = "", line: int | None = None):
    stmt = _statement_of(tree, node)
    return ctx.error(
        f"chunked attention mask (create_chunked_causal_mask) {what}: paged attention maps "
        "it only per layer type onto attention_chunk_size",
        stmt,
        scope=scope,
        hint=HINT,
        line=line,
    )
