"""Stage moe: transformers' experts modules -> one `runtime.moe.FusedMoE` each.

It runs before select, on the whole file (select would drop an ``_apply_gate`` the
forward does not call), over the classes the causal LM owns. An experts class is found by structure (`experts.py`): it holds 3-D expert parameters
and its instances are called as ``experts(hidden_states, top_k_index, top_k_weights)``;
a class with transformers' experts decorator (rules/training.toml ``[experts]``) must be
one. Where a class's ``__init__`` built it (``self.experts = MixtralExperts(config)``) it
now builds ``FusedMoE(<experts>, <hidden>, <intermediate>, activation=..., <layout>)``,
the arguments read from the experts class and bound to that call's arguments; the
experts class goes. Calls keep their place (keyword arguments become positional, in the
experts forward's order). Everything else of the MoE block stays the source's own code:
the router (softmax / sigmoid scores, top-k, grouped top-k, correction bias,
normalisation, scaling), shared experts and their gates.

A class without the decorator becomes FusedMoE only where its forward is transformers'
top-k loop written out (`topk_loop.py`), its zero-computation experts (ids past the
routed ones returning their input) becoming ``identity_experts=``. An experts class
FusedMoE cannot stand for (a post-expert norm, an activation module of its own, a gate
function outside `gate.py`'s forms, parameters it does not hold, calls with other
arguments, an undecorated forward of another kind) stops the conversion with one line:
never a module that routes or computes experts differently from the source.
"""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from converter.analysis.ownership import owns
from converter.context import ConversionContext
from converter.cst_helpers import (
    add_import_from,
    ctor_call,
    dotted,
    nodes_of,
    one_line,
    self_attr,
    with_ctor,
)
from converter.passes.moe.dense import dense_forward, read_dense_layout, rewrite_dense_calls
from converter.passes.moe.experts import (
    Layout,
    LayoutError,
    _Substitute,
    decorator_flags,
    read_layout,
    three_d_parameters,
)
from converter.passes.moe.flat_experts import read_flat_layout

CALL_ARGS = ("hidden_states", "top_k_index", "top_k_weights")


def run(module: cst.Module, ctx: ConversionContext) -> cst.Module:
    names = set(ctx.rules.get("training", {}).get("experts", {}).get("decorators", []))
    classes = {s.name.value: s for s in module.body if isinstance(s, cst.ClassDef)}
    candidates: dict[str, tuple[bool, dict[str, bool]]] = {}
    for name, node in classes.items():
        if not owns(ctx, ctx.lm_class, {name}):
            continue  # not part of the causal LM (a vision tower's, another head's)
        try:
            dec, flags = decorator_flags(node, names)
        except LayoutError as e:
            raise _error(ctx, name, e) from None
        if dec is not None or three_d_parameters(node) or _expert_mask(node):
            candidates[name] = (dec is not None, flags)
    if not candidates:
        return module
    sites = _construction_sites(classes, candidates, ctx)
    layouts: dict[str, Layout] = {}
    for name, (decorated, flags) in candidates.items():
        calls = [c for owner, attr in sites.get(name, []) for c in _calls(classes[owner], attr)]
        experts_like = bool(calls) and all(_arity(call) == 3 for call, _, _ in calls)
        if not calls:
            continue  # built but never called here: nothing routes through it
        node = classes[name]
        if not experts_like and _dense(calls, node):
            try:
                layouts[name] = read_dense_layout(node, ctx)
            except LayoutError as e:
                raise _error(ctx, name, e) from None
            continue
        if not experts_like:
            what = "experts class" if decorated else "class with 3-D (per-expert) parameters"
            call, stmt, scope = calls[0]
            raise ctx.error(
                f"{what} {name} is called as `{one_line(call)}`",
                stmt,
                scope=scope,
                hint="FusedMoE replaces an experts module called as "
                "experts(hidden_states, top_k_index, top_k_weights), or one run densely over "
                "every token (converter/passes/moe/dense.py); this call shape needs its own rewrite",
            )
        if not three_d_parameters(node):
            # 2-D parameters its own loop views per expert (flat_experts.py), or a stop
            try:
                layouts[name] = read_flat_layout(node, classes, ctx)
            except LayoutError as e:
                raise _error(ctx, name, e) from None
            continue
        try:
            layouts[name] = read_layout(node, flags, decorated, ctx)
        except LayoutError as e:
            raise _error(ctx, name, e) from None
    if not layouts:
        return module
    body = []
    for stmt in module.body:
        if isinstance(stmt, cst.ClassDef):
            if stmt.name.value in layouts:
                continue  # the experts class: FusedMoE stands where it was built
            stmt = _rewrite_owner(stmt, layouts, sites, ctx, classes)
        body.append(stmt)
    for name, layout in layouts.items():  # the ownership graph follows: owners build FusedMoE
        for owner, attr in sites.get(name, []):
            child = ctx.classes[owner].children[attr]
            child.ctor, child.cls = "FusedMoE", None
            # 2-D checkpoint tensors -> FusedMoE's parameters (load_weights' stacked table)
            ctx.expert_checkpoint += [
                (f"{attr}.{w.target}", f"{attr}.{w.path}", flat_shard_id(w)) for w in layout.flat
            ]
        ctx.classes.pop(name, None)
        ctx.log.append(f"moe: {name} -> FusedMoE")
    return add_import_from(module.with_changes(body=body), {"FusedMoE"}, "runtime.moe")


