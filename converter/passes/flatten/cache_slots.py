"""Stacks applied several times per forward: one KV cache per (application, layer).

transformers models that run a layer stack more than once per forward (hrm_text's H and L
modules, each applied in nested cycles) give every application its own cache layers by
offsetting the index of the cache update: ``cache.update(k, v, self.layer_idx + offset)``,
with ``offset`` a forward argument the stack loop hands each layer. Their cache has
``config.num_hidden_layers`` slots (``DynamicCache(config=...)``), which the config counts
over all applications (or more, appended by the model: a rules ``kv_cache_slots``).

The flatten pass keeps that arithmetic: the stack loop indexes ``kv_caches[offset + i]``
(``offset`` is the expression the loop passes to the layer for it) and the LM class
declares ``num_kv_cache_slots = config.num_hidden_layers``, which
`runtime.kv_cache.kv_cache_layouts` allocates (every slot with the one layout the stacks
share). Matching is structural (a ``.update`` call whose third argument adds a forward
parameter to a ``self`` attribute), never by name.
"""

from __future__ import annotations

import ast

import libcst as cst

from converter.context import ConversionContext

SLOTS_ATTR = "num_kv_cache_slots"


def _offset_of(index: ast.expr, params: set[str]) -> str | None:
    """`p` of ``self.<attr> + p`` / ``p + self.<attr>`` with `p` a forward parameter."""
    if not (isinstance(index, ast.BinOp) and isinstance(index.op, ast.Add)):
        return None
    for attr, other in ((index.left, index.right), (index.right, index.left)):
        if (
            isinstance(attr, ast.Attribute)
            and isinstance(attr.value, ast.Name)
            and attr.value.id == "self"
            and isinstance(other, ast.Name)
            and other.id in params
        ):
            return other.id
    return None


def cache_offset(ctx: ConversionContext) -> str | None:
    """The forward parameter an attention class adds to its layer index when it updates
    the cache (in the original source), or None when the index is the layer's own."""
    tree = ast.parse(ctx.source_text)
    found: set[str] = set()
    for node in tree.body:
        if not (isinstance(node, ast.ClassDef) and node.name in ctx.attention_classes):
            continue
        for fn in node.body:
            if not (isinstance(fn, ast.FunctionDef) and fn.name == "forward"):
                continue
            params = {a.arg for a in fn.args.args + fn.args.kwonlyargs}
            for call in ast.walk(fn):
                if (
                    isinstance(call, ast.Call)
                    and isinstance(call.func, ast.Attribute)
                    and call.func.attr == "update"
                    and len(call.args) >= 3
                ):
                    offset = _offset_of(call.args[2], params)
                    if offset:
                        found.add(offset)
    if len(found) > 1:
        raise ctx.error(
            f"attention classes offset their cache index by different arguments {sorted(found)}",
            line=ctx.classes[ctx.attention_classes[0]].line,
            hint="extend converter/passes/flatten/cache_slots.py",
        )
    return found.pop() if found else None


def offset_argument(call: cst.Call, offset: str) -> cst.BaseExpression | None:
    """The value the stack loop's layer call passes for `offset` (``offset=<expr>``)."""
    for arg in call.args:
        if arg.keyword is not None and arg.keyword.value == offset:
            return arg.value
    return None


def declare_slots(ctx: ConversionContext, init: cst.FunctionDef) -> cst.FunctionDef:
    """`init` (the LM class's __init__) with the cache-slot count appended: the rules'
    ``kv_cache_slots`` expression where the model grows its cache beyond the config's
    layer count (dory appends a copy of the recurrent layers per extra loop), else
    ``config.num_hidden_layers``."""
    arch = ctx.rules.get("architectures", {}).get(ctx.model_type, {})
    count = arch.get("kv_cache_slots", "self.config.num_hidden_layers")
    where = "rules/architectures.toml" if "kv_cache_slots" in arch else "config.num_hidden_layers"
    stmt = cst.parse_statement(
        "# transformers caches each application of the layer stack in its own slots\n"
        f"# ({where})\n"
        f"self.{SLOTS_ATTR} = {count}\n"
    )
    return init.with_changes(body=init.body.with_changes(body=[*init.body.body, stmt]))
