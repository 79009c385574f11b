"""Experts held as 2-D parameters and run by their own per-expert loop, as a `Layout`.

Some experts classes are not transformers' decorated 3-D experts: they keep every expert's
weight of one projection in one 2-D parameter, the experts stacked along its first dim
(``w1 = nn.Parameter(torch.empty(E * I, H))``), and their own forward loops over the
experts the tokens were routed to, viewing each parameter per expert and calling an
expert computation with the views (DBRX)::

    split = (-1, self.ffn_hidden_size, self.hidden_size)
    for expert_idx in expert_hit:
        ...
        w1 = self.mlp.w1.view(split)[expert_idx]          # [I, H]
        v1 = self.mlp.v1.view(split)[expert_idx]
        w2 = self.mlp.w2.view(split)[expert_idx]
        states = self.mlp(hidden_states[token_idx], w1, v1, w2)
        states = states.view(-1, H) * top_k_weights[token_idx, idx, None]
        next_states.index_add_(0, token_idx, states)

with ``mlp.forward(x, w1, v1, w2) = (act(x @ w1.T) * (x @ v1.T)) @ w2``. `read_flat_layout`
reads all of it from the source: which view feeds which role (gate: the activated
product, up: the other factor, down: the product of their combination) and in which
orientation (``x @ w.T``: the view is ``[out, in]``; ``x @ w``: ``[in, out]``), the sizes
from the views and the parameters' declared shapes (``E * A`` rows viewed ``(-1, A, B)``:
E experts), the activation from the computation's module. The loop itself must be the
top-k combination FusedMoE computes: an expert mask of the top-k index (the caller's
test), the expert's output scaled by a ``top_k_weights[...]`` entry and ``index_add_``-ed
into a zero accumulator that is returned, at most reshaped back to the input's leading
dims (FusedMoE returns its input's shape). Anything else stops with one line.

FusedMoE then holds the experts in its own layout; `Layout.flat` says which checkpoint
tensor (``mlp.w1``, relative to the experts module) loads as which part of which
FusedMoE parameter, and in which orientation (`runtime.moe.FlatExperts`).
"""

from __future__ import annotations

from dataclasses import dataclass

import libcst as cst
import libcst.matchers as m

from converter.context import ConversionContext
from converter.cst_helpers import (
    dotted,
    flat_statements,
    methods_of,
    names_read,
    nodes_of,
    one_line,
)
from converter.passes.moe.experts import (
    DEFAULT_FLAGS,
    InitEnv,
    Layout,
    LayoutError,
    _activations,
    _Substitute,
    parameter_shape,
)
from converter.passes.moe.gate import Gate

VIEWS = ("view", "reshape")
MATMULS = ("matmul", "mm")
LINEAR = ("linear",)
# activations called as functions (torch.nn.functional.silu(x)): transformers' names
FUNCTIONAL = ("silu", "gelu", "relu")


@dataclass(frozen=True)
class FlatWeight:
    """One checkpoint tensor of the experts: where it loads in FusedMoE."""

    path: str  # the parameter, relative to the experts module ("mlp.w1")
    target: str  # the FusedMoE parameter ("gate_up_proj", "up_proj", "down_proj")
    part: int  # of num_parts along the gate/up features
    num_parts: int
    transposed: bool  # the per-expert view is [in, out] (the loop computes x @ w)


@dataclass(frozen=True)
class _View:
    name: str  # the loop's local holding the per-expert view
    path: str  # "mlp.w1"
    dims: tuple[cst.BaseExpression, ...]  # the view's shape (resolved), 3 dims
    node: cst.CSTNode


