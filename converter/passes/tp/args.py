"""Linear constructor arguments for the TP pass, as CST nodes: the source's own
expressions are reused as nodes, never re-parsed from their text (a wrapped source line,
`2\n* config.intermediate_size`, is not an expression on its own)."""

from __future__ import annotations

from dataclasses import dataclass

import libcst as cst

from converter.context import ConversionContext
from converter.cst_helpers import code, dotted
from converter.passes.tp.plan import CONV1D_CTORS


def expr(text: str) -> cst.BaseExpression:
    """A node for an expression's text (the tables of strings: the PA ctor's, a fusion's),
    parsed inside parentheses: a line break the source had inside it stays legal."""
    return cst.parse_expression(f"({text})").with_changes(lpar=[], rpar=[])


def kwarg(name: str, value: cst.BaseExpression | str) -> cst.Arg:
    value = expr(value) if isinstance(value, str) else value
    no_space = cst.AssignEqual(cst.SimpleWhitespace(""), cst.SimpleWhitespace(""))
    return cst.Arg(value, keyword=cst.Name(name), equal=no_space)


@dataclass
class LinearArgs:
    """A linear's constructor arguments, as the source's own nodes."""

    in_: cst.BaseExpression
    out: cst.BaseExpression
    bias: cst.BaseExpression
    extra: tuple[cst.Arg, ...] = ()  # transposed=True for Conv1D


def linear_args(call: cst.Call, ctx: ConversionContext, where: str) -> LinearArgs:
    if (dotted(call.func) or "") in CONV1D_CTORS:  # Conv1D(nf=out, nx=in): weight [in, out]
        nf, nx = (a.value for a in call.args[:2])
        return LinearArgs(nx, nf, cst.Name("True"), (kwarg("transposed", cst.Name("True")),))
    names = ["in_features", "out_features", "bias"]
    got: dict[str, cst.BaseExpression] = {}
    for i, arg in enumerate(call.args):
        key = arg.keyword.value if arg.keyword else (names[i] if i < 3 else None)
        if key not in names:
            raise ctx.error(
                f"{where}: nn.Linear argument {code(arg).strip()!r} has no parallel equivalent",
                call,
                hint="extend converter/passes/tp/",
            )
        got[key] = arg.value
    return LinearArgs(got["in_features"], got["out_features"], got.get("bias", cst.Name("True")))
