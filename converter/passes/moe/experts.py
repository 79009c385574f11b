"""Experts classes, found by structure, and their layout as `FusedMoE` arguments.

An experts class holds its experts as 3-D parameters (``gate_up_proj [E, 2I, H]``,
``down_proj [E, H, I]``, some transposed, some with biases, ``up_proj`` alone without a
gate) and is called as ``experts(hidden_states, top_k_index, top_k_weights)``.
transformers marks the ones whose forward is its standard top-k loop with
``@use_experts_implementation`` (the decorator then swaps the forward for batched or
grouped GEMMs with the same semantics); its keyword arguments describe the layout.

`read_layout` turns one class into `Layout`: the three sizes (from the parameter shapes),
the flags (the decorator's, checked against the shapes), the activation (the class's
``act_fn``) and the clamped-SwiGLU constants of its own ``_apply_gate`` (`gate.read_gate`),
each an expression over the class's ``__init__`` parameters: its straight-line
``__init__`` is evaluated symbolically (``self.<attr>`` and locals replaced by their
values), so `__init__`'s parameters are the only names left and a construction site can
bind them to its own arguments.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import libcst as cst
import libcst.matchers as m

from converter.context import ConversionContext
from converter.cst_helpers import code, dotted, methods_of, one_line, self_attr
from converter.passes.moe.gate import Gate, GateError, read_gate
from converter.passes.moe.topk_loop import LoopError, TopkLoop, identity_children, read_topk_loop

PARAMETER = m.Call(func=m.Attribute(attr=m.Name("Parameter")) | m.Name("Parameter"))
TENSOR_CTORS = {"empty", "zeros", "ones", "randn", "rand"}
# the parameter names FusedMoE keeps (transformers' own): the input projection (gated or
# not), the down projection, and their biases
IN_PROJ = {True: "gate_up_proj", False: "up_proj"}
ACTIVATION_MODULES = {"SiLU": "silu", "GELU": "gelu", "ReLU": "relu", "Sigmoid": "sigmoid"}
FLAGS = ("is_concatenated", "is_transposed", "has_bias", "has_gate", "has_post_expert_norm")
DEFAULT_FLAGS = {
    "is_concatenated": True,
    "is_transposed": False,
    "has_bias": False,
    "has_gate": True,
    "has_post_expert_norm": False,
}


class LayoutError(Exception):
    def __init__(self, message: str, node: cst.CSTNode, hint: str | None = None) -> None:
        super().__init__(message)
        self.node, self.hint = node, hint


@dataclass
class Layout:
    """FusedMoE's arguments for one experts class, over its ``__init__`` parameters."""

    num_experts: cst.BaseExpression
    hidden_size: cst.BaseExpression
    intermediate_size: cst.BaseExpression
    activation: cst.BaseExpression
    flags: dict[str, bool]
    gate: Gate
    init_params: list[cst.Param] = field(default_factory=list)
    weight_on_input: bool = False  # dense experts read as top-k (converter/passes/moe/dense.py)
    # zero-computation experts after the E real ones (converter/passes/moe/topk_loop.py)
    identity_experts: cst.BaseExpression | None = None

    # experts held as 2-D parameters (`flat_experts.FlatWeight` each): which checkpoint
    # tensor loads where; empty for 3-D experts (their parameters keep FusedMoE's names)
    flat: list = field(default_factory=list)


def decorator_flags(
    cls: cst.ClassDef, names: set[str]
) -> tuple[cst.Decorator | None, dict[str, bool]]:
    """The experts decorator of `cls` (one of `names`) and its literal keyword flags."""
    for dec in cls.decorators:
        target = dec.decorator.func if isinstance(dec.decorator, cst.Call) else dec.decorator
        if (dotted(target) or "") not in names:
            continue
        flags = dict(DEFAULT_FLAGS)
        for arg in dec.decorator.args if isinstance(dec.decorator, cst.Call) else ():
            key = arg.keyword.value if arg.keyword else None
            if key == "experts_interface":
                continue
            value = one_line(arg.value)
            if key not in FLAGS or value not in ("True", "False"):
                raise LayoutError(
                    f"@{dotted(target)} argument {code(arg).strip()} is not a literal layout flag",
                    dec,
                    hint=f"FusedMoE reads {', '.join(FLAGS)} as True/False literals",
                )
            flags[key] = value == "True"
        return dec, flags
    return None, {}


