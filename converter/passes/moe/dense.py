"""Experts run densely over every token (Llama 4), read as top-k routing onto `FusedMoE`.

Some MoE blocks do not route: every expert runs on every token, its input scaled by the
token's score for it, and the outputs are summed::

    scores, logits = self.router(x)                        # [T, E]: 0 off the top-k
    routed_in = x.repeat(scores.shape[1], 1)              # [E*T, H], expert-major
    routed_in = routed_in * scores.transpose(0, 1).reshape(-1, 1)
    routed_out = self.experts(routed_in)                  # [E*T, H]
    ... routed_out.reshape(scores.shape[1], -1, H).sum(dim=0) ...

with an experts forward of batched matmuls over the expert-major blocks::

    x = x.view(E, -1, H); gate_up = torch.bmm(x, self.gate_up_proj)
    gate, up = gate_up.chunk(2, dim=-1); y = torch.bmm(up * self.act_fn(gate), self.down_proj)
    return y.view(-1, H)

When the scores are 0 off each token's top-k (the router scatters its top-k values into
a ``-inf`` tensor, then sigmoid or softmax) and an expert maps a zero input to zero, the
experts off the top-k add exactly nothing, and the block is top-k routing with the weight
applied to the expert's input: ``FusedMoE(..., apply_router_weight_on_input=True)`` called
as ``experts(x, top_k_index, top_k_weights)``, the pair read back from the scores with
``torch.topk(scores, k)`` (k: the router's own). The summed reshape becomes the call's
result. The router and the shared experts stay the source's code.

An expert maps zero to zero when it has no biases and either gates (``act(0 @ Wg) *
(0 @ Wu)`` is 0 for any activation) or applies an activation with f(0) = 0 (checked on
the literal name; an ungated expert with a configured activation stops). Any step of the
structure that differs stops the conversion with one line.
"""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from converter.cst_helpers import (
    dotted,
    methods_of,
    names_read,
    nodes_of,
    one_line,
    self_attr,
    target_names,
)
from converter.passes.moe.experts import (
    DEFAULT_FLAGS,
    IN_PROJ,
    InitEnv,
    Layout,
    LayoutError,
    _activations,
    read_layout,
)

# transformers activation names with f(0) = 0 (an ungated expert of zero input is zero)
ZERO_AT_ZERO = {"silu", "swish", "gelu", "gelu_new", "gelu_pytorch_tanh", "relu", "relu2"}
MATMULS = {"torch.bmm", "torch.matmul", "bmm", "matmul"}


def _matmul(node: cst.BaseExpression) -> tuple[cst.BaseExpression, cst.BaseExpression] | None:
    if isinstance(node, cst.Call) and dotted(node.func) in MATMULS and len(node.args) == 2:
        return node.args[0].value, node.args[1].value
    if isinstance(node, cst.BinaryOperation) and isinstance(node.operator, cst.MatrixMultiply):
        return node.left, node.right
    return None


def _weight(node: cst.BaseExpression) -> tuple[str, bool] | None:
    """``self.W`` -> (W, False); ``self.W.transpose(1, 2)`` / ``.mT`` -> (W, True)."""
    if self_attr(node):
        return self_attr(node), False
    if m.matches(node, m.Attribute(attr=m.Name("mT"))) and self_attr(node.value):
        return self_attr(node.value), True
    if m.matches(node, m.Call(m.Attribute(attr=m.Name("transpose")))):
        dims = sorted(one_line(a.value) for a in node.args)
        if dims in (["1", "2"], ["-1", "-2"]) and self_attr(node.func.value):
            return self_attr(node.func.value), True
    return None


def _reshape(node: cst.BaseExpression) -> tuple[cst.BaseExpression, list[str]] | None:
    """``x.view(a, b, ...)`` / ``x.reshape(...)`` -> (x, [a, b, ...] as text)."""
    if m.matches(node, m.Call(m.Attribute(attr=m.Name("view") | m.Name("reshape")))):
        args = node.args
        if len(args) == 1 and isinstance(args[0].value, cst.Tuple):
            dims = [one_line(e.value) for e in args[0].value.elements]
        else:
            dims = [one_line(a.value) for a in args]
        return node.func.value, dims
    return None


