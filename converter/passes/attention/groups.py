"""Attention-interface calls that differ only in their value run as one paged attention.

DiffLlama's differential attention calls the interface twice with the same query, key,
mask and options and two value halves. Attention is linear in the values, so one paged
attention over the values concatenated on the feature axis computes both: the cache
holds each token's key once and its values side by side (``v_head_dim = n * Dv``), and
the ``[1, T, Hq, n * Dv]`` output chunks back into the n outputs, in call order. The
values must share one head size (``Dv``); each call's own value expression is kept.
"""

from __future__ import annotations

import libcst as cst
from libcst.helpers import parse_template_statement

from converter.analysis.roles import is_interface_lookup
from converter.cst_helpers import code, nodes_of

STASH = "paged_outputs"  # the fused call's chunked outputs, read at each call's statement


def interface_calls(forward: cst.FunctionDef) -> list[cst.Call]:
    """The forward's calls of the attention interface it looks up, in source order."""
    names = set()
    for node in nodes_of(forward, cst.Assign, cst.AnnAssign):
        if node.value is not None and is_interface_lookup(node.value):
            target = node.targets[0].target if isinstance(node, cst.Assign) else node.target
            names.add(code(target))
    return [c for c in nodes_of(forward, cst.Call) if code(c.func) in names]


def groupable(forward: cst.FunctionDef, calls: list[cst.Call], bind) -> bool:
    """Same module, query, key, mask and keyword options (by code) in every call, and the
    forward does not use the stash name itself. All calls sit in the forward's top-level
    statements: calls in different branches are alternatives, not parts of one result."""
    if any(n.value == STASH for n in nodes_of(forward, cst.Name)):
        return False
    top = {
        id(c)
        for s in forward.body.body
        if isinstance(s, cst.SimpleStatementLine)
        for c in nodes_of(s, cst.Call)
    }
    if any(id(c) not in top for c in calls):
        return False

    def signature(call):
        bound = bind(call)
        if bound is None:
            return None
        options = sorted(
            (a.keyword.value, code(a.value))
            for a in call.args
            if a.keyword is not None
            and a.keyword.value not in ("module", "query", "key", "value", "attention_mask")
        )
        stars = [code(a.value) for a in call.args if a.star]
        return [code(e) for i, e in enumerate(bound) if i != 3], options, stars

    first = signature(calls[0])
    return first is not None and all(signature(c) == first for c in calls[1:])


def fused_value(calls: list[cst.Call], bind) -> cst.BaseExpression:
    """``torch.cat([v_1, ..., v_n], dim=-1)``: every call's value, on the feature axis."""
    values = [cst.Element(bind(c)[3]) for c in calls]
    return cst.parse_expression("torch.cat([], dim=-1)").with_changes(
        args=[
            cst.Arg(cst.List(values)),
            cst.Arg(
                cst.parse_expression("-1"),
                keyword=cst.Name("dim"),
                equal=cst.AssignEqual(cst.SimpleWhitespace(""), cst.SimpleWhitespace("")),
            ),
        ]
    )


def first_statements(
    out: cst.BaseExpression, paged_call: cst.Call, n: int
) -> list[cst.SimpleStatementLine]:
    """The fused paged call (at the first interface call) and the first output."""
    stash = parse_template_statement(
        "{stash} = {paged}.unflatten(-1, (-1, self.attn.v_head_dim))[None].chunk({n}, dim=-1)"
        f"  # {n} x [1, T, Hq, Dv]\n",
        stash=cst.Name(STASH),
        paged=paged_call,
        n=cst.Integer(str(n)),
    )
    return [stash, part(out, 0)]


def part(out: cst.BaseExpression, index: int) -> cst.SimpleStatementLine:
    """``<out> = <stash>[index]``: one call's part of the fused output."""
    return parse_template_statement(
        "{out} = {stash}[{index}]\n", out=out, stash=cst.Name(STASH), index=cst.Integer(str(index))
    )