def parameter_shape(value: cst.BaseExpression) -> list[cst.BaseExpression] | None:
    """``nn.Parameter(torch.empty(a, b, c))`` (or ``torch.zeros((a, b, c), dtype=...)``)
    -> ``[a, b, c]``; None for anything else."""
    if not m.matches(value, PARAMETER) or not value.args:
        return None
    inner = value.args[0].value
    if not isinstance(inner, cst.Call) or (dotted(inner.func) or "").split(".")[-1] not in (
        TENSOR_CTORS
    ):
        return None
    dims = [a.value for a in inner.args if a.keyword is None]
    if len(dims) == 1 and isinstance(dims[0], cst.Tuple | cst.List):
        dims = [e.value for e in dims[0].elements]
    return dims


def _optional_parameters(stmt: cst.BaseStatement) -> list[cst.BaseStatement] | None:
    """The body of ``if <cond>: self.p = nn.Parameter(...) ... else:
    self.register_parameter("p", None) ...`` (the experts' weights, absent when the model
    has no routed experts: LongCat-Flash), else None."""
    if not isinstance(stmt, cst.If) or not isinstance(stmt.orelse, cst.Else):
        return None
    none = m.Expr(
        m.Call(
            func=m.Attribute(value=m.Name("self"), attr=m.Name("register_parameter")),
            args=[m.Arg(m.SimpleString()), m.Arg(m.Name("None"))],
        )
    )
    registered = set()
    for line in stmt.orelse.body.body:
        for small in line.body if isinstance(line, cst.SimpleStatementLine) else [line]:
            if not m.matches(small, none):
                return None
            registered.add(small.value.args[0].value.evaluated_value)
    assigned = set()
    for line in stmt.body.body:
        for small in line.body if isinstance(line, cst.SimpleStatementLine) else [line]:
            attr = self_attr(small.targets[0].target) if isinstance(small, cst.Assign) else None
            if attr is None or not m.matches(small.value, PARAMETER):
                return None
            assigned.add(attr)
    return list(stmt.body.body) if assigned == registered else None


def three_d_parameters(cls: cst.ClassDef) -> dict[str, list[cst.BaseExpression]]:
    init = methods_of(cls).get("__init__")
    found: dict[str, list[cst.BaseExpression]] = {}
    statements = []
    for stmt in init.body.body if init else ():
        statements += _optional_parameters(stmt) or [stmt]
    for stmt in statements:
        for small in stmt.body if isinstance(stmt, cst.SimpleStatementLine) else ():
            if isinstance(small, cst.Assign) and len(small.targets) == 1:
                attr = self_attr(small.targets[0].target)
                shape = parameter_shape(small.value)
                if attr and shape is not None and len(shape) == 3:
                    found[attr] = shape
    return found


