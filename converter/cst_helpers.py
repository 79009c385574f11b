"""Shared LibCST helpers, for analysis and passes alike.

Reading: a fast read-only traversal (`nodes_of`, `names_read`; LibCST's visitor dispatch
costs ~10x more), names a statement binds, methods of a class, dotted names. Only
syntax-bearing fields are followed: whitespace, parentheses, commas and other punctuation
are skipped, which is all that collecting names and nodes needs.

Editing: code of a node, keyword-only parameters, an import line, constructor calls.
"""

from __future__ import annotations

import builtins
import dataclasses
import re
from collections.abc import Iterator

import libcst as cst

_SKIP = (
    "whitespace",
    "lpar",
    "rpar",
    "comma",
    "semicolon",
    "leading_lines",
    "newline",
    "lines_after_decorators",
    "header",
    "footer",
    "equal",
    "colon",
    "dot",
    "asynchronous",
    "first_line",
    "trailing",
    "operator",
)
_FIELDS: dict[type, tuple[str, ...]] = {}


def _fields(cls: type) -> tuple[str, ...]:
    names = _FIELDS.get(cls)
    if names is None:
        names = tuple(
            f.name for f in dataclasses.fields(cls) if not any(s in f.name for s in _SKIP)
        )
        _FIELDS[cls] = names
    return names


def children(node: cst.CSTNode) -> Iterator[cst.CSTNode]:
    for name in _fields(type(node)):
        value = getattr(node, name)
        if isinstance(value, cst.CSTNode):
            yield value
        elif isinstance(value, (list, tuple)):
            for item in value:
                if isinstance(item, cst.CSTNode):
                    yield item


def nodes_of(node: cst.CSTNode, *types: type) -> list:
    """Every node of `types` under `node` (itself included), in pre-order."""
    out = []
    stack = [node]
    while stack:
        current = stack.pop()
        if isinstance(current, types):
            out.append(current)
        stack.extend(reversed(list(children(current))))
    return out


def names_read(node: cst.CSTNode) -> set[str]:
    """Names a subtree reads: not attribute fields, call keywords or parameter names."""
    found: set[str] = set()
    stack = [node]
    while stack:
        current = stack.pop()
        if isinstance(current, cst.Name):
            found.add(current.value)
        elif isinstance(current, cst.Attribute):
            stack.append(current.value)
        elif isinstance(current, cst.Arg):
            stack.append(current.value)
        elif isinstance(current, cst.Param):
            stack.extend(p for p in (current.annotation, current.default) if p is not None)
        elif isinstance(current, (cst.Import, cst.ImportFrom)):
            continue
        else:
            stack.extend(children(current))
    return found


def call_name(call: cst.Call) -> str | None:
    """The called name: `softmax` for `torch.softmax(...)`, `x.softmax(...)` or `softmax(...)`."""
    func = call.func
    if isinstance(func, cst.Attribute):
        return func.attr.value
    return func.value if isinstance(func, cst.Name) else None


def has_softmax(node: cst.CSTNode) -> bool:
    """Whether `node` calls a softmax (the anchor of an eager attention core)."""
    return any(call_name(c) == "softmax" for c in nodes_of(node, cst.Call))


def assigned_names(stmts) -> set[str]:
    """Names assigned (at any depth) in a list of statements."""
    out: set[str] = set()
    for stmt in stmts:
        for target in nodes_of(stmt, cst.AssignTarget):
            out |= {n.value for n in nodes_of(target.target, cst.Name)}
    return out


def reachable_methods(methods: dict[str, cst.FunctionDef], roots: set[str]) -> set[str]:
    """`roots` and every method they reach through `self.<name>` references."""
    keep = set(roots)
    work = list(keep)
    while work:
        for ref in self_refs(methods[work.pop()]):
            if ref in methods and ref not in keep:
                keep.add(ref)
                work.append(ref)
    return keep


def self_refs(node: cst.CSTNode) -> set[str]:
    """Attribute names read as ``self.<name>``."""
    return {
        n.attr.value
        for n in nodes_of(node, cst.Attribute)
        if isinstance(n.value, cst.Name) and n.value.value == "self"
    }


