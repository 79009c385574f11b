"""An experts forward without transformers' decorator, recognised as its top-k loop.

``@use_experts_implementation`` vouches that an experts forward is transformers' standard
top-k loop. A class without it (LongCat-Flash's) may still be exactly that loop, written
out: for each expert hit, ``linear(x, self.gate_up_proj[e]).chunk(2, dim=-1)``,
``act(gate) * up``, ``linear(h, self.down_proj[e])``, times the pair's
``top_k_weights[...]``, ``index_add_`` into a zeroed output. `read_topk_loop` accepts such
a forward and nothing else: it reads only the expert parameters, the activation, an
identity module and integer sizes of ``self``, calls only the loop's own operations
(`LOOP_CALLS`), computes no arithmetic but the gated product and the routing weight, and
computes each of the steps above. Anything else (a per-expert scale, a helper function,
another module) stops the conversion.

Zero-computation experts (LongCat-Flash's zero experts): the loop sends experts from
``self.<E>`` on (``if expert_idx >= self.<E> ...``) to ``self.<identity>(x)``, an
``nn.Identity``, or to ``x`` itself. `FusedMoE` stands for them with
``identity_experts=<count>``: the count the in-projection's expert dimension adds to the
down projection's (``self.<E> + <count>``), since the source allocates their rows unused.
"""

from __future__ import annotations

from dataclasses import dataclass

import libcst as cst
import libcst.matchers as m

from converter.cst_helpers import code, dotted, nodes_of, one_line, self_attr

# What transformers' loop calls (method or function names, whatever the module prefix).
LOOP_CALLS = frozenset(
    {
        "zeros_like", "one_hot", "permute", "greater", "sum", "nonzero", "item", "int", "where",
        "squeeze", "numel", "linear", "chunk", "index_add_", "to", "view", "reshape", "no_grad",
        "len", "range", "unsqueeze",
    }
)  # fmt: skip
IDENTITY_CTORS = {"nn.Identity", "torch.nn.Identity", "Identity"}


class LoopError(Exception):
    def __init__(self, message: str, node: cst.CSTNode) -> None:
        super().__init__(message)
        self.node = node


@dataclass
class TopkLoop:
    identity_from: str | None  # "self.<E>": experts from there on return their input
    identity_attr: str | None  # the nn.Identity child the loop calls for them, if any


def identity_children(init: cst.FunctionDef) -> set[str]:
    """``self.<attr> = nn.Identity()`` attributes of an ``__init__``."""
    found = set()
    for assign in nodes_of(init, cst.Assign):
        attr = self_attr(assign.targets[0].target) if len(assign.targets) == 1 else None
        if attr and isinstance(assign.value, cst.Call):
            if dotted(assign.value.func) in IDENTITY_CTORS and not assign.value.args:
                found.add(attr)
    return found


def read_topk_loop(
    forward: cst.FunctionDef,
    in_name: str,
    activation_attrs: set[str],
    identity_attrs: set[str],
    int_attrs: set[str],
) -> TopkLoop:
    """The loop's zero-computation branch, if any; LoopError where `forward` is not
    transformers' top-k loop (see the module docstring)."""
    params = [p.name.value for p in forward.params.params]
    if len(params) != 4:
        raise LoopError(
            "the experts forward does not take (hidden, top_k_index, top_k_weights)", forward
        )
    weights = params[3]
    loops = nodes_of(forward.body, cst.For)
    if len(loops) != 1:
        raise LoopError(
            f"the experts forward has {len(loops)} for loops, not one over experts", forward
        )
    allowed = {in_name, "down_proj", *activation_attrs, *identity_attrs, *int_attrs}
    for node in nodes_of(forward.body, cst.Attribute):
        attr = self_attr(node)
        if attr is not None and attr not in allowed:
            raise LoopError(f"the experts forward reads self.{attr}", _statement(forward, node))
    for call in nodes_of(forward.body, cst.Call):
        attr = self_attr(call.func)
        if attr in activation_attrs or attr in identity_attrs:
            continue
        name = dotted(call.func) or ""
        short = call.func.attr.value if isinstance(call.func, cst.Attribute) else name
        if short not in LOOP_CALLS:
            raise LoopError(
                f"the experts forward calls {one_line(call.func)}", _statement(forward, call)
            )
    body = loops[0].body
    halves = _in_projection(body, in_name)
    gated = _gated_activation(body, activation_attrs, halves)
    arithmetic = [
        *(op for op in nodes_of(forward.body, cst.BinaryOperation)),
        *nodes_of(forward.body, cst.AugAssign),
        *(
            op
            for op in nodes_of(forward.body, cst.UnaryOperation)
            if not isinstance(op.expression, cst.Integer) and not isinstance(op.operator, cst.Not)
        ),
    ]
    for op in arithmetic:
        if op is not gated and not _is_weighting(op, weights):
            raise LoopError(
                f"the experts forward computes `{' '.join(code(op).split())}`",
                _statement(forward, op),
            )
    steps = {
        "gate, up = linear(x, self.<in>[e]).chunk(2, dim=-1)": halves is not None,
        "act(gate) * up": gated is not None,
        "linear(h, self.down_proj[e])": _projection(body, "down_proj"),
        f"* {weights}[...]": any(
            _is_weighting(op, weights) for op in nodes_of(body, cst.BinaryOperation)
        ),
        "index_add_(0, ...)": bool(_calls_named(body, "index_add_")),
    }
    missing = [step for step, found in steps.items() if not found]
    if missing:
        raise LoopError(f"the experts forward lacks the top-k loop's {', '.join(missing)}", forward)
    return _identity_branch(body, identity_attrs, int_attrs)