class _Forward:
    """The dense experts forward, statement by statement: each name's role."""

    def __init__(self, cls: cst.ClassDef) -> None:
        self.name = cls.name.value
        forward = methods_of(cls).get("forward")
        if forward is None or len(forward.params.params) != 2:
            raise LayoutError(f"{self.name}.forward must take (self, hidden_states)", cls)
        self.forward = forward
        self.roles = {forward.params.params[1].name.value: "tokens"}
        self.gate_stmts: list[cst.SimpleStatementLine] = []
        self.gate_up: str | None = None
        self.gated_value: cst.BaseExpression | None = None
        self.transposed: dict[str, bool] = {}
        # (dimension text, what it must be: "experts" | "hidden", statement)
        self.dims: list[tuple[str, str, cst.CSTNode]] = []

    def fail(self, what: str, node: cst.CSTNode) -> LayoutError:
        return LayoutError(
            f"{self.name}.forward: {what}",
            node,
            hint="a dense experts forward FusedMoE stands for views its input as "
            "[experts, tokens, hidden] blocks, multiplies them by the 3-D expert weights "
            "(torch.bmm), gates, multiplies by the down weights and views back",
        )

    def role(self, node: cst.BaseExpression) -> str | None:
        return self.roles.get(node.value) if isinstance(node, cst.Name) else None

    def value(self, node: cst.BaseExpression, stmt) -> str:
        """The role of an expression: blocks, gate_up, out_blocks, out."""
        reshaped = _reshape(node)
        if reshaped is not None:
            base, dims = reshaped
            kind = self.value(base, stmt) if not isinstance(base, cst.Name) else self.role(base)
            if kind == "tokens" and len(dims) == 3 and dims[1] == "-1":
                self.dims += [(dims[0], "experts", stmt), (dims[2], "hidden", stmt)]
                return "blocks"
            if kind == "out_blocks" and len(dims) == 2 and dims[0] == "-1":
                self.dims.append((dims[1], "hidden", stmt))
                return "out"
            raise self.fail(f"unexpected reshape `{one_line(node)}`", stmt)
        product = _matmul(node)
        if product is not None:
            left, right = product
            weight = _weight(right)
            if weight is None:
                raise self.fail(f"`{one_line(node)}` does not multiply by an expert weight", stmt)
            attr, transposed = weight
            if attr in IN_PROJ.values() and self.role(left) == "blocks":
                self.transposed[attr] = transposed
                return "gate_up"
            if attr == "down_proj" and self.gate_up is not None:
                self.transposed[attr] = transposed
                self.gated_value = left
                return "out_blocks"
            raise self.fail(f"`{one_line(node)}` multiplies the wrong operand", stmt)
        if isinstance(node, cst.Name) and node.value in self.roles:
            return self.roles[node.value]
        raise self.fail(f"`{one_line(node)}` is not part of the dense experts computation", stmt)

    def read(self) -> None:
        for stmt in self.forward.body.body:
            if m.matches(stmt, m.SimpleStatementLine([m.Expr(m.SimpleString())])):
                continue  # the docstring
            if not isinstance(stmt, cst.SimpleStatementLine) or len(stmt.body) != 1:
                raise self.fail("not straight-line code", stmt)
            small = stmt.body[0]
            if self.gate_up is not None and self.gated_value is None:
                if not any(_matmul(n) for n in _calls_and_ops(small)):
                    self.gate_stmts.append(stmt)  # the gate, read by read_gate
                    continue
            if isinstance(small, cst.Return):
                if small.value is None or self.value(small.value, stmt) != "out":
                    raise self.fail("must return the expert outputs viewed as [E*T, H]", stmt)
                return
            if not m.matches(small, m.Assign([m.AssignTarget(m.Name())])):
                raise self.fail("unsupported statement", stmt)
            role = self.value(small.value, stmt)
            target = small.targets[0].target.value
            self.roles[target] = role
            if role == "gate_up":
                self.gate_up = target
        raise self.fail("returns nothing", self.forward)

    def apply_gate(self) -> cst.FunctionDef:
        """The statements between the two matmuls as ``_apply_gate(self, gate_up)``."""
        body = [
            *self.gate_stmts,
            cst.SimpleStatementLine([cst.Return(self.gated_value)]),
        ]
        return cst.FunctionDef(
            cst.Name("_apply_gate"),
            cst.Parameters([cst.Param(cst.Name("self")), cst.Param(cst.Name(self.gate_up))]),
            cst.IndentedBlock(body),
        )


