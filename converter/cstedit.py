"""Small shared edits: keyword-only parameters, an import line."""

from __future__ import annotations

import libcst as cst


def add_params(func: cst.FunctionDef, names: list[tuple[str, str]]) -> cst.FunctionDef:
    """Add keyword-only parameters (name, annotation): existing call sites keep binding
    their positional arguments exactly as before; new arguments are passed by keyword."""
    params = func.params
    have = {p.name.value for p in [*params.params, *params.kwonly_params]}
    new = [
        cst.Param(cst.Name(n), cst.Annotation(cst.parse_expression(a)))
        for n, a in names
        if n not in have
    ]
    kwonly = [
        p.with_changes(comma=cst.MaybeSentinel.DEFAULT) for p in [*params.kwonly_params, *new]
    ]
    positional = [p.with_changes(comma=cst.MaybeSentinel.DEFAULT) for p in params.params]
    star = (
        params.star_arg if not isinstance(params.star_arg, cst.MaybeSentinel) else cst.ParamStar()
    )
    return func.with_changes(
        params=params.with_changes(params=positional, kwonly_params=kwonly, star_arg=star)
    )


def add_import(module: cst.Module, line: str) -> cst.Module:
    """Insert an import after the last module-level import."""
    body = list(module.body)
    last = 0
    for i, stmt in enumerate(body):
        if isinstance(stmt, cst.SimpleStatementLine) and isinstance(
            stmt.body[0], (cst.Import, cst.ImportFrom)
        ):
            last = i + 1
    body.insert(last, cst.parse_statement(line))
    return module.with_changes(body=body)
