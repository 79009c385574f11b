"""Static sizes in an eager core: a tensor size the forward reads at run time
(``math.sqrt(v.size(-1))``, a head split ``x.size(-1) // self.n_head`` in a helper)
as the ``__init__`` expression it always equals.

The head-shape interpreter (`converter.analysis.head_shapes`) runs the forward up to the
core (`shapes_before`); `static_sizes` then replaces each ``X.size(i)`` / ``X.shape[i]`` read of a tensor whose dim
is known and reads only ``self``/``config`` by that dim.
"""

from __future__ import annotations

import libcst as cst

from converter.analysis.head_shapes import STATIC, Interpreter, forward_interpreter
from converter.analysis.shape_ops import dim_code
from converter.cst_helpers import bound_names, names_read, nodes_of


def shapes_before(forward: cst.FunctionDef, methods, body: list) -> dict:
    """The interpreter's environment after `body` (forward statements): name -> value."""
    interp, env = forward_interpreter(forward, methods)
    interp.run(body, env)
    return env


def static_dim(value) -> str | None:
    """A dim expression valid in ``__init__`` (reads only self/config), else None."""
    if not isinstance(value, str):
        return None
    try:
        expr = cst.parse_expression(value)
    except cst.ParserSyntaxError:
        return None
    return value if names_read(expr) <= STATIC else None


class _Sizes(cst.CSTTransformer):
    def __init__(self, env: dict) -> None:
        self.env = env
        self.interp = Interpreter({}, {})

    def _replace(self, original, updated):
        dim = static_dim(self.interp.eval(original, self.env))
        return cst.parse_expression(f"({dim})") if dim is not None else updated

    def leave_Call(self, original: cst.Call, updated: cst.Call) -> cst.BaseExpression:
        if isinstance(original.func, cst.Attribute) and original.func.attr.value == "size":
            return self._replace(original, updated)
        return updated

    def leave_Arg(self, original: cst.Arg, updated: cst.Arg) -> cst.Arg:
        if original.value is not updated.value and updated.value.lpar:  # f((a // b)) -> f(a // b)
            return updated.with_changes(value=updated.value.with_changes(lpar=[], rpar=[]))
        return updated

    def leave_Subscript(self, original: cst.Subscript, updated) -> cst.BaseExpression:
        if isinstance(original.value, cst.Attribute) and original.value.attr.value == "shape":
            return self._replace(original, updated)
        return updated


def static_sizes(expr: str, env: dict) -> str:
    """`expr` with each size read of a tensor known in `env` replaced by its static dim."""
    return dim_code(cst.parse_expression(expr).visit(_Sizes(env)))


def forward_only(expr: str, forward: cst.FunctionDef, init: cst.FunctionDef) -> set[str]:
    """Names `expr` reads that only the forward binds (a per-call mask multiplied into the
    scores, a size no shape tells): such a scale cannot be a constructor argument."""

    def bound(fn: cst.FunctionDef) -> set[str]:
        params = {p.name.value for p in (*fn.params.params, *fn.params.kwonly_params)}
        return params | {
            n for s in nodes_of(fn.body, cst.SimpleStatementLine) for n in bound_names(s)
        }

    return names_read(cst.parse_expression(expr)) & (bound(forward) - bound(init) - STATIC)