def _statement(body: cst.CSTNode, node: cst.CSTNode) -> cst.CSTNode:
    """The simple statement of `body` holding `node` (the error's line), else `node`."""
    for stmt in nodes_of(body, cst.SimpleStatementLine):
        if any(n is node for n in nodes_of(stmt, type(node))):
            return stmt
    return node


def _calls_named(node: cst.CSTNode, name: str) -> list[cst.Call]:
    return [
        c
        for c in nodes_of(node, cst.Call)
        if (c.func.attr.value if isinstance(c.func, cst.Attribute) else dotted(c.func)) == name
    ]


def _expert_weight(expr: cst.BaseExpression, attr: str) -> bool:
    """``self.<attr>[<expert>]``."""
    return isinstance(expr, cst.Subscript) and self_attr(expr.value) == attr


def _projection(body: cst.CSTNode, attr: str) -> list[cst.Call]:
    return [
        c
        for c in _calls_named(body, "linear")
        if len(c.args) >= 2 and _expert_weight(c.args[1].value, attr)
    ]


def _in_projection(body: cst.CSTNode, in_name: str) -> tuple[str, str] | None:
    """``gate, up = linear(x, self.<in>[e]).chunk(2, dim=-1)`` (gate and up concatenated,
    gate first): the names of the two halves."""
    for assign in nodes_of(body, cst.Assign):
        call, target = assign.value, assign.targets[0].target
        if not (isinstance(call, cst.Call) and isinstance(call.func, cst.Attribute)):
            continue
        inner = call.func.value
        if call.func.attr.value != "chunk" or inner not in _projection(body, in_name):
            continue
        text = [(a.keyword.value if a.keyword else "", one_line(a.value)) for a in call.args]
        names = m.Tuple(elements=[m.Element(m.Name()), m.Element(m.Name())])
        if text in ([("", "2"), ("dim", "-1")], [("", "2"), ("", "-1")]) and m.matches(
            target, names
        ):
            return target.elements[0].value.value, target.elements[1].value.value
    return None


def _gated_activation(
    body: cst.CSTNode, activation_attrs: set[str], halves: tuple[str, str] | None
) -> cst.BinaryOperation | None:
    """``self.<act>(gate) * up`` over the in-projection's halves, in that order."""
    if halves is None:
        return None
    act = m.Call(func=m.Attribute(value=m.Name("self")), args=[m.Arg(m.Name(halves[0]))])
    for op in nodes_of(body, cst.BinaryOperation):
        if isinstance(op.operator, cst.Multiply) and m.matches(op.left, act):
            if self_attr(op.left.func) in activation_attrs and m.matches(
                op.right, m.Name(halves[1])
            ):
                return op
    return None


def _is_weighting(op: cst.BinaryOperation, weights: str) -> bool:
    """``<y> * <weights>[...]``: the pair's routing weight."""
    return (
        isinstance(op.operator, cst.Multiply)
        and isinstance(op.right, cst.Subscript)
        and m.matches(op.right.value, m.Name(weights))
    )


def _identity_branch(body: cst.CSTNode, identity_attrs: set[str], int_attrs: set[str]) -> TopkLoop:
    """``if <e> >= self.<E> ...: y = self.<identity>(x)`` (or ``y = x``) in the loop."""
    for branch in nodes_of(body, cst.If):
        bound = [
            c.comparator
            for comp in nodes_of(branch.test, cst.Comparison)
            for c in comp.comparisons
            if isinstance(c.operator, cst.GreaterThanEqual) and self_attr(c.comparator) in int_attrs
        ]
        if not bound:
            continue
        assigns = [s for s in nodes_of(branch.body, cst.Assign)]
        if len(assigns) != 1:
            raise LoopError(
                "the loop's branch for experts past self.<E> is not one assignment", branch
            )
        value = assigns[0].value
        identity = self_attr(value.func) if isinstance(value, cst.Call) else None
        if identity in identity_attrs and len(value.args) == 1:
            return TopkLoop(one_line(bound[0]), identity)
        if isinstance(value, cst.Name):
            return TopkLoop(one_line(bound[0]), None)
        raise LoopError(
            f"experts past {one_line(bound[0])} compute `{one_line(value)}`, not their input",
            branch,
        )
    return TopkLoop(None, None)
