"""What an experts class's ``_apply_gate(gate_up)`` computes, as `FusedMoE` keywords.

transformers' experts run ``gate_up = x @ W_gate_up`` per routed pair, then
``_apply_gate`` (the class's own, or the decorator's default ``act_fn(gate) * up``), then
the down projection. A class that defines its own ``_apply_gate`` (gpt-oss's clamped
SwiGLU, DeepSeek-V4's clamp before SiLU, Step-3.7's clamp after it) is read here by a
small symbolic evaluation: ``gate`` and ``up`` are the two halves of ``gate_up`` (split by
``chunk(2, dim=-1)``: concatenated; by ``[..., ::2]`` / ``[..., 1::2]``: interleaved), and
the returned value must be one of the forms `runtime.moe.activation` implements:

    act(gate') * up'                       act: ACT2FN / F.<fn> / x * sigmoid(alpha * x)
    act(gate).clamp(max=L) * up'           (the clamp after the activation)
    gate' = gate | gate.clamp(max=L)       up' = up | up.clamp(-L, L), plus a constant

Precision casts (``.float()``, ``.to(...)``, ``.type_as(...)``) are the identity here (the
kernels compute the epilogue in fp32). Anything else stops the conversion with one line:
a clamp on one half only, a different limit on each, another function of ``gate``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import libcst as cst

from converter.cst_helpers import code, dotted, one_line

# F.<fn> / torch.<fn> / nn.functional.<fn>: transformers activation name of each
FUNCTIONS = {"silu": "silu", "gelu": "gelu", "relu": "relu", "sigmoid": "sigmoid"}
CASTS = {"float", "to", "type_as", "contiguous", "half", "bfloat16"}


class GateError(Exception):
    """What `_apply_gate` does that FusedMoE cannot, with the node (for the error line)."""

    def __init__(self, message: str, node: cst.CSTNode) -> None:
        super().__init__(message)
        self.node = node


@dataclass(frozen=True)
class Sym:
    """A symbolic value: ``op`` over ``args`` (other Syms, or expressions / numbers)."""

    op: str  # in | gate | up | scalar | num | act | sigmoid | clamp | mul | add | tuple
    args: tuple = ()


@dataclass
class Gate:
    """The gate/up combination, as FusedMoE's keywords (expressions in the experts
    class's scope: ``self.<attr>`` already resolved by the caller's `resolve`)."""

    activation: cst.BaseExpression | None  # None: the class's act_fn (caller resolves it)
    is_concatenated: bool | None  # None: the split is not the class's own (default gate)
    alpha: cst.BaseExpression | None = None
    limit: cst.BaseExpression | None = None
    limit_after_activation: bool = False
    up_offset: float = 0.0


def read_gate(
    fn: cst.FunctionDef,
    resolve: Callable[[cst.BaseExpression], cst.BaseExpression],
    act_fn: Callable[[str], cst.BaseExpression | None],
) -> Gate:
    """`fn` (``_apply_gate(self, gate_up)``) as a `Gate`. ``resolve`` maps an expression of
    the class (``self.limit``) to its value; ``act_fn(attr)`` is the activation name a
    ``self.<attr>`` callable applies (None when it is not an activation)."""
    params = [p.name.value for p in fn.params.params]
    if len(params) != 2 or isinstance(fn.params.star_arg, cst.Param) or fn.params.star_kwarg:
        raise GateError("_apply_gate must take (self, gate_up)", fn)
    ev = _Evaluator(params[1], resolve, act_fn)
    result = ev.block(fn.body.body)
    return _match(result, ev.split, fn)


class _Evaluator:
    def __init__(self, param: str, resolve, act_fn) -> None:
        self.env: dict[str, Sym] = {param: Sym("in")}
        self.resolve, self.act_fn = resolve, act_fn
        self.split: bool | None = None  # concatenated?

    def block(self, body) -> Sym:
        for stmt in body:
            if not isinstance(stmt, cst.SimpleStatementLine):
                raise GateError("only straight-line code is understood in _apply_gate", stmt)
            for small in stmt.body:
                if isinstance(small, cst.Return) and small.value is not None:
                    return self.value(small.value)
                if isinstance(small, cst.Assign) and len(small.targets) == 1:
                    self.bind(small.targets[0].target, self.value(small.value), stmt)
                elif isinstance(small, cst.AugAssign) and isinstance(small.target, cst.Name):
                    op = _BINARY.get(type(small.operator))
                    if op is None:
                        raise GateError("unsupported augmented assignment", stmt)
                    old = self.env.get(small.target.value)
                    if old is None:
                        raise GateError(f"{small.target.value} is not bound", stmt)
                    self.env[small.target.value] = op(old, self.value(small.value), stmt)
                else:
                    raise GateError("unsupported statement in _apply_gate", stmt)
        raise GateError("_apply_gate returns nothing", body[-1] if body else cst.Pass())

    def bind(self, target: cst.BaseExpression, value: Sym, stmt) -> None:
        if isinstance(target, cst.Name):
            self.env[target.value] = value
            return
        if isinstance(target, cst.Tuple | cst.List) and value.op == "tuple":
            if len(target.elements) == len(value.args):
                for el, v in zip(target.elements, value.args):
                    self.bind(el.value, v, stmt)
                return
        raise GateError("unsupported assignment target", stmt)

    def value(self, node: cst.BaseExpression) -> Sym:
        if isinstance(node, cst.Name):
            if node.value in self.env:
                return self.env[node.value]
            if node.value == "None":
                return Sym("none")
            raise GateError(f"{node.value} is not bound in _apply_gate", node)
        if isinstance(node, cst.Integer | cst.Float):
            return Sym("num", (float(node.evaluated_value),))
        if isinstance(node, cst.UnaryOperation) and isinstance(node.operator, cst.Minus):
            inner = self.value(node.expression)
            if inner.op == "num":
                return Sym("num", (-inner.args[0],))
            if inner.op == "scalar":
                return Sym("scalar", (inner.args[0], not inner.args[1]))
            raise GateError("negation of a tensor", node)
        if isinstance(node, cst.Attribute) and dotted(node) and dotted(node).startswith("self."):
            return Sym("scalar", (self.resolve(node), False))  # (expression, negated)
        if isinstance(node, cst.Tuple):
            return Sym("tuple", tuple(self.value(e.value) for e in node.elements))
        if isinstance(node, cst.BinaryOperation):
            op = _BINARY.get(type(node.operator))
            if op is None:
                raise GateError(f"operator {code(node.operator).strip()} in _apply_gate", node)
            return op(self.value(node.left), self.value(node.right), node)
        if isinstance(node, cst.Subscript):
            return self.subscript(node)
        if isinstance(node, cst.Call):
            return self.call(node)
        raise GateError("unsupported expression in _apply_gate", node)

    def subscript(self, node: cst.Subscript) -> Sym:
        base = self.value(node.value)
        text = code(node.slice[-1].slice).replace(" ", "") if node.slice else ""
        first = code(node.slice[0].slice).strip() if len(node.slice) == 2 else None
        if base.op == "in" and first == "..." and text in ("::2", "0::2", "1::2"):
            self._split(False, node)
            return Sym("up" if text == "1::2" else "gate")
        raise GateError("unsupported indexing of gate_up", node)

    def _split(self, concatenated: bool, node) -> None:
        if self.split is not None and self.split != concatenated:
            raise GateError("gate_up split both ways", node)
        self.split = concatenated

    def call(self, node: cst.Call) -> Sym:
        func = node.func
        name = dotted(func) or ""
        args = [a for a in node.args if a.keyword is None]
        kwargs = {a.keyword.value: a.value for a in node.args if a.keyword is not None}
        if isinstance(func, cst.Attribute) and not name.startswith(("torch.", "F.", "nn.")):
            method = func.attr.value
            if name.startswith("self.") and name.count(".") == 1:
                activation = self.act_fn(method)
                if activation is None or len(args) != 1:
                    raise GateError(f"self.{method}(...) is not an activation", node)
                return Sym("act", (activation, self.value(args[0].value)))
            receiver = self.value(func.value)
            return self.method(method, receiver, args, kwargs, node)
        short = name.rsplit(".", 1)[-1]
        if short in CASTS or short == "chunk" or short == "clamp":
            if not args:
                raise GateError(f"{name}() without a tensor", node)
            return self.method(short, self.value(args[0].value), args[1:], kwargs, node)
        if short in FUNCTIONS and len(args) == 1 and not kwargs:
            x = self.value(args[0].value)
            if short == "sigmoid":
                return Sym("sigmoid", (x,))
            return Sym("act", (cst.SimpleString(f'"{FUNCTIONS[short]}"'), x))
        raise GateError(f"{name or code(func)}(...) in _apply_gate", node)

    def method(self, method: str, receiver: Sym, args, kwargs, node) -> Sym:
        if method in CASTS:
            return receiver
        if method == "sigmoid" and not args:
            return Sym("sigmoid", (receiver,))
        if method == "chunk":
            parts = one_line(args[0].value) if args else one_line(kwargs.get("chunks"))
            dim = one_line(args[1].value) if len(args) > 1 else kwargs.get("dim")
            dim = one_line(dim) if isinstance(dim, cst.CSTNode) else dim
            if receiver.op == "in" and parts == "2" and dim in ("-1",):
                self._split(True, node)
                return Sym("tuple", (Sym("gate"), Sym("up")))
            raise GateError("gate_up.chunk must split the last dim in two", node)
        if method == "clamp":
            lo = kwargs.get("min", args[0].value if args else None)
            hi = kwargs.get("max", args[1].value if len(args) > 1 else None)
            return Sym("clamp", (receiver, self._bound(lo), self._bound(hi)))
        raise GateError(f".{method}(...) in _apply_gate", node)

    def _bound(self, node: cst.BaseExpression | None) -> Sym:
        return Sym("none") if node is None else self.value(node)


def _mul(a: Sym, b: Sym, node) -> Sym:
    return Sym("mul", (a, b))


def _add(a: Sym, b: Sym, node) -> Sym:
    if b.op in ("num", "scalar"):
        return Sym("add", (a, b))
    if a.op in ("num", "scalar"):
        return Sym("add", (b, a))
    raise GateError("a sum of two tensors in _apply_gate", node)


_BINARY = {cst.Multiply: _mul, cst.Add: _add}


def _match(result: Sym, concatenated: bool | None, fn: cst.FunctionDef) -> Gate:
    if result.op != "mul":
        raise GateError("_apply_gate must return (activation of gate) * up", fn)
    a, b = result.args
    gate_side, up_side = (a, b) if _mentions(a, "gate") else (b, a)
    if not _mentions(gate_side, "gate") or not _mentions(up_side, "up"):
        raise GateError("_apply_gate must multiply a function of gate by a function of up", fn)
    gate = Gate(activation=None, is_concatenated=concatenated)
    up_limit = _read_up(up_side, gate, fn)
    gate_limit = _read_gate(gate_side, gate, fn)
    if (up_limit is None) != (gate_limit is None) or (
        up_limit is not None and one_line(up_limit) != one_line(gate_limit)
    ):
        raise GateError("gate and up must be clamped by the same limit (or neither)", fn)
    gate.limit = gate_limit
    return gate


def _mentions(sym: Sym, leaf: str) -> bool:
    if sym.op == leaf:
        return True
    return any(isinstance(x, Sym) and _mentions(x, leaf) for x in sym.args)


def _read_up(sym: Sym, gate: Gate, fn) -> cst.BaseExpression | None:
    if sym.op == "add":
        value, offset = sym.args
        if offset.op != "num":
            raise GateError("up is offset by a non-literal", fn)
        gate.up_offset = offset.args[0]
        sym = value
    if sym.op == "up":
        return None
    if sym.op == "clamp" and sym.args[0].op == "up":
        lo, hi = sym.args[1], sym.args[2]
        if lo.op == "scalar" and hi.op == "scalar" and lo.args[1] and not hi.args[1]:
            if one_line(lo.args[0]) == one_line(hi.args[0]):
                return hi.args[0]
    raise GateError("up must be clamped to [-limit, limit] (or not at all)", fn)


def _read_gate(sym: Sym, gate: Gate, fn) -> cst.BaseExpression | None:
    limit = None
    if sym.op == "clamp" and _mentions(sym.args[0], "gate") and sym.args[0].op != "gate":
        limit = _upper_only(sym, fn)  # act(gate).clamp(max=L): after the activation
        gate.limit_after_activation = True
        sym = sym.args[0]
    if sym.op == "act":
        activation, x = sym.args
        gate.activation = activation
        before = _gate_operand(x, fn)
        return _one_limit(limit, before, fn)
    if sym.op == "mul":  # x * sigmoid(alpha * x): silu with alpha
        x, sig = sym.args if sym.args[1].op == "sigmoid" else sym.args[::-1]
        if sig.op == "sigmoid" and sig.args[0].op == "mul":
            y, alpha = sig.args[0].args
            if alpha.op != "scalar":
                y, alpha = alpha, y
            if alpha.op == "scalar" and not alpha.args[1] and y == x:
                gate.activation = cst.SimpleString('"silu"')
                gate.alpha = alpha.args[0]
                return _one_limit(limit, _gate_operand(x, fn), fn)
    raise GateError("the gate's activation is not one FusedMoE implements", fn)


def _gate_operand(x: Sym, fn) -> cst.BaseExpression | None:
    if x.op == "gate":
        return None
    if x.op == "clamp" and x.args[0].op == "gate":
        return _upper_only(x, fn)
    raise GateError("the activation must read gate (or gate clamped from above)", fn)


def _upper_only(clamp: Sym, fn) -> cst.BaseExpression:
    lo, hi = clamp.args[1], clamp.args[2]
    if lo.op != "none" or hi.op != "scalar" or hi.args[1]:
        raise GateError("the gate may only be clamped from above (max=limit)", fn)
    return hi.args[0]


def _one_limit(after, before, fn) -> cst.BaseExpression | None:
    if after is not None and before is not None:
        raise GateError("the gate is clamped both before and after its activation", fn)
    return after if after is not None else before