def _calls_and_ops(node: cst.CSTNode) -> list[cst.CSTNode]:
    return nodes_of(node, cst.Call, cst.BinaryOperation)


def dense_forward(cls: cst.ClassDef) -> bool:
    """Whether `cls`'s forward multiplies by its 3-D weights with batched matmuls."""
    forward = methods_of(cls).get("forward")
    if forward is None:
        return False
    products = [_matmul(n) for n in _calls_and_ops(forward)]
    weights = [_weight(p[1]) for p in products if p is not None]
    return any(w is not None and w[0] == "down_proj" for w in weights)


def read_dense_layout(cls: cst.ClassDef, ctx) -> Layout:
    """FusedMoE's arguments for a dense experts class (see the module docstring)."""
    name = cls.name.value
    env = InitEnv(methods_of(cls)["__init__"], ctx)
    if any(attr.endswith("_bias") for attr in env.params):
        raise LayoutError(
            f"{name} has expert biases: an expert of zero input is not zero, so the experts "
            "off the top-k are not the no-ops a dense-to-routed rewrite needs",
            cls,
        )
    forward = _Forward(cls)
    forward.read()
    # bmm(x, W) reads W as [E, in, out] (FusedMoE's is_transposed), bmm(x, W.mT) as [E, out, in]
    if len(set(forward.transposed.values())) != 1:
        raise LayoutError(f"{name}.forward transposes one expert weight but not the other", cls)
    has_gate = "gate_up_proj" in forward.transposed
    flags = dict(
        DEFAULT_FLAGS,
        has_gate=has_gate,
        is_transposed=not next(iter(forward.transposed.values())),
    )
    if has_gate:
        cls = cls.with_changes(
            body=cls.body.with_changes(body=[*cls.body.body, forward.apply_gate()])
        )
    layout = read_layout(cls, flags, True, ctx)
    in_name = IN_PROJ[has_gate]
    for dim, kind, stmt in forward.dims:
        value = one_line(env.resolve(cst.parse_expression(dim)))
        if kind == "experts" and dim in (f"self.{in_name}.shape[0]", "self.down_proj.shape[0]"):
            continue
        if value != one_line(layout.num_experts if kind == "experts" else layout.hidden_size):
            raise forward.fail(f"`{dim}` is not the number of experts / hidden size", stmt)
    if not has_gate:
        act = forward.gated_value
        if not (
            isinstance(act, cst.Call)
            and len(act.args) == 1
            and self_attr(act.func) in _activations(env)
            and m.matches(act.args[0].value, m.Name(forward.gate_up or ""))
        ):
            raise forward.fail("the down projection's input is not self.<act>(up)", forward.forward)
        activation = layout.activation
        if not isinstance(activation, cst.SimpleString) or activation.evaluated_value not in (
            ZERO_AT_ZERO
        ):
            raise LayoutError(
                f"{name}: an ungated expert maps zero to act(0), and {one_line(activation)} "
                "is not known to be 0 at 0",
                cls,
                hint="the dense-to-routed rewrite needs the experts off the top-k to add nothing",
            )
    layout.weight_on_input = True
    return layout


# --- the call site: the owner's dense block -> experts(x, top_k_index, top_k_weights) ---

