"""Static sizes in an eager core: a tensor size the forward reads at run time
(``math.sqrt(v.size(-1))``, a head split ``x.size(-1) // self.n_head`` in a helper)
as the ``__init__`` expression it always equals.

The head-shape interpreter (`head_shapes.Interpreter`) runs the forward up to the core,
with three more things it knows here:

- ``x.size()`` is ``x.shape``; ``a + b`` of two shape tuples concatenates them
  (``x.size()[:-1] + (H, D)``), and a dim written as arithmetic of size reads
  (``x.size(-1) // H``) is that arithmetic of the dims it reads;
- a helper's ``if <flag>:`` on a parameter bound to ``True``/``False`` (an argument or
  its default: ``split_heads(x, k=True)``) runs only the arm the flag selects, returns
  included.

`static_sizes` then replaces each ``X.size(i)`` / ``X.shape[i]`` read of a tensor whose dim
is known and reads only ``self``/``config`` by that dim.
"""

from __future__ import annotations

import libcst as cst

from converter.analysis.head_shapes import MAX_DEPTH, Interpreter
from converter.analysis.shape_ops import Shape, dim_code, linear_widths
from converter.cst_helpers import bound_names, names_read, nodes_of

STATIC = {"self", "config"}


class StaticInterpreter(Interpreter):
    """`Interpreter` with the additions the module docstring lists."""

    def eval(self, expr, env: dict):
        if isinstance(expr, cst.Name) and expr.value in ("True", "False"):
            return expr.value == "True"
        if isinstance(expr, cst.BinaryOperation) and isinstance(expr.operator, cst.Add):
            left, right = self.eval(expr.left, env), self.eval(expr.right, env)
            if isinstance(left, tuple) and isinstance(right, tuple):
                return left + right
        if isinstance(expr, cst.BinaryOperation):
            value = super().eval(expr, env)
            return value if value is not None else self._arith(expr, env)
        if (
            isinstance(expr, cst.Call)
            and isinstance(expr.func, cst.Attribute)
            and expr.func.attr.value == "size"
            and not expr.args
        ):
            base = self.eval(expr.func.value, env)
            return base.dims if isinstance(base, Shape) else None
        return super().eval(expr, env)

    def _arith(self, node: cst.BinaryOperation, env: dict) -> str | None:
        """A dim written as arithmetic of size reads and static terms, else None."""
        sides = []
        for side in (node.left, node.right):
            value = self.eval(side, env)
            if value is None and isinstance(side, (cst.Integer, cst.Name, cst.Attribute)):
                value = dim_code(side)
            if not isinstance(value, str):
                return None
            sides.append(value)
        left, right = sides
        op = dim_code(node.operator)
        return f"({left}){op}({right})" if _compound(left, right) else f"{left}{op}{right}"

    def _inline(self, method: cst.FunctionDef, call: cst.Call, env: dict):
        if self.depth >= MAX_DEPTH:
            return None
        params = [p for p in method.params.params][1:]  # drop self
        local: dict = {}
        for param in params:  # literal defaults: flags the body may test
            if param.default is not None:
                local[param.name.value] = self.eval(param.default, env)
        positional = [a for a in call.args if a.keyword is None and not a.star]
        for param, arg in zip(params, positional):
            local[param.name.value] = self.eval(arg.value, env)
        for arg in call.args:
            if arg.keyword is not None:
                local[arg.keyword.value] = self.eval(arg.value, env)
        flags = {k: v for k, v in local.items() if isinstance(v, bool)}
        self.depth += 1
        try:
            kind, value = self.run(_select(list(method.body.body), flags), local)
        finally:
            self.depth -= 1
        return value if kind == "return" else None


def _compound(*parts: str) -> bool:
    return any(not all(c.isalnum() or c in "._" for c in p) for p in parts)


def _select(body: list, flags: dict[str, bool]) -> list:
    """`body` with each ``if <flag>:`` / ``if not <flag>:`` replaced by the arm it runs."""
    out: list = []
    for stmt in body:
        test = stmt.test if isinstance(stmt, cst.If) else None
        negate = isinstance(test, cst.UnaryOperation) and isinstance(test.operator, cst.Not)
        name = test.expression if negate else test
        if not (isinstance(name, cst.Name) and name.value in flags):
            out.append(stmt)
            continue
        taken = flags[name.value] != negate
        if taken:
            out += _select(list(stmt.body.body), flags)
        elif isinstance(stmt.orelse, cst.If):
            out += _select([stmt.orelse], flags)
        elif stmt.orelse is not None:
            out += _select(list(stmt.orelse.body.body), flags)
    return out


def shapes_before(node: cst.ClassDef, forward: cst.FunctionDef, methods, body: list) -> dict:
    """The interpreter's environment after `body` (forward statements): name -> value."""
    interp = StaticInterpreter(methods, linear_widths(methods["__init__"]))
    params = [p.name.value for p in forward.params.params][1:]
    env: dict = {params[0]: Shape((None, None, None))} if params else {}
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
        self.interp = StaticInterpreter({}, {})

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