class InitEnv:
    """A straight-line ``__init__`` evaluated symbolically: every ``self.<attr>`` and local
    bound to its value over the ``__init__`` parameters."""

    def __init__(self, init: cst.FunctionDef, ctx: ConversionContext) -> None:
        self.values: dict[str, cst.BaseExpression] = {}  # "self.x" / "x" -> expression
        self.params: dict[str, cst.BaseExpression] = {}  # attr -> nn.Parameter(...) value
        self.init = init
        for stmt in init.body.body:
            optional = _optional_parameters(stmt)
            if optional is not None:  # the experts are built where the model has any
                for line in optional:
                    for small in line.body:
                        self._statement(small, line)
                continue
            if not isinstance(stmt, cst.SimpleStatementLine):
                raise LayoutError(
                    "the experts' __init__ is not straight-line code",
                    stmt,
                    hint="FusedMoE takes its sizes from an __init__ of plain assignments",
                )
            for small in stmt.body:
                self._statement(small, stmt)

    def _statement(self, small: cst.BaseSmallStatement, stmt) -> None:
        if m.matches(small, m.Expr(m.Call(func=m.Attribute(m.Call(func=m.Name("super")))))):
            return
        if m.matches(small, m.Expr(m.SimpleString() | m.ConcatenatedString())):
            return  # a docstring
        if isinstance(small, cst.AnnAssign) and small.value is not None:
            small = cst.Assign([cst.AssignTarget(small.target)], small.value)
        if not (isinstance(small, cst.Assign) and len(small.targets) == 1):
            raise LayoutError("unsupported statement in the experts' __init__", stmt)
        target, value = small.targets[0].target, small.value
        attr = self_attr(target)
        if attr is not None:
            if m.matches(value, PARAMETER):
                self.params[attr] = value
            self.values[f"self.{attr}"] = self.resolve(value)
            return
        if isinstance(target, cst.Name):
            self.values[target.value] = self.resolve(value)
            return
        raise LayoutError("unsupported assignment in the experts' __init__", stmt)

    def resolve(self, node: cst.BaseExpression) -> cst.BaseExpression:
        """`node` with the attributes and locals bound so far replaced by their values."""
        return node.visit(_Substitute(self.values))


class _Substitute(cst.CSTTransformer):
    """Replaces names / ``self.<attr>`` by expressions (parenthesized unless atomic)."""

    def __init__(self, values: dict[str, cst.BaseExpression]) -> None:
        self.values = values

    def _value(self, key: str, original):
        value = self.values.get(key)
        if value is None:
            return original
        if isinstance(value, cst.Name | cst.Attribute | cst.Integer | cst.Float | cst.Call):
            return value.with_changes(lpar=original.lpar, rpar=original.rpar)
        if isinstance(value, cst.SimpleString | cst.Subscript):
            return value
        return value.with_changes(lpar=[cst.LeftParen()], rpar=[cst.RightParen()])

    def leave_Attribute(self, original, updated):
        name = dotted(original)
        if name and name.startswith("self.") and name.count(".") == 1:
            return self._value(name, updated)
        return updated.with_changes(attr=original.attr)  # `x.name`: not a variable

    def visit_Attribute(self, node) -> bool:
        return not (dotted(node) or "").startswith("self.")

    def leave_Name(self, original, updated):
        return self._value(original.value, updated)

    def leave_Arg(self, original, updated):  # keyword names are not variables
        return updated.with_changes(keyword=original.keyword)


def _times_two(node: cst.BaseExpression) -> cst.BaseExpression | None:
    """``2 * x`` / ``x * 2`` -> ``x``."""
    node = node.with_changes(lpar=[], rpar=[]) if hasattr(node, "lpar") else node
    if isinstance(node, cst.BinaryOperation) and isinstance(node.operator, cst.Multiply):
        if one_line(node.left) == "2":
            return node.right
        if one_line(node.right) == "2":
            return node.left
    return None


