"""Pass: drop what the rewrites left unreferenced.

Select keeps ``__init__``, ``forward``, ``extra_repr`` (and flatten adds the LM class's
``compute_logits``), the methods other classes call on
an owned instance, and what those reach through ``self.<name>``; the attention and TP
passes then stop calling some of them (an eager core's ``_attn`` / ``_merge_heads``
helpers) and some module-level code (a local ``nn.Linear`` subclass the TP pass
replaced). The same closure, taken again, drops them.
"""

from __future__ import annotations

import libcst as cst

from converter.analysis import methods_of
from converter.context import ConversionContext
from converter.passes.select import KEPT_METHODS, child_method_calls, self_refs, shake


def _reached(node: cst.ClassDef, called: set[str]) -> set[str]:
    methods = methods_of(node)
    keep = {n for n in (*KEPT_METHODS, "compute_logits", *called) if n in methods}
    work = list(keep)
    while work:
        for ref in self_refs(methods[work.pop()]):
            if ref in methods and ref not in keep:
                keep.add(ref)
                work.append(ref)
    return keep


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
    return shake(module.with_changes(body=body), {ctx.lm_class})
