"""Analysis of a modeling file, shared by every pass: CST helpers, the ownership graph
and structural roles, dataflow and liveness, the call graph, dispatch tables, and the
head-shape interpreter. Nothing here rewrites the module the pipeline passes on.

`analyze` runs once on the parsed source, before any pass, so every pass sees the roles
of the ORIGINAL file.
"""

from __future__ import annotations

import libcst as cst

from converter.analysis.ast_facts import line_index
from converter.analysis.ownership import collect_classes
from converter.analysis.roles import find_roles
from converter.context import ConversionContext
from converter.cst_helpers import top_level


def analyze(module: cst.Module, ctx: ConversionContext) -> None:
    """Fill the ownership graph, module symbols, line index and roles of `ctx`."""
    ctx.module_symbols = set(top_level(module))
    ctx.functions = [s.name.value for s in module.body if isinstance(s, cst.FunctionDef)]
    ctx.line_index = line_index(ctx.source_text)
    ctx.classes = collect_classes(module, ctx)
    find_roles(module, ctx)