def flat_shard_id(w) -> str:
    """The `runtime.moe.FlatExperts` shard id of one 2-D checkpoint tensor, as code."""
    args = [str(w.part), str(w.num_parts)] + (["transposed=True"] if w.transposed else [])
    return f"FlatExperts({', '.join(args)})"


def _error(ctx: ConversionContext, name: str, e: LayoutError):
    node = e.node
    line = ctx.classes[name].line if isinstance(node, cst.ClassDef) else None
    return ctx.error(
        str(e),
        None if isinstance(node, cst.ClassDef) else node,
        scope=f"{name}.__init__",
        line=line,
        hint=e.hint,
    )


def _construction_sites(
    classes: dict[str, cst.ClassDef], candidates: dict, ctx: ConversionContext
) -> dict[str, list[tuple[str, str]]]:
    """candidate class -> [(owner class, attribute)] where an owner's __init__ builds it."""
    sites: dict[str, list[tuple[str, str]]] = {}
    for owner in classes:
        info = ctx.classes.get(owner)
        for attr, child in info.children.items() if info else ():
            if child.cls in candidates:
                if child.in_list:
                    raise ctx.error(
                        f"{owner}.{attr} builds a list of {child.cls}",
                        line=child.line,
                        hint="FusedMoE stands for one experts module holding every expert",
                    )
                sites.setdefault(child.cls, []).append((owner, attr))
    return sites


def _calls(owner: cst.ClassDef, attr: str) -> list[tuple[cst.Call, cst.CSTNode, str]]:
    """Every call of ``self.<attr>(...)`` in `owner`'s methods, with its statement and
    method (for the error line)."""
    found = []
    for method in (s for s in owner.body.body if isinstance(s, cst.FunctionDef)):
        for stmt in nodes_of(method.body, cst.SimpleStatementLine):
            for call in nodes_of(stmt, cst.Call):
                if self_attr(call.func) == attr:
                    found.append((call, stmt, f"{owner.name.value}.{method.name.value}"))
    return found


def _expert_mask(cls: cst.ClassDef) -> bool:
    """Whether `cls`'s forward takes (hidden, top-k index, top-k weights) and builds the
    expert mask of transformers' experts loop, ``one_hot(<top-k index>, ...)``."""
    forward = next(
        (s for s in cls.body.body if isinstance(s, cst.FunctionDef) and s.name.value == "forward"),
        None,
    )
    params = [p.name.value for p in forward.params.params] if forward else []
    if len(params) != 4:
        return False
    for call in nodes_of(forward.body, cst.Call):
        if (dotted(call.func) or "").endswith("one_hot") and call.args:
            if m.matches(call.args[0].value, m.Name(params[2])):
                return True
    return False


def _arity(call: cst.Call) -> int | None:
    if any(a.star for a in call.args):
        return None
    return len(call.args)


def _dense(calls, node: cst.ClassDef) -> bool:
    """Experts called with one argument whose forward runs every expert on every token."""
    return all(_arity(call) == 1 for call, _, _ in calls) and dense_forward(node)


def _rewrite_owner(
    cls: cst.ClassDef, layouts: dict[str, Layout], sites: dict, ctx: ConversionContext, classes
) -> cst.ClassDef:
    owner = cls.name.value
    attrs = {
        attr: name
        for name, where in sites.items()
        if name in layouts
        for o, attr in where
        if o == owner
    }
    if not attrs:
        return cls
    body = []
    routed = {a: n for a, n in attrs.items() if not layouts[n].weight_on_input}
    for stmt in cls.body.body:
        if isinstance(stmt, cst.FunctionDef):
            if stmt.name.value == "__init__":
                stmt = stmt.visit(_Construct(attrs, layouts, ctx, owner))
            stmt = stmt.visit(_PositionalCalls(routed, ctx, owner))
        body.append(stmt)
    cls = cls.with_changes(body=cls.body.with_changes(body=body))
    for attr in set(attrs) - set(routed):  # dense experts: top-k routing at the call
        cls = rewrite_dense_calls(ctx, cls, attr, classes)
    return cls


class _Construct(cst.CSTTransformer):
    """``self.<attr> = Experts(args)`` -> ``self.<attr> = FusedMoE(...)``."""

    def __init__(self, attrs: dict[str, str], layouts, ctx, owner: str) -> None:
        self.attrs, self.layouts, self.ctx, self.owner = attrs, layouts, ctx, owner

    def leave_Assign(self, original: cst.Assign, updated: cst.Assign) -> cst.Assign:
        if len(updated.targets) != 1:
            return updated
        attr = self_attr(updated.targets[0].target)
        call = ctor_call(updated.value)
        if attr not in self.attrs or call is None or dotted(call.func) != self.attrs[attr]:
            return updated
        layout = self.layouts[self.attrs[attr]]
        values = _bind(call, layout, self.ctx, f"{self.owner}.__init__")
        return updated.with_changes(value=with_ctor(updated.value, fused_moe(layout, values)))