def read_layout(
    cls: cst.ClassDef, flags: dict[str, bool], decorated: bool, ctx: ConversionContext
) -> Layout:
    """`cls`'s FusedMoE arguments; LayoutError (with the node) where it does not fit."""
    name = cls.name.value
    methods = methods_of(cls)
    init = methods.get("__init__")
    if init is None:
        raise LayoutError(f"{name} has no __init__", cls)
    env = InitEnv(init, ctx)
    if flags.get("has_post_expert_norm"):
        raise LayoutError(
            f"{name} normalizes each expert's output (has_post_expert_norm)",
            cls,
            hint="FusedMoE sums the experts' outputs directly; a post-expert norm is not supported",
        )
    shapes = {attr: parameter_shape(env.values[f"self.{attr}"]) for attr in env.params}
    has_gate = "gate_up_proj" in shapes
    if not decorated:
        flags = dict(DEFAULT_FLAGS, has_gate=has_gate, has_bias="down_proj_bias" in shapes)
    if flags["has_gate"] != has_gate:
        raise LayoutError(
            f"{name}: has_gate={flags['has_gate']} but the class holds "
            f"{'gate_up_proj' if has_gate else 'no gate_up_proj'}",
            cls,
        )
    in_name = IN_PROJ[has_gate]
    expected = {in_name, "down_proj"}
    if flags["has_bias"]:
        expected |= {f"{in_name}_bias", "down_proj_bias"}
    if set(shapes) != expected:
        raise LayoutError(
            f"{name} holds parameters {sorted(shapes)}; FusedMoE holds {sorted(expected)}",
            cls,
            hint="an experts layout FusedMoE does not know: map its parameters in converter/passes/moe/",
        )
    act_fn = _activations(env)
    loop = TopkLoop(None, None)
    identities = identity_children(init)  # beside a written-out loop: weightless, allowed
    if not decorated:
        loop = _undecorated_loop(cls, env, in_name, act_fn, identities)
    for attr, child in ctx.classes[name].children.items() if name in ctx.classes else ():
        if attr not in act_fn and (decorated or attr not in identities):
            raise LayoutError(
                f"{name}.{attr} ({child.ctor}) has no place in FusedMoE",
                cls,
                hint="FusedMoE holds the expert weights and an activation only",
            )
    w_in, w_down = shapes[in_name], shapes["down_proj"]
    if w_in is None or w_down is None or len(w_in) != 3 or len(w_down) != 3:
        raise LayoutError(f"{name}: expert weights must be 3-D [experts, out, in]", cls)
    text = {k: [one_line(d) for d in v] for k, v in shapes.items() if v is not None}
    e_in, a, b = w_in
    _, c, d = w_down
    identity_experts = None
    if loop.identity_from is not None:
        identity_experts = _identity_count(name, cls, env, loop, e_in, w_down[0])
    elif text[in_name][0] != text["down_proj"][0]:
        raise LayoutError(f"{name}: {in_name} and down_proj hold different expert counts", cls)
    transposed = flags["is_transposed"]
    if has_gate:
        doubled_first, doubled_last = _times_two(a), _times_two(b)
        by_shape = doubled_last is not None and doubled_first is None
        if doubled_first is None and doubled_last is None:
            raise LayoutError(f"{name}: gate_up_proj has no 2 * intermediate dimension", cls)
        if decorated and by_shape != transposed:
            raise LayoutError(
                f"{name}: is_transposed={transposed} but gate_up_proj's shape says {by_shape}",
                cls,
            )
        transposed = by_shape
        intermediate = doubled_last if transposed else doubled_first
        hidden = a if transposed else b
    else:
        intermediate, hidden = (b, a) if transposed else (a, b)
    down_hidden, down_inter = (d, c) if transposed else (c, d)
    if one_line(down_hidden) != one_line(hidden) or one_line(down_inter) != one_line(intermediate):
        raise LayoutError(
            f"{name}: down_proj {[one_line(x) for x in w_down]} does not match "
            f"{in_name} {[one_line(x) for x in w_in]} (transposed={transposed})",
            cls,
        )
    flags = dict(flags, is_transposed=transposed)
    apply_gate = methods.get("_apply_gate")
    if apply_gate is not None:
        if not has_gate:
            raise LayoutError(f"{name} has _apply_gate but no gate", apply_gate)
        try:
            gate = read_gate(apply_gate, env.resolve, act_fn.get)
        except GateError as e:
            raise LayoutError(f"{name}._apply_gate: {e}", e.node) from None
        if gate.is_concatenated is not None:
            if decorated and gate.is_concatenated != flags["is_concatenated"]:
                raise LayoutError(
                    f"{name}: is_concatenated={flags['is_concatenated']} but _apply_gate "
                    f"splits gate_up {'in halves' if gate.is_concatenated else 'interleaved'}",
                    apply_gate,
                )
            flags["is_concatenated"] = gate.is_concatenated
        activation = gate.activation
    else:
        gate = Gate(activation=None, is_concatenated=None)
        if len(act_fn) != 1:
            raise LayoutError(
                f"{name}: no activation found (self.act_fn = ACT2FN[...] or an own _apply_gate)",
                cls,
            )
        activation = next(iter(act_fn.values()))
    if activation is None:
        raise LayoutError(f"{name}: the activation is not one FusedMoE implements", cls)
    return Layout(
        num_experts=w_down[0],
        hidden_size=hidden,
        intermediate_size=intermediate,
        activation=activation,
        flags=flags,
        gate=gate,
        init_params=list(init.params.params),
        identity_experts=identity_experts,
    )


