"""Symbolic shapes of the attention operands, from the source's own tensor code.

An abstract interpreter over the forward and its helpers reads H and D of the ``[B, H, T,
D]`` q/k/v off the code building each; a shape is a tuple of dim code. It knows:

- ``view``/``reshape`` (dims, tuple names, ``*shape``): the new dims; a ``-1`` that only
  splits the last dim of an ``nn.Linear`` output whose width is ``A * B`` with ``B`` the
  dims after it becomes ``A`` (MLA's ``kv_b_proj(...).view(B, T, -1, nope + v)``);
- ``transpose``/``permute``/``unsqueeze``, integer indexing (``x[..., 0, :]``), last-dim
  slices and ``split``/``chunk`` (the parts remember the tensor they were cut from, so a
  ``cat`` of them all is that tensor again; else it sums last dims), ``new_empty``, ``size``;
- any other call preserves its tensor arguments' shapes (norms, rotary helpers,
  ``cache.update(k, v, ...)``: one result per positional tensor argument).

Unknown stays ``None``; callers fall back to the older view search. An ``if`` with a
``return`` in an arm leaves the names it binds unknown.
"""

from __future__ import annotations

import libcst as cst

from converter.analysis.shape_ops import (
    CATS,
    NEW,
    SPLITS,
    Shape,
    as_int,
    cat_shapes,
    dim_code,
    index_dims,
    index_shape,
    infer_view,
    linear_widths,
    merge,
    split_shape,
)
from converter.cst_helpers import bound_names, nodes_of, self_attr

MAX_DEPTH = 4  # helper-method inlining depth