def dotted(node: cst.BaseExpression) -> str | None:
    """``self.model.decoder`` -> "self.model.decoder"; None for anything else."""
    if isinstance(node, cst.Name):
        return node.value
    if isinstance(node, cst.Attribute):
        base = dotted(node.value)
        return f"{base}.{node.attr.value}" if base else None
    return None


def called_module(func: cst.BaseExpression) -> str | None:
    """The dotted module a call runs: ``self.a.b(...)`` -> "self.a.b", and an element of a
    module list, ``self.a[0](...)``, -> "self.a" (the ownership graph's list child)."""
    if isinstance(func, cst.Subscript) and len(func.slice) == 1:
        if isinstance(func.slice[0].slice, cst.Index):
            return dotted(func.value)
    return dotted(func)


BUILTINS = frozenset(dir(builtins))


def self_attr(node: cst.BaseExpression) -> str | None:
    """``self.x`` -> "x"."""
    if (
        isinstance(node, cst.Attribute)
        and isinstance(node.value, cst.Name)
        and node.value.value == "self"
    ):
        return node.attr.value
    return None


def find_all(node: cst.CSTNode, pred) -> list[cst.CSTNode]:
    """Every node under `node` (itself included) satisfying `pred`; see `cst_helpers`."""
    return [n for n in nodes_of(node, cst.CSTNode) if pred(n)]


def methods_of(cls: cst.ClassDef) -> dict[str, cst.FunctionDef]:
    body = cls.body.body if isinstance(cls.body, cst.IndentedBlock) else []
    return {s.name.value: s for s in body if isinstance(s, cst.FunctionDef)}


def top_level(module: cst.Module) -> dict[str, cst.CSTNode]:
    """Module-level name -> the statement that binds it (classes, defs, assignments, imports)."""
    out: dict[str, cst.CSTNode] = {}
    for stmt in module.body:
        for name in bound_names(stmt):
            out.setdefault(name, stmt)
    return out


def bound_names(stmt: cst.CSTNode) -> list[str]:
    if isinstance(stmt, (cst.ClassDef, cst.FunctionDef)):
        return [stmt.name.value]
    names: list[str] = []
    if isinstance(stmt, cst.SimpleStatementLine):
        for small in stmt.body:
            if isinstance(small, (cst.Import, cst.ImportFrom)) and not isinstance(
                small.names, cst.ImportStar
            ):
                for alias in small.names:
                    if alias.asname is not None:
                        names.append(alias.asname.name.value)
                    else:
                        names.append((dotted(alias.name) or "").split(".")[0])
            elif isinstance(small, cst.Assign):
                for target in small.targets:
                    names += target_names(target.target)
            elif isinstance(small, cst.AnnAssign):
                names += target_names(small.target)
    elif isinstance(stmt, (cst.If, cst.Try)):
        for sub in _child_blocks(stmt):
            for inner in sub:
                names += bound_names(inner)
    return names


def target_names(target: cst.BaseExpression) -> list[str]:
    """Names an assignment target binds: ``a``, ``a, (b, c)``, ``[a, b]``."""
    if isinstance(target, cst.Name):
        return [target.value]
    if isinstance(target, (cst.Tuple, cst.List)):
        out: list[str] = []
        for el in target.elements:
            out += target_names(el.value)
        return out
    return []


def _child_blocks(stmt: cst.CSTNode) -> list[list[cst.CSTNode]]:
    blocks: list[list[cst.CSTNode]] = []
    if isinstance(stmt, cst.If):
        blocks.append(list(stmt.body.body))
        if stmt.orelse is not None:
            orelse = stmt.orelse
            blocks.append([orelse] if isinstance(orelse, cst.If) else list(orelse.body.body))
    elif isinstance(stmt, cst.Try):
        blocks.append(list(stmt.body.body))
        for handler in stmt.handlers:
            blocks.append(list(handler.body.body))
    return blocks


def flat_statements(body) -> list[cst.BaseSmallStatement]:
    """Small statements of a block, descending into if/else/for/with/try (no visitor)."""
    out: list[cst.BaseSmallStatement] = []
    for stmt in body:
        if isinstance(stmt, cst.SimpleStatementLine):
            out += stmt.body
            continue
        for block in _child_blocks(stmt) or (
            [list(stmt.body.body)] if isinstance(getattr(stmt, "body", None), cst.BaseSuite) else []
        ):
            out += flat_statements(block)
    return out


# --- edits ---


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