def _bind(call: cst.Call, layout: Layout, ctx, scope: str) -> dict[str, cst.BaseExpression]:
    """The experts __init__'s parameters bound to `call`'s arguments (or defaults)."""
    params = layout.init_params[1:]  # self
    names = [p.name.value for p in params]
    bound: dict[str, cst.BaseExpression] = {}
    position = 0
    for arg in call.args:
        if arg.star:
            raise ctx.error("experts built with *args / **kwargs", call, scope=scope)
        if arg.keyword is None:
            if position >= len(names):
                raise ctx.error("too many arguments to the experts class", call, scope=scope)
            bound[names[position]] = arg.value
            position += 1
        elif arg.keyword.value in names:
            bound[arg.keyword.value] = arg.value
        else:
            raise ctx.error(f"unknown experts argument {arg.keyword.value}", call, scope=scope)
    for param in params:
        if param.name.value not in bound:
            if param.default is None:
                raise ctx.error(f"experts argument {param.name.value} missing", call, scope=scope)
            bound[param.name.value] = param.default
    # a parameter bound to a name of the same spelling needs no substitution
    return {k: v for k, v in bound.items() if not m.matches(v, m.Name(k))}


def fused_moe(layout: Layout, values: dict[str, cst.BaseExpression]) -> cst.Call:
    """``FusedMoE(E, H, I, activation=..., <non-default layout flags>, <clamps>)``."""
    sub = _Substitute(values)

    def arg(value: cst.BaseExpression, keyword: str | None = None) -> cst.Arg:
        value = value.visit(sub).visit(_FoldNoneTests())
        if keyword is None:
            return cst.Arg(value)
        return cst.Arg(
            value,
            keyword=cst.Name(keyword),
            equal=cst.AssignEqual(cst.SimpleWhitespace(""), cst.SimpleWhitespace("")),
        )

    flags, gate = layout.flags, layout.gate
    args = [
        arg(layout.num_experts),
        arg(layout.hidden_size),
        arg(layout.intermediate_size),
        arg(layout.activation, "activation"),
    ]
    for flag, default in (
        ("has_gate", True),
        ("is_concatenated", True),
        ("is_transposed", False),
        ("has_bias", False),
    ):
        if flags[flag] != default:
            args.append(arg(cst.Name(str(flags[flag])), flag))
    if gate.alpha is not None:
        args.append(arg(gate.alpha, "alpha"))
    if gate.limit is not None:
        args.append(arg(gate.limit, "limit"))
    if gate.limit_after_activation:
        args.append(arg(cst.Name("True"), "limit_after_activation"))
    if gate.up_offset:
        args.append(arg(cst.Float(repr(float(gate.up_offset))), "up_offset"))
    if layout.weight_on_input:
        args.append(arg(cst.Name("True"), "apply_router_weight_on_input"))
    if layout.identity_experts is not None:
        args.append(arg(layout.identity_experts, "identity_experts"))
    return cst.Call(cst.Name("FusedMoE"), args)


class _FoldNoneTests(cst.CSTTransformer):
    """``a if None is None else b`` -> ``a``: an optional experts argument left at its
    default (``intermediate_size=None``) picks its arm at conversion time."""

    def leave_IfExp(self, original, updated):
        test = updated.test
        if m.matches(
            test,
            m.Comparison(
                left=m.Name("None"),
                comparisons=[m.ComparisonTarget(m.Is() | m.IsNot(), m.Name("None"))],
            ),
        ):
            taken = isinstance(test.comparisons[0].operator, cst.Is)
            return updated.body if taken else updated.orelse
        return updated


class _PositionalCalls(cst.CSTTransformer):
    """``self.experts(hidden_states=h, router_indices=i, ...)`` -> positional arguments,
    in the experts forward's order (FusedMoE names them as transformers' interface)."""

    def __init__(self, attrs: dict[str, str], ctx, owner: str) -> None:
        self.attrs, self.ctx, self.owner = attrs, ctx, owner

    def leave_Call(self, original: cst.Call, updated: cst.Call) -> cst.Call:
        attr = self_attr(updated.func)
        if attr not in self.attrs or all(a.keyword is None for a in updated.args):
            return updated
        params = self.ctx.classes[self.attrs[attr]].forward_params[1:]
        by_name = {a.keyword.value: a for a in updated.args if a.keyword is not None}
        positional = [a for a in updated.args if a.keyword is None]
        ordered = list(positional)
        for name in params[len(positional) :]:
            if name not in by_name:
                raise self.ctx.error(f"experts call without {name}", original)
            ordered.append(
                by_name.pop(name).with_changes(keyword=None, equal=cst.MaybeSentinel.DEFAULT)
            )
        ordered = [a.with_changes(comma=cst.MaybeSentinel.DEFAULT) for a in ordered]
        return updated.with_changes(args=ordered)