def read_flat_layout(
    cls: cst.ClassDef, classes: dict[str, cst.ClassDef], ctx: ConversionContext
) -> Layout:
    """`cls` (an experts class holding no 3-D parameters) as a FusedMoE `Layout` with
    ``flat`` weights; LayoutError where its loop is not one FusedMoE computes."""
    name = cls.name.value
    methods = methods_of(cls)
    init, forward = methods.get("__init__"), methods.get("forward")
    if init is None or forward is None:
        raise LayoutError(f"{name} has no __init__ / forward", cls)
    env = InitEnv(init, ctx)
    hidden, _, weights = (p.name.value for p in forward.params.params[1:4])
    stmts = flat_statements(forward.body.body)
    assigns = _assignments(stmts)
    views = _views(stmts, assigns, env, cls)
    call, result = _expert_call(stmts, views, forward)
    roles, act = _roles(call, views, hidden, classes, ctx, cls)
    _check_combination(stmts, assigns, result, weights, hidden, forward)
    child = self_attr_path(call.func)
    binding, child_env = _child_scope(name, child, env, classes, ctx)
    shapes = {v.path: _param_shape(name, v.path, env, classes, ctx, v.node) for v in views.values()}
    sizes: dict[str, set[str]] = {"I": set(), "H": set(), "E": set()}
    exprs: dict[str, cst.BaseExpression] = {}
    flat = []
    has_gate = "gate" in roles
    for role, (view, transposed) in roles.items():
        a, b = (one_line(d) for d in view.dims[1:])
        out, inner = (b, a) if transposed else (a, b)
        out_key, in_key = ("H", "I") if role == "down" else ("I", "H")
        for key, text in ((out_key, out), (in_key, inner)):
            sizes[key].add(text)
            exprs.setdefault(key, _dim(view, text))
        rows, cols = shapes[view.path]
        count = _expert_count(rows, view.dims[1], view.node)
        if one_line(cols) != one_line(view.dims[2]):
            raise LayoutError(
                f"{name}: {view.path} {one_line(cols)} columns viewed as {one_line(view.dims[2])}",
                view.node,
            )
        if one_line(view.dims[0]) not in ("-1", one_line(count)):
            raise LayoutError(
                f"{name}: {view.path} viewed as {one_line(view.dims[0])} experts, declared "
                f"{one_line(count)}",
                view.node,
            )
        sizes["E"].add(one_line(count))
        exprs.setdefault("E", count)
        target = "down_proj" if role == "down" else ("gate_up_proj" if has_gate else "up_proj")
        part, parts = {"gate": (0, 2), "up": (1, 2) if has_gate else (0, 1), "down": (0, 1)}[role]
        flat.append(FlatWeight(view.path, target, part, parts, transposed))
    for key, found in sizes.items():
        if len(found) != 1:
            what = {"I": "intermediate", "H": "hidden", "E": "expert count"}[key]
            raise LayoutError(f"{name}: the expert weights disagree on the {what} ({found})", cls)
    acts = _activations(child_env) | {f"={f}": cst.SimpleString(f'"{f}"') for f in FUNCTIONAL}
    if act not in acts:
        raise LayoutError(
            f"{name}.{child}: self.{act} is not an activation FusedMoE implements "
            "(self.<attr> = ACT2FN[...], nn.SiLU(), ...)",
            call,
        )
    activation = acts[act].visit(_Substitute(binding))
    return Layout(
        num_experts=exprs["E"],
        hidden_size=exprs["H"],
        intermediate_size=exprs["I"],
        activation=activation,
        flags=dict(DEFAULT_FLAGS, has_gate=has_gate),
        gate=Gate(activation=None, is_concatenated=None),
        init_params=list(init.params.params),
        flat=sorted(flat, key=lambda w: (w.target, w.part)),
    )


def self_attr_path(node: cst.BaseExpression) -> str | None:
    """``self.a.b`` -> ``"a.b"``."""
    name = dotted(node) or ""
    return name[len("self.") :] if name.startswith("self.") else None


def _dim(view: _View, text: str) -> cst.BaseExpression:
    return next(d for d in view.dims[1:] if one_line(d) == text)


