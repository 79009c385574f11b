"""Decoder layers that hold several attention modules in a list, each with its own KV cache.

A decoder layer may own an ``nn.ModuleList`` of attention modules and call them one after
the other (LongCat-Flash: two MLA sublayers per layer, ``self.self_attn[0](...)`` and
``self.self_attn[1](...)``). transformers gives each its own cache layer by the index its
forward passes to ``cache.update(k, v, <index>)``, an attribute its ``__init__`` sets from
what the list's comprehension hands every element (``layer_idx=layer_idx * 2 + i`` for
``i in [0, 1]``). The paged model keeps that arithmetic: each such attention's
`PagedAttention` is built with ``kv_cache_index=<the __init__ expression>`` (the source's
own, evaluated in the generated ``__init__``), its forward reads
``kv_caches[self.attn.kv_cache_index]``, and the decoder layer hands the whole list
down (`converter.passes.flatten`); the engine allocates one cache per index
(`runtime.kv_cache.kv_cache_layouts`, which checks they number 0..n-1).

Found by structure only: a list child of the decoder layer whose element class is an
attention class. Anything the passes could not keep exact stops with one line: an
attention reached outside such lists as well, an index that is not a ``self`` attribute
set in ``__init__`` from its parameters, a list whose elements all get the same index.
"""

from __future__ import annotations

import ast

from converter.analysis.ownership import owns
from converter.context import ConversionContext


def find_layer_attention_lists(ctx: ConversionContext) -> None:
    """Fill ``ctx.attention_lists`` and ``ctx.cache_index`` (see the module docstring)."""
    layer = ctx.classes[ctx.decoder_layer_class]
    targets = set(ctx.attention_classes)
    lists = [c for c in layer.children.values() if c.in_list and c.cls in targets]
    if not lists:
        return
    others = [
        c.attr
        for c in layer.children.values()
        if c not in lists and any(owns(ctx, cls, targets) for cls in c.classes)
    ]
    if others:
        raise ctx.error(
            f"{ctx.decoder_layer_class} holds attention modules in a list "
            f"({', '.join(c.attr for c in lists)}) and elsewhere ({', '.join(others)})",
            line=layer.line,
            hint="extend converter/analysis/layer_attentions.py",
        )
    tree = ast.parse(ctx.source_text)
    classes = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}
    for child in lists:
        index = _init_index(ctx, classes[child.cls])
        _check_varies(ctx, classes[ctx.decoder_layer_class], child.attr, index, child.line)
        ctx.cache_index[child.cls] = index[1]
        ctx.attention_lists.append(f"{ctx.decoder_layer_class}.{child.attr}")


def _method(cls: ast.ClassDef, name: str) -> ast.FunctionDef | None:
    return next((f for f in cls.body if isinstance(f, ast.FunctionDef) and f.name == name), None)


def _update_index(forward: ast.FunctionDef) -> list[ast.expr]:
    """The layer-index arguments of the forward's ``<cache>.update(k, v, index, ...)``."""
    found = []
    for call in ast.walk(forward):
        if isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute):
            if call.func.attr != "update":
                continue
            if len(call.args) >= 3:
                found.append(call.args[2])
            found += [k.value for k in call.keywords if k.arg == "layer_idx"]
    return found


def _init_index(ctx: ConversionContext, cls: ast.ClassDef) -> tuple[str, str]:
    """(``__init__`` parameter, expression over it) the attention's cache index is: the
    attribute its forward updates the cache at, as ``__init__`` assigns it."""
    line = ctx.classes[cls.name].line
    hint = "extend converter/analysis/layer_attentions.py"
    forward, init = _method(cls, "forward"), _method(cls, "__init__")
    indices = _update_index(forward) if forward else []
    attrs = {
        i.attr
        for i in indices
        if isinstance(i, ast.Attribute) and isinstance(i.value, ast.Name) and i.value.id == "self"
    }
    if len(attrs) != 1 or len(attrs) != len({ast.dump(i) for i in indices}):
        raise ctx.error(
            f"{cls.name} sits in a list of attention modules per decoder layer, but its "
            "forward updates no cache at one `self.<attribute>` index "
            f"(found {[ast.unparse(i) for i in indices] or 'no cache.update'}): "
            "cannot tell which KV cache each attention of the list uses",
            line=line,
            hint=hint,
        )
    attr = attrs.pop()
    params = {a.arg for a in init.args.args[1:] + init.args.kwonlyargs} if init else set()
    for stmt in init.body if init else []:
        if (
            isinstance(stmt, ast.Assign)
            and len(stmt.targets) == 1
            and ast.unparse(stmt.targets[0]) == f"self.{attr}"
        ):
            names = {n.id for n in ast.walk(stmt.value) if isinstance(n, ast.Name)}
            used = names & params
            if used and names <= params:
                return sorted(used)[0], ast.unparse(stmt.value)
    raise ctx.error(
        f"{cls.name}'s cache index self.{attr} is not set in __init__ from its parameters",
        line=line,
        hint=hint,
    )


def _check_varies(
    ctx: ConversionContext, layer: ast.ClassDef, attr: str, index: tuple[str, str], line: int
) -> None:
    """The list's comprehension must hand each element a different index: the argument
    bound to the index parameter reads the comprehension's variable."""
    param = index[0]
    init = _method(layer, "__init__")
    for stmt in ast.walk(init) if init else []:
        if not (isinstance(stmt, ast.Assign) and ast.unparse(stmt.targets[0]) == f"self.{attr}"):
            continue
        comps = [n for n in ast.walk(stmt.value) if isinstance(n, ast.ListComp)]
        if len(comps) == 1 and isinstance(comps[0].elt, ast.Call):
            comp = comps[0]
            variables = {
                n.id for g in comp.generators for n in ast.walk(g.target) if isinstance(n, ast.Name)
            }
            bound = [k.value for k in comp.elt.keywords if k.arg == param]
            if bound and {n.id for n in ast.walk(bound[0]) if isinstance(n, ast.Name)} & variables:
                return
    raise ctx.error(
        f"{layer.name}.{attr} does not build its attention modules in one list "
        f"comprehension that passes each a different {param}= (its KV cache index)",
        line=line,
        hint="extend converter/analysis/layer_attentions.py",
    )