CASTS = {"float", "to", "type_as", "half", "bfloat16", "contiguous"}
SCORE_FUNCTIONS = {"sigmoid", "softmax"}  # both 0 at -inf: the scores vanish off the top-k


def _transposed_column(node: cst.BaseExpression) -> cst.BaseExpression | None:
    """``S.transpose(0, 1).reshape(-1, 1)`` (``S.T`` / ``S.t()``, ``.view``) -> S."""
    reshaped = _reshape(node)
    if reshaped is None or reshaped[1] != ["-1", "1"]:
        return None
    inner = reshaped[0]
    if m.matches(inner, m.Attribute(attr=m.Name("T"))):
        return inner.value
    if m.matches(inner, m.Call(m.Attribute(attr=m.Name("t")), args=[])):
        return inner.func.value
    if m.matches(inner, m.Call(m.Attribute(attr=m.Name("transpose")))):
        if sorted(one_line(a.value) for a in inner.args) == ["0", "1"]:
            return inner.func.value
    return None


class _Block:
    """Symbolic values of the owner forward's names before the experts call."""

    def __init__(self) -> None:
        self.env: dict[str, tuple] = {}

    def value(self, node: cst.BaseExpression) -> tuple:
        if isinstance(node, cst.Name):
            return self.env.get(node.value, ("name", node.value))
        if m.matches(node, m.Call(m.Attribute(attr=m.Name("repeat")))) and len(node.args) == 2:
            if one_line(node.args[1].value) == "1" and isinstance(node.func.value, cst.Name):
                return ("repeated", node.func.value.value)
        if isinstance(node, cst.BinaryOperation) and isinstance(node.operator, cst.Multiply):
            for a, b in ((node.left, node.right), (node.right, node.left)):
                rep, scores = self.value(a), _transposed_column(b)
                if rep[0] == "repeated" and isinstance(scores, cst.Name):
                    return ("scaled", rep[1], scores.value)
        return ("other",)


def _router_scores(ctx, owner: str, classes: dict, scores: str, before) -> tuple:
    """(router attribute, k expression in the router's scope) of the dense `scores`:
    bound in `method` from ``self.<router>(...)``, whose forward returns a top-k scatter
    into -inf passed through sigmoid / softmax. Raises a message otherwise."""
    source = None
    for small in before:
        if isinstance(small, cst.Assign) and scores in target_names(small.targets[0].target):
            source = small
    if source is None or len(source.targets) != 1 or not isinstance(source.value, cst.Call):
        raise ValueError(f"the scores `{scores}` are not the result of a router module's call")
    target = source.targets[0].target
    position = None
    if isinstance(target, cst.Tuple):
        names = [e.value.value if isinstance(e.value, cst.Name) else None for e in target.elements]
        position = names.index(scores)
    attr = self_attr(source.value.func)
    child = ctx.classes[owner].children.get(attr) if attr else None
    router = classes.get(child.cls) if child and child.cls else None
    if router is None:
        raise ValueError(f"`{one_line(source.value)}` is not a call of a router module of the file")
    forward = methods_of(router).get("forward")
    if forward is None:
        raise ValueError(f"the router {child.cls} has no forward")
    env: dict[str, tuple] = {}
    result = None
    for stmt in forward.body.body:
        if not isinstance(stmt, cst.SimpleStatementLine):
            raise ValueError(f"{child.cls}.forward is not straight-line code")
        for small in stmt.body:
            if isinstance(small, cst.Return) and small.value is not None:
                value = small.value
                if position is not None:
                    if not isinstance(value, cst.Tuple) or len(value.elements) <= position:
                        raise ValueError(f"{child.cls}.forward does not return a tuple")
                    value = value.elements[position].value
                result = _score_value(value, env)
            elif isinstance(small, cst.Assign) and len(small.targets) == 1:
                t = small.targets[0].target
                v = _score_value(small.value, env)
                if isinstance(t, cst.Name):
                    env[t.value] = v
                elif isinstance(t, cst.Tuple) and v[0] == "topk" and len(t.elements) == 2:
                    for el, kind in zip(t.elements, ("values", "index")):
                        if isinstance(el.value, cst.Name):
                            env[el.value.value] = (kind, v[1])
    if result is None or result[0] != "scores":
        raise ValueError(
            f"{child.cls}.forward's scores are not its top-k scattered into -inf and passed "
            "through sigmoid / softmax (0 off the top-k)"
        )
    return attr, result[1]