def _assignments(stmts) -> dict[str, list[cst.BaseExpression]]:
    found: dict[str, list[cst.BaseExpression]] = {}
    for small in stmts:
        if isinstance(small, cst.Assign) and len(small.targets) == 1:
            target = small.targets[0].target
            if isinstance(target, cst.Name):
                found.setdefault(target.value, []).append(small.value)
    return found


def _views(stmts, assigns, env: InitEnv, cls: cst.ClassDef) -> dict[str, _View]:
    """``w = self.<path>.view(shape)[expert]`` assignments of the loop."""
    views = {}
    for small in stmts:
        if not (isinstance(small, cst.Assign) and len(small.targets) == 1):
            continue
        target, value = small.targets[0].target, small.value
        if not (isinstance(target, cst.Name) and isinstance(value, cst.Subscript)):
            continue
        call = value.value
        if not (
            isinstance(call, cst.Call)
            and isinstance(call.func, cst.Attribute)
            and call.func.attr.value in VIEWS
        ):
            continue
        path = self_attr_path(call.func.value)
        if path is None:
            continue
        dims = [a.value for a in call.args]
        if len(dims) == 1 and isinstance(dims[0], cst.Name):
            bound = assigns.get(dims[0].value, [])
            if len(bound) != 1:
                raise LayoutError(
                    f"{cls.name.value}: the view shape {dims[0].value} is not one tuple", small
                )
            dims = [bound[0]]
        if len(dims) == 1 and isinstance(dims[0], cst.Tuple | cst.List):
            dims = [e.value for e in dims[0].elements]
        if len(dims) != 3:
            raise LayoutError(
                f"{cls.name.value}: {path} viewed per expert as {len(dims)} dims, not "
                "(experts, rows, cols)",
                small,
            )
        views[target.value] = _View(target.value, path, tuple(env.resolve(d) for d in dims), small)
    if not views:
        raise LayoutError(
            f"{cls.name.value} holds no 3-D expert parameters and views no parameter per "
            "expert (w = self.<param>.view(experts, rows, cols)[expert])",
            cls,
            hint="FusedMoE stands for experts held as 3-D [experts, out, in] parameters or as "
            "2-D [experts * out, in] ones its loop views per expert",
        )
    return views


def _expert_call(stmts, views: dict[str, _View], forward) -> tuple[cst.Call, str]:
    """The one call taking the per-expert views, and the local its result is bound to."""
    found = []
    for small in stmts:
        if isinstance(small, cst.Assign) and isinstance(small.value, cst.Call):
            args = {a.value.value for a in small.value.args if isinstance(a.value, cst.Name)}
            if args & set(views):
                found.append(small)
    if len(found) != 1 or not isinstance(found[0].targets[0].target, cst.Name):
        raise LayoutError(
            "the per-expert weights are not passed to one expert computation "
            "(states = self.<module>(tokens, w1, v1, w2))",
            found[1] if len(found) > 1 else forward,
        )
    call = found[0].value
    if self_attr_path(call.func) is None or "." in self_attr_path(call.func):
        raise LayoutError("the expert computation is not a submodule's forward", found[0])
    return call, found[0].targets[0].target.value