def _undecorated_loop(
    cls, env: InitEnv, in_name: str, act_fn: dict, identities: set[str]
) -> TopkLoop:
    """An undecorated experts forward, accepted where it is transformers' top-k loop."""
    name = cls.name.value
    forward = methods_of(cls).get("forward")
    modules = {k[len("self.") :] for k, v in env.values.items() if isinstance(v, cst.Call)}
    sizes = {k[len("self.") :] for k in env.values if k.startswith("self.")}
    sizes -= modules | set(env.params) | set(act_fn) | identities
    try:
        if forward is None:
            raise LoopError(f"{name} has no forward", cls)
        return read_topk_loop(forward, in_name, set(act_fn), identities, sizes)
    except LoopError as e:
        raise LayoutError(
            f"{name} holds 3-D expert parameters without transformers' experts decorator "
            f"(@use_experts_implementation), and {e}",
            e.node,
            hint="FusedMoE stands for transformers' top-k loop over the experts only; "
            "another experts computation needs its own rewrite",
        ) from None


def _identity_count(name, cls, env: InitEnv, loop: TopkLoop, e_in, e_down):
    """How many zero-computation experts follow the E real ones: the in-projection holds
    ``E + <count>`` experts (their rows unused), E being the loop's bound and down_proj's."""
    bound = one_line(env.resolve(cst.parse_expression(loop.identity_from)))
    e_in = e_in.with_changes(lpar=[], rpar=[])
    if (
        one_line(e_down) == bound
        and isinstance(e_in, cst.BinaryOperation)
        and isinstance(e_in.operator, cst.Add)
        and one_line(e_in.left) == bound
    ):
        return e_in.right
    raise LayoutError(
        f"{name}: experts from {loop.identity_from} on return their input, but the expert "
        f"counts ({one_line(e_in)} in the in-projection, {one_line(e_down)} in down_proj) "
        f"do not say how many there are (E + count)",
        cls,
    )


def _activations(env: InitEnv) -> dict[str, cst.BaseExpression]:
    """``self.<attr>`` callables that are activations -> transformers' activation name
    (an expression: ``config.hidden_act``, ``"silu"``)."""
    found = {}
    for key, value in env.values.items():
        if not key.startswith("self."):
            continue
        attr = key[len("self.") :]
        if isinstance(value, cst.Subscript) and dotted(value.value) == "ACT2FN":
            found[attr] = value.slice[0].slice.value
        elif (dotted(value) or "").rsplit(".", 1)[-1] in ("silu", "gelu", "relu", "sigmoid"):
            found[attr] = cst.SimpleString(f'"{dotted(value).rsplit(".", 1)[-1]}"')
        elif isinstance(value, cst.Call) and not value.args:
            short = (dotted(value.func) or "").rsplit(".", 1)[-1]
            if short in ACTIVATION_MODULES:
                found[attr] = cst.SimpleString(f'"{ACTIVATION_MODULES[short]}"')
    return found
