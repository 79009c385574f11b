"""Small generic edits the C2 passes share: adding an import, dropping dead locals."""

from __future__ import annotations

import re

import libcst as cst

_EMPTY = cst.Module([])


def code(node: cst.CSTNode) -> str:
    return _EMPTY.code_for_node(node)


class _OneLine(cst.CSTTransformer):
    def leave_ParenthesizedWhitespace(self, original, updated):
        return cst.SimpleWhitespace(" ")


def one_line(node: cst.BaseExpression) -> str:
    """Code of an expression as it compares: outer parentheses off, line breaks (and
    comments) inside brackets as one space, so source wrapped at any width (``(\n
    config.x\n)``, ``2\n* d``) reads as unwrapped and parses again on its own."""
    return code(node.visit(_OneLine()).with_changes(lpar=[], rpar=[]))


def add_import_from(module: cst.Module, names: set[str], package: str) -> cst.Module:
    """`from <package> import <names>` after the module's last top-level import."""
    if not names:
        return module
    stmt = cst.parse_statement(f"from {package} import {', '.join(sorted(names))}")
    body = list(module.body)
    last = max(
        (
            i
            for i, s in enumerate(body)
            if isinstance(s, cst.SimpleStatementLine)
            and isinstance(s.body[0], cst.Import | cst.ImportFrom)
        ),
        default=-1,
    )
    body.insert(last + 1, stmt)
    return module.with_changes(body=body)


def drop_unused_locals(init: cst.FunctionDef, candidates: set[str]) -> cst.FunctionDef:
    """Drop top-level `name = ...` statements of `init` for candidate names nothing reads
    any more (sizes that only fed a replaced constructor)."""
    body = list(init.body.body)
    for name in candidates:
        if not name.isidentifier():
            continue
        defs = [
            s
            for s in body
            if isinstance(s, cst.SimpleStatementLine)
            and isinstance(s.body[0], cst.Assign)
            and code(s.body[0].targets[0].target) == name
        ]
        if len(defs) != 1:
            continue
        pattern = re.compile(rf"\b{name}\b")
        if len(pattern.findall(code(init))) == len(pattern.findall(code(defs[0]))):
            body.remove(defs[0])
    return init.with_changes(body=init.body.with_changes(body=body))


def ctor_call(value: cst.BaseExpression) -> cst.Call | None:
    """The construction an attribute assignment makes: the call itself, or the call of a
    conditional one whose other branch is ``None`` (``None if lora else nn.Linear(...)``)."""
    if isinstance(value, cst.Call):
        return value
    if isinstance(value, cst.IfExp):
        branches = (value.body, value.orelse)
        calls = [b for b in branches if isinstance(b, cst.Call)]
        nones = [b for b in branches if isinstance(b, cst.Name) and b.value == "None"]
        if len(calls) == 1 and len(nones) == 1:
            return calls[0]
    return None


def with_ctor(value: cst.BaseExpression, new: cst.Call) -> cst.BaseExpression:
    """`value` with its `ctor_call` replaced by `new`."""
    if isinstance(value, cst.IfExp):
        if isinstance(value.body, cst.Call):
            return value.with_changes(body=new)
        return value.with_changes(orelse=new)
    return new