def _roles(
    call: cst.Call, views, hidden: str, classes, ctx, cls
) -> tuple[dict[str, tuple[_View, bool]], str]:
    """gate / up / down -> (view, transposed) from the computation's forward, and the
    ``self.<attr>`` activation it applies."""
    name = cls.name.value
    child = self_attr_path(call.func)
    info = ctx.classes.get(name)
    child_cls = info.children[child].cls if info and child in info.children else None
    fn = classes.get(child_cls) if child_cls else None
    forward = methods_of(fn).get("forward") if fn is not None else None
    if forward is None:
        raise LayoutError(f"{name}.{child} is no class of this file with a forward", call)
    params = [p.name.value for p in forward.params.params[1:]]
    if len(params) != len(call.args) or any(a.keyword or a.star for a in call.args):
        raise LayoutError(f"{name}.{child} is called with other arguments than it takes", call)
    symbols: dict[str, tuple] = {}
    for param, arg in zip(params, call.args):
        value = arg.value
        if isinstance(value, cst.Name) and value.value in views:
            symbols[param] = ("w", value.value)
        elif isinstance(value, cst.Subscript) and m.matches(value.value, m.Name(hidden)):
            symbols[param] = ("x",)
        else:
            raise LayoutError(
                f"{name}: argument {one_line(value)} of the expert computation is neither "
                f"a per-expert weight nor the routed tokens ({hidden}[...])",
                call,
            )
    result = _evaluate(forward, symbols)
    down = _proj(result)
    problem = LayoutError(
        f"{child_cls}.forward does not compute act(x @ gate) * (x @ up) @ down "
        f"(or act(x @ up) @ down) from its weights: {_show(result)}",
        forward,
        hint="FusedMoE computes a gated (or plain) activation between two projections",
    )
    if down is None:
        raise problem
    inner, w_down, t_down = down
    roles = {"down": (w_down, t_down)}
    if inner[0] == "mul":
        acts = [s for s in inner[1:] if s[0] == "act"]
        if len(acts) != 1:
            raise problem
        act = acts[0]
        gate = _proj(act[2])
        up = _proj(next(s for s in inner[1:] if s[0] != "act"))
        if gate is None or up is None or gate[0] != ("x",) or up[0] != ("x",):
            raise problem
        roles["gate"], roles["up"] = gate[1:], up[1:]
    elif inner[0] == "act":
        act = inner
        up = _proj(inner[2])
        if up is None or up[0] != ("x",):
            raise problem
        roles["up"] = up[1:]
    else:
        raise problem
    used = [w for w, _ in roles.values()]
    if len(set(used)) != len(used) or set(used) != set(views):
        raise LayoutError(f"{name}: each per-expert weight must feed one projection", call)
    return {role: (views[w], t) for role, (w, t) in roles.items()}, act[1]


def _proj(term: tuple) -> tuple[tuple, str, bool] | None:
    """``x @ w`` / ``x @ w.T`` -> (x, weight, transposed: the weight is [in, out])."""
    if term[0] != "mm":
        return None
    a, b = term[1], term[2]
    if b[0] == "w":
        return a, b[1], True
    if b[0] == "t" and b[1][0] == "w":
        return a, b[1][1], False
    return None


def _show(term: tuple) -> str:
    if term[0] in ("x", "w", "?"):
        return term[1] if len(term) > 1 else "x"
    return f"{term[0]}({', '.join(_show(t) for t in term[1:] if isinstance(t, tuple))})"


def _evaluate(forward: cst.FunctionDef, symbols: dict[str, tuple]) -> tuple:
    """The symbolic value `forward` returns (straight-line code only)."""
    env = dict(symbols)
    for stmt in forward.body.body:
        if not isinstance(stmt, cst.SimpleStatementLine):
            return ("?", "a compound statement")
        for small in stmt.body:
            if isinstance(small, cst.Assign) and len(small.targets) == 1:
                target = small.targets[0].target
                if isinstance(target, cst.Name):
                    env[target.value] = _term(small.value, env)
                    continue
            if isinstance(small, cst.Return) and small.value is not None:
                return _term(small.value, env)
            if m.matches(small, m.Expr(m.SimpleString() | m.ConcatenatedString())):
                continue
            return ("?", one_line(small))
    return ("?", "no return")