def _score_value(node: cst.BaseExpression, env: dict[str, tuple]) -> tuple:
    if isinstance(node, cst.Name):
        return env.get(node.value, ("other",))
    if not isinstance(node, cst.Call):
        return ("other",)
    name = dotted(node.func) or ""
    short = name.rsplit(".", 1)[-1]
    args = [a.value for a in node.args if a.keyword is None]
    if isinstance(node.func, cst.Attribute) and not name.startswith(("torch.", "F.", "nn.")):
        receiver = _score_value(node.func.value, env)
        method = node.func.attr.value
        if method in CASTS:
            return receiver
        last_dim = len(args) == 3 and one_line(args[0]) in ("1", "-1")
        if method in ("scatter", "scatter_") and receiver[0] == "neg_inf" and last_dim:
            index, values = _score_value(args[1], env), _score_value(args[2], env)
            if index[0] == "index" and values[0] == "values" and index[1] is values[1]:
                return ("sparse", index[1])
        if method in SCORE_FUNCTIONS and receiver[0] == "sparse":
            return ("scores", receiver[1])
        return ("other",)
    if short == "topk" and len(args) == 2:
        dim = [one_line(a.value) for a in node.args if a.keyword and a.keyword.value == "dim"]
        if dim in ([], ["1"], ["-1"]):  # over the experts of each token
            return ("topk", args[1])
    if short == "full_like" and len(args) == 2 and "-" in one_line(args[1]):
        if "inf" in one_line(args[1]):
            return ("neg_inf",)
    if short in SCORE_FUNCTIONS and args:
        inner = _score_value(args[0], env)
        if inner[0] == "sparse":
            return ("scores", inner[1])
    return ("other",)


def _none_or_dim(keyword: cst.Name | None) -> bool:
    return keyword is None or keyword.value == "dim"


class _SumOfBlocks(cst.CSTTransformer):
    """``R.reshape(N, -1, H).sum(dim=0)`` -> ``R`` (FusedMoE sums over the top-k)."""

    def __init__(self, result: str) -> None:
        self.result, self.count = result, 0

    def leave_Call(self, original, updated):
        if not m.matches(updated, m.Call(m.Attribute(attr=m.Name("sum")))):
            return updated
        over_first = m.matches(
            updated,
            m.Call(args=[m.Arg(m.Integer("0"), keyword=m.MatchIfTrue(_none_or_dim))]),
        )
        reshaped = _reshape(updated.func.value)
        if over_first and reshaped and m.matches(reshaped[0], m.Name(self.result)):
            if len(reshaped[1]) == 3 and reshaped[1][1] == "-1":
                self.count += 1
                return cst.Name(self.result)
        return updated


def rewrite_dense_calls(ctx, cls: cst.ClassDef, attr: str, classes: dict) -> cst.ClassDef:
    """In `cls` (the owner), each ``R = self.<attr>(scaled repeat)`` -> the top-k of the
    router's scores and ``R = self.<attr>(x, top_k_index, top_k_weights)``; the summed
    reshape of R -> R."""
    owner = cls.name.value
    body = []
    for stmt in cls.body.body:
        if isinstance(stmt, cst.FunctionDef) and stmt.name.value != "__init__":
            stmt = _rewrite_method(ctx, owner, stmt, attr, classes)
        body.append(stmt)
    return cls.with_changes(body=cls.body.with_changes(body=body))


