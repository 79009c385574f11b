"""Symbolic shapes of the attention operands, from the source's own tensor code: THE
head-shape algorithm (attention-interface calls and hand-written eager cores alike).

An abstract interpreter over the forward and its helpers reads H and D of the ``[B, H, T,
D]`` q/k/v off the code building each; a shape is a tuple of dim code. Values:
`Shape` (a tensor), a tuple (a shape or a tuple of values), a str (one dim's code: a size
read, or a scalar that reads only ``self``/``config``, e.g. a head count held in a local
``n_kv = self.a if self.flag else self.b``), a bool (a literal flag), None (unknown). It
knows:

- ``view``/``reshape`` (dims, tuple names, ``*shape``): the new dims, also of a tensor it
  cannot follow when every dim is explicit; a ``-1`` that only splits the last dim of an
  ``nn.Linear`` output whose width is ``A * B`` with ``B`` the dims after it becomes ``A``
  (MLA's ``kv_b_proj(...).view(B, T, -1, nope + v)``);
- ``transpose``/``permute``/``unsqueeze``/``expand``, integer indexing (``x[..., 0, :]``),
  last-dim slices and ``split``/``chunk`` (sizes as a list, ``n * [d]``, one size or a
  count; the parts remember the tensor they were cut from, so a ``cat`` of them all is
  that tensor again; else a last-dim ``cat`` sums last dims and any other keeps the dims
  its parts agree on, unknown parts included), ``new_empty`` & co., ``size``/``shape`` (``x.size()[:-1] + (H,
  D)`` concatenates), arithmetic of size reads (``x.size(-1) // self.n_head``);
- any other call preserves its tensor arguments' shapes (norms, rotary helpers,
  ``cache.update(k, v, ...)``: one result per positional tensor argument); ``self.<m>(...)``
  of a helper method runs the helper (parameters bound to the call's values, literal
  defaults included), of a module keeps its input's shape with an ``nn.Linear``'s width;
- ``if``/``else``: an arm whose test is a literal flag runs alone (``split_heads(x, k=True)``);
  otherwise the arms' environments merge to what both agree on, a name an arm only reads
  out of a container (a cache) or leaves unbound taking the other arm's value; when every
  arm returns, the
  returned values merge; an ``if`` with a return in only some arms leaves the names it
  binds unknown.

The attention module's inputs (its forward's first parameter, and every parameter it
projects through one of its modules) are ``[B, T, C]`` by the decoder layer's contract.
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
from converter.cst_helpers import bound_names, names_read, nodes_of, self_attr

MAX_DEPTH = 4  # helper-method inlining depth
STATIC = frozenset({"self", "config"})  # what __init__ can read too


def is_static(expr: cst.BaseExpression) -> bool:
    """A scalar expression that reads only ``self``/``config`` (and literals)."""
    if isinstance(expr, (cst.Tuple, cst.List, cst.Call, cst.Name)):
        return False
    return names_read(expr) <= STATIC


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
                kind, value = self._branch(stmt, env)
                if kind == "return":
                    return kind, value
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

    def _branch(self, stmt: cst.If, env: dict) -> tuple[str, object]:
        """("return", value) when every arm returns, else ("end", None) with `env` merged."""
        flag = self.eval(stmt.test, env)
        if isinstance(flag, bool):  # a literal flag: only the arm it selects runs
            arm = self._blocks(stmt)[0] if flag else (self._blocks(stmt)[1:] or [[]])[0]
            kind, value = self.run(arm, env)
            return (kind, value) if kind == "return" else ("end", None)
        if nodes_of(stmt, cst.Return):
            arms = self._arms(stmt)
            if arms is not None and all(_returns(arm) for arm in arms):
                values = [self.run(arm, dict(env))[1] for arm in arms]
                result = values[0]
                for value in values[1:]:
                    result = merge(result, value)
                return "return", result
            env.update(dict.fromkeys(bound_names(stmt)))  # no environment to merge
            return "end", None
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
            # a name new to this branch that one arm leaves unbound has the other's value
            # (reading it after the other arm would fail)
            if name not in env:
                a = b if name not in first else a
                b = a if name not in second else b
            env[name] = merge(a, b)
        return "end", None

    def _arms(self, stmt: cst.If) -> list[list] | None:
        """Every arm of an if/elif/else chain; None without a final else."""
        arms = [list(stmt.body.body)]
        orelse = stmt.orelse
        while isinstance(orelse, cst.If):
            arms.append(list(orelse.body.body))
            orelse = orelse.orelse
        if orelse is None:
            return None
        return [*arms, list(orelse.body.body)]

    def _container_reads(self, block: list, env: dict) -> set[str]:
        """Names a block binds from ``container[key]`` or ``cache.layers[i].keys`` (a chain
        of subscripts and attributes of something that is no tensor)."""
        found: set[str] = set()
        for stmt in block:
            for small in stmt.body if isinstance(stmt, cst.SimpleStatementLine) else []:
                if not isinstance(small, cst.Assign) or not _container_read(small.value):
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
            if expr.value in ("True", "False"):
                return expr.value == "True"
            return env.get(expr.value)
        if isinstance(expr, cst.UnaryOperation) and isinstance(expr.operator, cst.Not):
            inner = self.eval(expr.expression, env)
            return (not inner) if isinstance(inner, bool) else None
        if is_static(expr):
            return dim_code(expr)
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
            if isinstance(expr.operator, cst.Add) and isinstance(left, tuple):
                return left + right if isinstance(right, tuple) else None
            return self._arith(expr, left, right)
        if isinstance(expr, cst.IfExp):
            value = self.eval(expr.body, env)
            return value if value is not None else self.eval(expr.orelse, env)
        return None

    def _arith(self, node: cst.BinaryOperation, left, right) -> str | None:
        """A dim written as arithmetic of size reads and static terms, else None."""
        sides = []
        for side, value in ((node.left, left), (node.right, right)):
            if value is None and isinstance(side, (cst.Integer, cst.Name, cst.Attribute)):
                value = dim_code(side)
            if not isinstance(value, str):
                return None
            sides.append(value)
        op = dim_code(node.operator)
        compound = any(not all(c.isalnum() or c in "._" for c in s) for s in sides)
        return f"({sides[0]}){op}({sides[1]})" if compound else f"{sides[0]}{op}{sides[1]}"

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
            if method == "size" and not call.args:  # x.size() is x.shape
                base = self.eval(func.value, env)
                return base.dims if isinstance(base, Shape) else None
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
            if method in ("view", "reshape") and base is None:  # every dim explicit
                dims = self._dims(call.args, env)
                if dims and None not in dims and "-1" not in dims:
                    return Shape(dims)
            if method in SPLITS and values and isinstance(values[0], Shape):
                return split_shape(values[0], method, positional[1:], kwargs)
            if method in CATS and values and isinstance(values[0], tuple):
                dim = kwargs.get("dim", positional[1].value if len(positional) > 1 else None)
                return cat_shapes(values[0], as_int(dim) if dim is not None else 0)
        return [v for v in values if isinstance(v, Shape)] or None

    def _inline(self, method: cst.FunctionDef, call: cst.Call, env: dict):
        if self.depth >= MAX_DEPTH:
            return None
        params = [p for p in method.params.params][1:]  # drop self
        names = [p.name.value for p in params]
        local: dict = {}
        for param in params:  # literal defaults: flags the body may test
            if param.default is not None:
                local[param.name.value] = self.eval(param.default, env)
        positional = [a for a in call.args if a.keyword is None and not a.star]
        for name, arg in zip(names, positional):
            local[name] = self.eval(arg.value, env)
        for arg in call.args:
            if arg.keyword is not None and arg.keyword.value in names:
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


def _returns(block: list) -> bool:
    last = block[-1] if block else None
    return isinstance(last, cst.SimpleStatementLine) and isinstance(last.body[-1], cst.Return)


def _container_read(value: cst.BaseExpression) -> bool:
    """``a[k]``, ``a.b[k].c``: subscripts and attributes only, at least one subscript or
    a chain through a subscript (no call)."""
    seen_subscript = False
    node = value
    while isinstance(node, (cst.Subscript, cst.Attribute)):
        seen_subscript |= isinstance(node, cst.Subscript)
        node = node.value
    return seen_subscript and isinstance(node, cst.Name)


def forward_interpreter(
    forward: cst.FunctionDef, methods: dict[str, cst.FunctionDef]
) -> tuple[Interpreter, dict]:
    """An interpreter over `forward` (of a class with `methods`) and its entry environment:
    the attention's inputs ``[B, T, C]``."""
    interp = Interpreter(methods, linear_widths(methods["__init__"]))
    params = [p.name.value for p in forward.params.params][1:]
    inputs = set(params[:1])
    for call in nodes_of(forward.body, cst.Call):
        positional = [a.value for a in call.args if a.keyword is None and not a.star]
        owner = self_attr(call.func) if isinstance(call.func, cst.Attribute) else None
        if owner and owner not in methods and positional and isinstance(positional[0], cst.Name):
            inputs.add(positional[0].value)  # projected through one of its modules
    return interp, {p: Shape((None, None, None)) for p in params if p in inputs}


def operand_shapes(
    forward: cst.FunctionDef,
    call: cst.Call,
    operands: list[cst.BaseExpression],
    methods: dict[str, cst.FunctionDef],
) -> list[tuple | None]:
    """The dims of each operand of `call` (an attention-interface call in `forward`)."""
    interp, env = forward_interpreter(forward, methods)
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
