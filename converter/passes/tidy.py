"""Stage tidy: drop what the rewrites left unreferenced.

Select keeps ``__init__``, ``forward``, ``extra_repr`` (and flatten adds the LM class's
``compute_logits``), the methods other classes call on
an owned instance, and what those reach through ``self.<name>``; the attention and TP
passes then stop calling some of them (an eager core's ``_attn`` / ``_merge_heads``
helpers) and some module-level code (a local ``nn.Linear`` subclass the TP pass
replaced). The same closure, taken again, drops them, and with them non-persistent
buffers nothing reads any more (a causal-mask buffer of a paged core).
"""

from __future__ import annotations

import ast

import libcst as cst
import libcst.matchers as m

from converter.analysis.liveness import eliminate_dead_stores
from converter.context import ConversionContext
from converter.cst_helpers import dotted, methods_of, nodes_of, reachable_methods
from converter.passes.select import KEPT_METHODS, child_method_calls, shake


def _reached(node: cst.ClassDef, called: set[str]) -> set[str]:
    methods = methods_of(node)
    roots = {n for n in (*KEPT_METHODS, "compute_logits", *called) if n in methods}
    return reachable_methods(methods, roots)


def _attrs_read(source: str) -> set[str]:
    return {
        n.attr
        for n in ast.walk(ast.parse(source))
        if isinstance(n, ast.Attribute) and isinstance(n.ctx, ast.Load)
    }


def _unread_buffer(small, unread: set[str]) -> bool:
    """``self.X = nn.Buffer(..., persistent=False)`` with X in `unread`: no checkpoint
    holds it and no code uses it (GPT-Neo's causal-mask buffer once the core is paged)."""
    if not m.matches(small, m.Assign(targets=[m.AssignTarget(m.Attribute(m.Name("self")))])):
        return False
    value = small.value
    if not (isinstance(value, cst.Call) and (dotted(value.func) or "").endswith("Buffer")):
        return False
    persistent = [a.value for a in value.args if a.keyword and a.keyword.value == "persistent"]
    return (
        bool(persistent)
        and m.matches(persistent[0], m.Name("False"))
        and small.targets[0].target.attr.value in unread
    )


def _drop_buffers(init: cst.FunctionDef, unread: set[str]) -> cst.FunctionDef:
    body = [
        s
        for s in init.body.body
        if not (
            isinstance(s, cst.SimpleStatementLine)
            and any(_unread_buffer(x, unread) for x in s.body)
        )
    ]
    if len(body) == len(init.body.body):
        return init
    # the locals that only built the buffer (sizes, the mask itself) die with it
    return eliminate_dead_stores(init.with_changes(body=init.body.with_changes(body=body)))


def run(module: cst.Module, ctx: ConversionContext) -> cst.Module:
    called = child_method_calls(module, ctx)
    body = []
    for stmt in module.body:
        if isinstance(stmt, cst.ClassDef) and isinstance(stmt.body, cst.IndentedBlock):
            keep = _reached(stmt, called.get(stmt.name.value, set()))
            inner = [
                s
                for s in stmt.body.body
                if not isinstance(s, cst.FunctionDef) or s.name.value in keep
            ]
            stmt = stmt.with_changes(body=stmt.body.with_changes(body=inner or stmt.body.body))
        body.append(stmt)
    module = module.with_changes(body=body)
    stores = {id(t.target) for t in nodes_of(module, cst.AssignTarget)}
    read = {a.attr.value for a in nodes_of(module, cst.Attribute) if id(a) not in stores}
    # only buffers the source's own code read and the rewrites stopped reading: others may
    # be read by transformers' code (rope's decorators read `original_inv_freq`)
    unread = _attrs_read(ctx.source_text) - read
    module = module.visit(_Buffers(unread))
    return shake(module, {ctx.lm_class})


class _Buffers(cst.CSTTransformer):
    def __init__(self, unread: set[str]) -> None:
        self.unread = unread

    def visit_FunctionDef(self, node: cst.FunctionDef) -> bool:
        return False  # no nested defs to visit; __init__ is handled in leave

    def leave_FunctionDef(self, original, updated: cst.FunctionDef) -> cst.FunctionDef:
        return _drop_buffers(updated, self.unread) if updated.name.value == "__init__" else updated