def _term(node: cst.BaseExpression, env: dict[str, tuple]) -> tuple:
    if isinstance(node, cst.Name):
        return env.get(node.value, ("?", node.value))
    if isinstance(node, cst.Attribute) and node.attr.value in ("T", "mT"):
        return ("t", _term(node.value, env))
    if isinstance(node, cst.BinaryOperation):
        left, right = _term(node.left, env), _term(node.right, env)
        if isinstance(node.operator, cst.MatrixMultiply):
            return ("mm", left, right)
        if isinstance(node.operator, cst.Multiply):
            return ("mul", left, right)
    if isinstance(node, cst.Call):
        func, args = node.func, [a.value for a in node.args if a.keyword is None]
        short = func.attr.value if isinstance(func, cst.Attribute) else dotted(func)
        if (dotted(func) or "").startswith("self.") and dotted(func).count(".") == 1:
            if len(args) == 1 and len(node.args) == 1:
                return ("act", func.attr.value, _term(args[0], env))
        if isinstance(func, cst.Attribute) and short in MATMULS and len(args) == 1:
            if not (dotted(func.value) or "").startswith("torch"):
                return ("mm", _term(func.value, env), _term(args[0], env))
        if short in MATMULS and len(args) == 2:
            return ("mm", _term(args[0], env), _term(args[1], env))
        if short in FUNCTIONAL and len(args) == 1 and len(node.args) == 1:
            return ("act", f"={short}", _term(args[0], env))
        if short in LINEAR and len(args) == 2 and len(node.args) == 2:
            return ("mm", _term(args[0], env), ("t", _term(args[1], env)))
        if isinstance(func, cst.Attribute) and short in ("t", "transpose"):
            texts = [one_line(a) for a in args]
            if texts in ([], ["0", "1"], ["1", "0"], ["-1", "-2"], ["-2", "-1"]):
                return ("t", _term(func.value, env))
    return ("?", one_line(node))


def _check_combination(stmts, assigns, result: str, weights: str, hidden: str, forward) -> None:
    """The expert output scaled by ``weights[...]`` and ``index_add_``-ed into a zero
    accumulator the forward returns (at most reshaped back to the input's leading dims)."""
    scaled = {
        name for name, values in assigns.items() for v in values if _is_scaled(v, result, weights)
    }
    accumulators = set()
    for small in stmts:
        if m.matches(small, m.Expr(m.Call(func=m.Attribute(attr=m.Name("index_add_"))))):
            call = small.value
            args = [a.value for a in call.args]
            if (
                len(args) == 3
                and one_line(args[0]) == "0"
                and isinstance(args[2], cst.Name)
                and args[2].value in scaled
            ):
                accumulators.add(dotted(call.func.value))
    zeros = {
        a
        for a in accumulators
        if a in assigns
        and all(
            isinstance(v, cst.Call) and (dotted(v.func) or "").endswith(("zeros_like", "zeros"))
            for v in assigns[a][:1]
        )
    }
    returned = [s for s in stmts if isinstance(s, cst.Return)]
    if not zeros or len(returned) != 1 or not _returns(returned[0].value, zeros, assigns, hidden):
        raise LayoutError(
            "the experts loop is not transformers' top-k combination (each expert's output "
            f"scaled by {weights}[...] and index_add_-ed into a zero accumulator that is "
            "returned)",
            forward,
            hint="FusedMoE sums the top-k experts' outputs weighted by the router",
        )


def _is_scaled(value: cst.BaseExpression, result: str, weights: str) -> bool:
    if not (isinstance(value, cst.BinaryOperation) and isinstance(value.operator, cst.Multiply)):
        return False
    sides = (value.left, value.right)
    return any(
        result in names_read(a)
        and isinstance(b, cst.Subscript)
        and m.matches(b.value, m.Name(weights))
        and not any(self_attr_path(c.func) for c in nodes_of(a, cst.Call))
        for a, b in (sides, sides[::-1])
    )