def _rewrite_method(
    ctx, owner: str, method: cst.FunctionDef, attr: str, classes
) -> cst.FunctionDef:
    scope = f"{owner}.{method.name.value}"
    stmts = list(method.body.body)
    at = [
        i
        for i, s in enumerate(stmts)
        if any(self_attr(c.func) == attr for c in nodes_of(s, cst.Call))
    ]
    if not at:
        return method
    hint = (
        "a dense experts block becomes top-k routing where it scales a repeat of the tokens "
        "by the router's scores (0 off the top-k), calls the experts once and sums their "
        "output blocks; see converter/passes/moe/dense.py"
    )
    if len(at) != 1:
        raise ctx.error(f"{owner} calls self.{attr} more than once", stmts[at[1]], scope=scope)
    i = at[0]
    call_stmt = stmts[i]
    if (
        not m.matches(
            call_stmt,
            m.SimpleStatementLine([m.Assign([m.AssignTarget(m.Name())], m.Call(args=[m.Arg()]))]),
        )
        or self_attr(call_stmt.body[0].value.func) != attr
    ):
        raise ctx.error(
            f"the dense experts self.{attr} are not called as `out = self.{attr}(x)`",
            call_stmt,
            scope=scope,
            hint=hint,
        )
    result = call_stmt.body[0].targets[0].target.value
    block = _Block()
    before = []
    for s in stmts[:i]:
        if not isinstance(s, cst.SimpleStatementLine):
            raise ctx.error("not straight-line code before the experts call", s, scope=scope)
        for small in s.body:
            before.append(small)
            for name in (
                target_names(small.targets[0].target) if isinstance(small, cst.Assign) else []
            ):
                if any(v[0] in ("repeated", "scaled") and v[1] == name for v in block.env.values()):
                    raise ctx.error(
                        f"rebinds {name} after repeating it for the dense experts", s, scope=scope
                    )
            if m.matches(small, m.Assign([m.AssignTarget(m.Name())])):
                block.env[small.targets[0].target.value] = block.value(small.value)
    scaled = block.value(call_stmt.body[0].value.args[0].value)
    if scaled[0] != "scaled":
        raise ctx.error(
            f"the dense experts' input is not the tokens repeated per expert and scaled by "
            f"their scores ({', '.join(names_read(call_stmt.body[0].value.args[0]))})",
            call_stmt,
            scope=scope,
            hint=hint,
        )
    _, tokens, scores = scaled
    try:
        router, k = _router_scores(ctx, owner, classes, scores, before)
    except ValueError as e:
        raise ctx.error(str(e), call_stmt, scope=scope, hint=hint) from None
    k_text = one_line(k)
    if isinstance(k, cst.Integer):
        k_block = k_text
    elif self_attr(k):
        k_block = f"self.{router}.{self_attr(k)}"
    else:
        raise ctx.error(
            f"the router's top-k count `{k_text}` is not an attribute of the router",
            call_stmt,
            scope=scope,
            hint=hint,
        )
    used = {n.value for n in nodes_of(method, cst.Name)}
    weights, index = (
        next(f"{base}{n or ''}" for n in range(0, 99) if f"{base}{n or ''}" not in used)
        for base in ("top_k_weights", "top_k_index")
    )
    new = cst.parse_module(
        f"{weights}, {index} = torch.topk({scores}, {k_block}, dim=-1)  # the routed pairs\n"
        f"{result} = self.{attr}({tokens}, {index}, {weights})  # [T, H], summed over top-k\n"
    ).body
    summer = _SumOfBlocks(result)
    after = [s.visit(summer) for s in stmts[i + 1 :]]
    left = [s for s in after if result in {n.value for n in nodes_of(s, cst.Name)}]
    if summer.count != 1 or len(left) != 1:
        raise ctx.error(
            f"the dense experts' output {result} is not read once, as its expert blocks summed "
            f"(`{result}.reshape(E, -1, H).sum(dim=0)`)",
            call_stmt,
            scope=scope,
            hint=hint,
        )
    body = [*stmts[:i], *new, *after]
    return method.with_changes(body=method.body.with_changes(body=body))
