"""Stage tidy: drop what the rewrites left unreferenced.

Select keeps ``__init__``, ``forward``, ``extra_repr`` (and flatten adds the LM class's
``compute_logits``), the methods other classes call on
an owned instance, and what those reach through ``self.<name>``; the attention and TP
passes then stop calling some of them (an eager core's ``_attn`` / ``_merge_heads``
helpers) and some module-level code (a local ``nn.Linear`` subclass the TP pass
replaced). The same closure, taken again, drops them.

Then the attributes nothing reads: an ``__init__`` store ``self.X = <plain value>`` (no
call but builtins) of an X no code here reads goes (a dropout probability,
``_attn_implementation``, a cache's ``layer_idx``, the ALiBi flag an eager core tested),
with the locals only it used, until none is left; so does a non-persistent buffer the
source's own code read and the rewrites stopped reading (a causal-mask buffer of a paged
core). Modules and parameters stay (they hold checkpoint weights), as do ``config`` and
what the runtime reads (`KEEP`), and everything in a class whose methods keep a decorator
(``dynamic_rope_update`` reads ``self.rope_type``, ``original_inv_freq``...) or read
``self`` attributes by computed name.
"""

from __future__ import annotations

import ast

import libcst as cst
import libcst.matchers as m

from converter.analysis.liveness import eliminate_dead_stores
from converter.context import ConversionContext
from converter.cst_helpers import (
    BUILTINS,
    dotted,
    methods_of,
    nodes_of,
    reachable_methods,
    self_attr,
)
from converter.passes.flatten.cache_slots import SLOTS_ATTR
from converter.passes.select import KEPT_METHODS, child_method_calls, shake

PLAIN = {"staticmethod", "classmethod", "property"}  # decorators that read no attribute
# read by load_weights (the weights stage, after this one) and by the runtime
KEEP = {"config", SLOTS_ATTR}


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


def _droppable(small: cst.BaseSmallStatement, unread: set[str], source_reads: set[str]) -> bool:
    """``self.X = <plain value>`` with X in `unread`, or ``self.X = nn.Buffer(...,
    persistent=False)`` with X also read by the source: no checkpoint holds it and no
    code reads it."""
    if isinstance(small, cst.AnnAssign) and small.value is not None:
        target, value = small.target, small.value
    elif isinstance(small, cst.Assign) and len(small.targets) == 1:
        target, value = small.targets[0].target, small.value
    else:
        return False
    if self_attr(target) not in unread:
        return False
    calls = nodes_of(value, cst.Call)
    if all(isinstance(c.func, cst.Name) and c.func.value in BUILTINS for c in calls):
        return True
    if not (isinstance(value, cst.Call) and (dotted(value.func) or "").endswith("Buffer")):
        return False
    if target.attr.value not in source_reads:
        return False  # a buffer transformers' code may read (rope's `original_inv_freq`)
    persistent = [a.value for a in value.args if a.keyword and a.keyword.value == "persistent"]
    return bool(persistent) and m.matches(persistent[0], m.Name("False"))


class _DropUnread(cst.CSTTransformer):
    """Drops `_droppable` stores from one ``__init__`` (at any depth); a dropped
    statement's blank line separating it from what came before stays."""

    def __init__(self, unread: set[str], source_reads: set[str]) -> None:
        self.unread, self.source_reads = unread, source_reads
        self.dropped = False

    def _drop(self, stmt: cst.BaseStatement) -> bool:
        return (
            isinstance(stmt, cst.SimpleStatementLine)
            and len(stmt.body) == 1
            and _droppable(stmt.body[0], self.unread, self.source_reads)
        )

    def leave_IndentedBlock(self, original, updated: cst.IndentedBlock) -> cst.IndentedBlock:
        body: list[cst.BaseStatement] = []
        blank = False  # a dropped statement was preceded by a blank line
        for stmt in updated.body:
            if self._drop(stmt):
                self.dropped = True
                blank = blank or any(line.comment is None for line in stmt.leading_lines[:1])
                continue
            if blank and not stmt.leading_lines and body:
                stmt = stmt.with_changes(leading_lines=[cst.EmptyLine()])
            blank = False
            body.append(stmt)
        return updated.with_changes(body=body or [cst.SimpleStatementLine([cst.Pass()])])


def _config_field(node: cst.Attribute) -> bool:
    """``config.X`` / ``self.config.X``: a config field, not an attribute of ours."""
    return (dotted(node.value) or "").split(".")[-1] == "config"


def _dynamic(cls: cst.ClassDef) -> bool:
    """Whether the class's code may read attributes no name shows: a kept decorator
    (``dynamic_rope_update`` reads ``self.rope_type``...), ``getattr(self, <computed>)``."""
    methods = methods_of(cls).values()
    if any(d for f in methods for d in f.decorators if dotted(d.decorator) not in PLAIN):
        return True
    return any(
        m.matches(c, m.Call(func=m.Name("getattr"), args=[m.Arg(m.Name("self")), m.Arg()]))
        and not isinstance(c.args[1].value, cst.SimpleString)
        for c in nodes_of(cls, cst.Call)
    )


def _drop_unread(module: cst.Module, source_reads: set[str]) -> cst.Module:
    """Drop unread attribute stores until none is left (a dropped store may have been the
    last reader of another attribute)."""
    dynamic = {s.name.value for s in module.body if isinstance(s, cst.ClassDef) and _dynamic(s)}
    while True:
        stores: set[int] = set()
        read: set[str] = set()
        unread: set[str] = set()
        # pre-order: an assignment comes before the attribute it stores into
        for node in nodes_of(
            module, cst.AssignTarget, cst.AnnAssign, cst.Attribute, cst.SimpleString
        ):
            if isinstance(node, (cst.AssignTarget, cst.AnnAssign)):
                stores.add(id(node.target))
                unread.add(self_attr(node.target) or "")
            elif isinstance(node, cst.SimpleString):
                read.add(node.evaluated_value)  # getattr(x, "name")
            elif id(node) not in stores and not _config_field(node):
                read.add(node.attr.value)
        unread -= read | KEEP | {""}
        dropped = False
        body = []
        for stmt in module.body:
            if isinstance(stmt, cst.ClassDef) and stmt.name.value not in dynamic:
                init = methods_of(stmt).get("__init__")
                if init is not None and any(
                    _droppable(s, unread, source_reads)
                    for s in nodes_of(init, cst.Assign, cst.AnnAssign)
                ):
                    rewriter = _DropUnread(unread, source_reads)
                    # the locals that only built the dropped values die with them
                    new = eliminate_dead_stores(init.visit(rewriter))
                    dropped = True
                    stmt = stmt.with_changes(
                        body=stmt.body.with_changes(
                            body=[new if s is init else s for s in stmt.body.body]
                        )
                    )
            body.append(stmt)
        module = module.with_changes(body=body)
        if not dropped:
            return module


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
    # only attributes the source's own code read and the rewrites stopped reading: others
    # may be read by transformers' code (rope's decorators read `original_inv_freq`)
    module = _drop_unread(module, _attrs_read(ctx.source_text))
    return shake(module, {ctx.lm_class})