def _returns(value, zeros: set[str], assigns, hidden: str) -> bool:
    """`value` has the input's shape, as FusedMoE's output: the accumulator of an
    input used as given, or one reshaped to ``(<input>.shape[0], -1, H)`` (DBRX's
    ``[B, S, H]`` flattened for the loop and restored)."""
    if isinstance(value, cst.Name) and value.value in assigns:
        last = assigns[value.value][-1]
        if value.value in zeros and len(assigns[value.value]) == 1:
            return hidden not in assigns  # zeros_like(<input>), the input not reshaped
        value = last
    if not (
        isinstance(value, cst.Call)
        and isinstance(value.func, cst.Attribute)
        and value.func.attr.value in VIEWS
        and dotted(value.func.value) in zeros
    ):
        return False
    args = [a.value for a in value.args]
    if len(args) != 3 or one_line(args[1]) != "-1":
        return False
    first = args[0]
    if isinstance(first, cst.Name) and len(assigns.get(first.value, [])) == 1:
        first = assigns[first.value][0]
    return one_line(first) == f"{hidden}.shape[0]"


def _child_scope(owner: str, child: str, env: InitEnv, classes, ctx):
    """The binding of submodule ``self.<child>``'s __init__ parameters to `owner`'s
    __init__ terms (the arguments it is built with), and its __init__ evaluated."""
    info = ctx.classes[owner].children[child]
    node = classes.get(info.cls)
    if node is None:
        raise LayoutError(f"{owner}.{child} is no class of this file", info.call)
    init = methods_of(node).get("__init__")
    if init is None:
        raise LayoutError(f"{info.cls} has no __init__", node)
    child_env = InitEnv(init, ctx)
    params = [p for p in init.params.params[1:]]
    binding: dict[str, cst.BaseExpression] = {}
    call = info.call
    for i, arg in enumerate(call.args):
        if arg.star:
            raise LayoutError(f"{info.cls} built with *args", call)
        key = (
            arg.keyword.value
            if arg.keyword
            else (params[i].name.value if i < len(params) else None)
        )
        if key is None:
            raise LayoutError(f"too many arguments to {info.cls}", call)
        binding[key] = env.resolve(arg.value)
    for p in params:
        if p.name.value not in binding:
            if p.default is None:
                raise LayoutError(f"{info.cls} argument {p.name.value} missing", call)
            binding[p.name.value] = p.default
    return binding, child_env


def _param_shape(name: str, path: str, env: InitEnv, classes, ctx, node) -> list:
    """The declared 2-D shape of ``self.<path>`` in the experts' __init__ terms."""
    parts = path.split(".")
    owner_env, binding, owner = env, {}, name
    for attr in parts[:-1]:
        info = ctx.classes.get(owner)
        if info is None or attr not in info.children or info.children[attr].cls is None:
            raise LayoutError(f"{name}: self.{path} is not a parameter of a submodule here", node)
        binding_sub, owner_env = _child_scope(owner, attr, owner_env, classes, ctx)
        binding = {k: v.visit(_Substitute(binding)) for k, v in binding_sub.items()}
        owner = info.children[attr].cls
    value = owner_env.params.get(parts[-1])
    shape = parameter_shape(owner_env.values[f"self.{parts[-1]}"]) if value is not None else None
    if shape is None or len(shape) != 2:
        raise LayoutError(
            f"{name}: self.{path} is not a 2-D nn.Parameter(torch.empty(rows, cols))", node
        )
    return [d.visit(_Substitute(binding)) for d in shape]


def _expert_count(rows: cst.BaseExpression, per_expert: cst.BaseExpression, node):
    """``N * A`` / ``A * N`` rows of ``A`` per expert -> N."""
    bare = rows.with_changes(lpar=[], rpar=[]) if hasattr(rows, "lpar") else rows
    if isinstance(bare, cst.BinaryOperation) and isinstance(bare.operator, cst.Multiply):
        if one_line(bare.right) == one_line(per_expert):
            return bare.left
        if one_line(bare.left) == one_line(per_expert):
            return bare.right
    raise LayoutError(
        f"a parameter of {one_line(rows)} rows viewed {one_line(per_expert)} rows per expert: "
        "the expert count is not a factor of the declared shape",
        node,
    )