class Interpreter:
    """Runs a forward symbolically (see the module docstring); `operand_shapes` drives it."""

    def __init__(self, methods: dict[str, cst.FunctionDef], widths: dict[str, str]) -> None:
        self.methods, self.widths = methods, widths
        self.depth = 0

    # ------------------------------------------------------------------ statements
    def run(self, body, env: dict, stop: cst.CSTNode | None = None):
        """Interpret `body`; returns ("stop", env) at the statement holding `stop`,
        ("return", value) at a top-level return, else ("end", env)."""
        for stmt in body:
            if stop is not None and any(n is stop for n in nodes_of(stmt, type(stop))):
                if isinstance(stmt, cst.SimpleStatementLine):
                    return "stop", env
                inner = self._blocks(stmt)
                for block in inner:
                    kind, res = self.run(block, dict(env), stop)
                    if kind == "stop":
                        return kind, res
                return "stop", env
            if isinstance(stmt, cst.SimpleStatementLine):
                for small in stmt.body:
                    if isinstance(small, cst.Return):
                        return "return", self.eval(small.value, env) if small.value else None
                    self._small(small, env)
            elif isinstance(stmt, cst.If):
                self._branch(stmt, env)
            else:
                for block in self._blocks(stmt):
                    self.run(block, env)
        return "end", env

    @staticmethod
    def _blocks(stmt) -> list[list]:
        out = []
        for name in ("body", "orelse", "finalbody"):
            part = getattr(stmt, name, None)
            if isinstance(part, cst.If):
                out.append([part])
            elif isinstance(part, (cst.Else, cst.Finally)):
                out.append(list(part.body.body))
            elif isinstance(part, cst.BaseSuite):
                out.append(list(part.body))
        return out

    def _branch(self, stmt: cst.If, env: dict) -> None:
        if nodes_of(stmt, cst.Return):  # a returning arm leaves no environment to merge
            env.update(dict.fromkeys(bound_names(stmt)))
            return
        blocks = self._blocks(stmt)
        envs = [self.run(block, dict(env))[1] for block in blocks]
        opaque = [self._container_reads(block, env) for block in blocks]
        if len(envs) == 1:
            envs.append(dict(env))
            opaque.append(set())
        first, second = envs[0], envs[1]
        for name in set(first) | set(second):
            a, b = first.get(name), second.get(name)
            # a branch that only reads the value out of a container (gemma4's KV-shared
            # layers: `k, v = shared[t]`) takes the shape the other branch computes
            a = b if a is None and name in opaque[0] else a
            b = a if b is None and name in opaque[1] else b
            env[name] = merge(a, b)

    def _container_reads(self, block: list, env: dict) -> set[str]:
        """Names a block binds from ``container[key]`` (a container that is no tensor)."""
        found: set[str] = set()
        for stmt in block:
            for small in stmt.body if isinstance(stmt, cst.SimpleStatementLine) else []:
                if not (isinstance(small, cst.Assign) and isinstance(small.value, cst.Subscript)):
                    continue
                if self.eval(small.value.value, env) is not None:
                    continue
                for target in (t.target for t in small.targets):
                    names = target.elements if isinstance(target, (cst.Tuple, cst.List)) else []
                    names = [e.value for e in names] or [target]
                    found |= {n.value for n in names if isinstance(n, cst.Name)}
        return found

    def _small(self, small, env: dict) -> None:
        if isinstance(small, cst.Assign):
            value = self.eval(small.value, env)
            for target in small.targets:
                self.bind(target.target, value, env)
        elif isinstance(small, cst.AnnAssign) and small.value is not None:
            self.bind(small.target, self.eval(small.value, env), env)

    def bind(self, target, value, env: dict) -> None:
        if isinstance(target, cst.Name):
            env[target.value] = value[0] if isinstance(value, list) and value else value
        elif isinstance(target, (cst.Tuple, cst.List)):
            names = [el.value for el in target.elements]
            if isinstance(value, (tuple, list)) and len(value) >= len(names):
                for name, item in zip(names, value):
                    self.bind(name, item, env)
            else:
                for name in names:
                    self.bind(name, None, env)

    # ------------------------------------------------------------------ expressions
    def eval(self, expr, env: dict):
        if isinstance(expr, cst.Name):
            return env.get(expr.value)
        if isinstance(expr, (cst.Tuple, cst.List)):
            out = []
            for el in expr.elements:
                if isinstance(el, cst.StarredElement):
                    inner = self.eval(el.value, env)
                    out += list(inner) if isinstance(inner, tuple) else [None]
                else:
                    value = self.eval(el.value, env)
                    out.append(value if value is not None else dim_code(el.value))
            return tuple(out)
        if isinstance(expr, cst.Subscript):
            return self._subscript(expr, env)
        if isinstance(expr, cst.Attribute) and expr.attr.value == "shape":
            base = self.eval(expr.value, env)
            return base.dims if isinstance(base, Shape) else None
        if isinstance(expr, cst.Call):
            return self._call(expr, env)
        if isinstance(expr, cst.BinaryOperation):
            left, right = self.eval(expr.left, env), self.eval(expr.right, env)
            for side in (left, right):
                if isinstance(side, Shape):
                    return side
            return None
        if isinstance(expr, cst.IfExp):
            value = self.eval(expr.body, env)
            return value if value is not None else self.eval(expr.orelse, env)
        return None

    def _dim(self, node, env: dict):
        """A dim argument: its value when it is a shape entry (``x.shape[1]``), else code."""
        value = self.eval(node, env)
        return value if isinstance(value, str) else dim_code(node)

    def _dims(self, args, env: dict) -> tuple | None:
        """Dims of a view/new_* call: ``(a, b)``, ``a, b``, ``*shape``, a tuple name."""
        out: list = []
        for arg in args:
            if arg.keyword is not None:
                continue
            if arg.star == "*" or (len(args) == 1 and not isinstance(arg.value, cst.Integer)):
                inner = self.eval(arg.value, env)
                if isinstance(inner, tuple):
                    out += list(inner)
                    continue
                if arg.star == "*":
                    return None
            out.append(self._dim(arg.value, env))
        return tuple(out)

    def _subscript(self, expr: cst.Subscript, env: dict):
        base = self.eval(expr.value, env)
        items = [s.slice for s in expr.slice]
        if isinstance(base, tuple):
            return index_dims(base, items)
        return index_shape(base, items) if isinstance(base, Shape) else None

    def _call(self, call: cst.Call, env: dict):
        func = call.func
        positional = [a for a in call.args if a.keyword is None and not a.star]
        kwargs = {a.keyword.value: a.value for a in call.args if a.keyword is not None}
        values = [self.eval(a.value, env) for a in positional]
        if isinstance(func, cst.Attribute):
            method = func.attr.value
            owner = self_attr(func)
            if owner is not None:  # self.<method>(...) or self.<module>(...)
                if owner in self.methods:
                    return self._inline(self.methods[owner], call, env)
                first = values[0] if values else None
                if isinstance(first, Shape) and owner in self.widths:
                    return Shape((*first.dims[:-1], self.widths[owner]))
                return first if isinstance(first, Shape) else None
            base = self.eval(func.value, env)
            if isinstance(base, Shape):
                return self._tensor_method(base, method, call, positional, kwargs, env)
            if method in SPLITS and values and isinstance(values[0], Shape):
                return split_shape(values[0], method, positional[1:], kwargs)
            if method in CATS and values and isinstance(values[0], tuple):
                dim = kwargs.get("dim", positional[1].value if len(positional) > 1 else None)
                return cat_shapes(values[0], as_int(dim) if dim is not None else 0)
        return [v for v in values if isinstance(v, Shape)] or None

    def _inline(self, method: cst.FunctionDef, call: cst.Call, env: dict):
        if self.depth >= MAX_DEPTH:
            return None
        params = [p.name.value for p in method.params.params][1:]  # drop self
        local: dict = {}
        positional = [a for a in call.args if a.keyword is None and not a.star]
        for name, arg in zip(params, positional):
            local[name] = self.eval(arg.value, env)
        for arg in call.args:
            if arg.keyword is not None and arg.keyword.value in params:
                local[arg.keyword.value] = self.eval(arg.value, env)
        self.depth += 1
        try:
            kind, value = self.run(list(method.body.body), local)
        finally:
            self.depth -= 1
        return value if kind == "return" else None

    def _tensor_method(self, base: Shape, method: str, call, positional, kwargs, env):
        rank = len(base.dims)
        ints = [as_int(a.value) for a in positional]
        if method in ("view", "reshape"):
            dims = self._dims(call.args, env)
            return Shape(infer_view(base, dims)) if dims else None
        if method in ("transpose", "swapaxes") and len(ints) == 2 and None not in ints:
            a, b = (i % rank for i in ints)
            dims = list(base.dims)
            dims[a], dims[b] = dims[b], dims[a]
            return Shape(tuple(dims))
        if method == "permute" and len(ints) == rank and None not in ints:
            return Shape(tuple(base.dims[i] for i in ints))
        if method == "unsqueeze" and len(ints) == 1 and ints[0] is not None:
            dims = list(base.dims)
            dims.insert(ints[0] % (rank + 1), "1")
            return Shape(tuple(dims))
        if method == "size" and len(ints) == 1 and ints[0] is not None:
            return base.dims[ints[0]] if -rank <= ints[0] < rank else None
        if method in SPLITS:
            return split_shape(base, method, positional, kwargs)
        if method in NEW:
            dims = self._dims(call.args, env)
            return Shape(dims) if dims else None
        if method == "expand":
            dims = self._dims(call.args, env)
            if not dims or len(dims) != rank:
                return None
            return Shape(tuple(o if d == "-1" else d for d, o in zip(dims, base.dims)))
        return base  # contiguous, to, float, type_as, clone, ...


def operand_shapes(
    forward: cst.FunctionDef,
    call: cst.Call,
    operands: list[cst.BaseExpression],
    methods: dict[str, cst.FunctionDef],
    init: cst.FunctionDef,
) -> list[tuple | None]:
    """The dims of each operand of `call` (an attention-interface call in `forward`)."""
    interp = Interpreter(methods, linear_widths(init))
    params = [p.name.value for p in forward.params.params][1:]
    # The attention input (first parameter) is [B, T, C] by the decoder layer's contract.
    env = {params[0]: Shape((None, None, None))} if params else {}
    # `call` may come from a rewritten copy of `forward`: find its twin by structure.
    stop = next((c for c in nodes_of(forward, cst.Call) if c.deep_equals(call)), call)
    kind, env = interp.run(list(forward.body.body), env, stop=stop)
    if kind != "stop":
        return [None] * len(operands)
    out = []
    for expr in operands:
        value = interp.eval(expr, env)
        out.append(value.dims if isinstance(value, Shape) else None)
    return out
