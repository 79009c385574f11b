"""Call graph of the kept code and call binding (arguments -> callee parameters).

Callees resolve through the ownership graph: ``self.a.b(...)`` is the forward of the class
``a.b`` builds, ``layer(...)`` in ``for layer in self.layers`` the element class's forward,
``self.m(...)`` a method, ``f(...)`` a module-level function.
"""

from __future__ import annotations

from dataclasses import dataclass

import libcst as cst
import libcst.matchers as m

from converter.analysis.ownership import child_class, forward_owner
from converter.context import ConversionContext
from converter.cst_helpers import called_module, dotted, nodes_of


@dataclass
class Function:
    qualname: str  # "LlamaModel.forward" / "apply_rotary_pos_emb"
    cls: str | None
    node: cst.FunctionDef


def collect(module: cst.Module) -> dict[str, Function]:
    out: dict[str, Function] = {}
    for stmt in module.body:
        if isinstance(stmt, cst.FunctionDef):
            out[stmt.name.value] = Function(stmt.name.value, None, stmt)
        elif isinstance(stmt, cst.ClassDef) and isinstance(stmt.body, cst.IndentedBlock):
            for inner in stmt.body.body:
                if isinstance(inner, cst.FunctionDef):
                    q = f"{stmt.name.value}.{inner.name.value}"
                    out[q] = Function(q, stmt.name.value, inner)
    return out


def loop_layers(ctx: ConversionContext, cls: str | None, node: cst.CSTNode) -> dict[str, str]:
    """Loop variable -> element class, for loops (statements or comprehensions) over a
    ``self.<ModuleList>``."""
    found: dict[str, str] = {}
    if cls is None or cls not in ctx.classes:
        return found
    lists = {a: c.cls for a, c in ctx.classes[cls].children.items() if c.in_list and c.cls}
    attr = m.Attribute(value=m.Name("self"), attr=m.Name())
    for loop in [*nodes_of(node, cst.For), *nodes_of(node, cst.CompFor)]:
        it = loop.iter
        target = loop.target
        if m.matches(it, m.Call(func=m.Name("enumerate"))) and it.args:
            it = it.args[0].value
            if m.matches(target, m.Tuple(elements=[m.Element(), m.Element(m.Name())])):
                target = target.elements[1].value
        if isinstance(it, cst.Subscript):
            it = it.value
        if m.matches(it, attr) and it.attr.value in lists and isinstance(target, cst.Name):
            found[target.value] = lists[it.attr.value]
    return found


def resolve(
    ctx: ConversionContext,
    fn: Function,
    call: cst.Call,
    funcs: dict[str, Function],
    loops: dict[str, str],
) -> str | None:
    name = called_module(call.func)
    if name is None:
        return None
    parts = name.split(".")
    if len(parts) == 1:
        if parts[0] in loops:
            owner = forward_owner(ctx, loops[parts[0]])
            return f"{owner}.forward" if owner else None
        return parts[0] if parts[0] in funcs and funcs[parts[0]].cls is None else None
    if parts[0] != "self" or fn.cls is None:
        return None
    if len(parts) == 2:
        owner = forward_owner(ctx, fn.cls, parts[1])
        if owner and f"{owner}.{parts[1]}" in funcs:
            return f"{owner}.{parts[1]}"
    target = child_class(ctx, fn.cls, parts[1:])
    owner = forward_owner(ctx, target) if target else None
    if owner and f"{owner}.forward" in funcs:
        return f"{owner}.forward"
    # `self.<child>.<method>(...)`: another method of an owned module (gemma3n's
    # `self.altup.predict(x)`), live like its forward.
    target = child_class(ctx, fn.cls, parts[1:-1]) if len(parts) > 2 else None
    owner = forward_owner(ctx, target, parts[-1]) if target else None
    return f"{owner}.{parts[-1]}" if owner and f"{owner}.{parts[-1]}" in funcs else None


def alternatives(
    ctx: ConversionContext, fn: Function, call: cst.Call, funcs: dict[str, Function]
) -> list[str]:
    """The other forwards ``self.<attr>(...)`` may run: the attribute's alternative
    classes (`Child.alternatives`: a per-layer choice of MoE block or dense MLP)."""
    name = dotted(call.func) or ""
    parts = name.split(".")
    info = ctx.classes.get(fn.cls or "")
    if len(parts) != 2 or parts[0] != "self" or info is None or parts[1] not in info.children:
        return []
    out = []
    for cls in info.children[parts[1]].alternatives:
        owner = forward_owner(ctx, cls)
        if owner and f"{owner}.forward" in funcs:
            out.append(f"{owner}.forward")
    return out


def calls_of(ctx, fn: Function, funcs) -> list[tuple[cst.Call, str]]:
    """Every (call, callee) pair; a call of an attribute holding one of several classes
    pairs with each class's forward."""
    loops = loop_layers(ctx, fn.cls, fn.node)
    out = []
    for call in nodes_of(fn.node.body, cst.Call):
        target = resolve(ctx, fn, call, funcs, loops)
        if target is not None:
            out.append((call, target))
            out += [(call, alt) for alt in alternatives(ctx, fn, call, funcs) if alt != target]
    return out


def reachable(ctx, funcs: dict[str, Function], roots: list[str]) -> list[str]:
    """Functions reachable from `roots`, callers before callees (topological)."""
    edges = {q: {t for _, t in calls_of(ctx, funcs[q], funcs)} for q in funcs}
    seen: set[str] = set()
    order: list[str] = []

    def visit(q: str, stack: tuple[str, ...]) -> None:
        if q in stack:
            raise ctx.error(f"recursive call cycle through {q}", funcs[q].node)
        if q in seen:
            return
        for callee in sorted(edges[q]):
            visit(callee, stack + (q,))
        seen.add(q)
        order.append(q)

    for root in roots:
        visit(root, ())
    return order[::-1]


def params_of(fn: Function) -> list[cst.Param]:
    params = [*fn.node.params.posonly_params, *fn.node.params.params]
    if fn.cls is not None and not _is_static(fn.node):
        params = params[1:]
    return params


def _is_static(node: cst.FunctionDef) -> bool:
    return any(m.matches(d.decorator, m.Name("staticmethod")) for d in node.decorators)


def bind(call: cst.Call, fn: Function) -> list[tuple[str | None, cst.Arg]] | None:
    """Each argument with the parameter it binds to: a name, ``"*args"``/``"**kwargs"`` for
    the callee's catch-alls, None when nothing takes it. None when the call cannot be
    bound statically (``*args`` at the call site)."""
    params = params_of(fn)
    names = [p.name.value for p in params]
    kwonly = {p.name.value for p in fn.node.params.kwonly_params}
    star = fn.node.params.star_arg
    star = f"*{star.name.value}" if isinstance(star, cst.Param) else None
    double = fn.node.params.star_kwarg
    double = f"**{double.name.value}" if double is not None else None
    out: list[tuple[str | None, cst.Arg]] = []
    pos = 0
    for arg in call.args:
        if arg.star == "*":
            return None
        if arg.star == "**":
            out.append((double, arg))
        elif arg.keyword is None:
            out.append((names[pos] if pos < len(names) else star, arg))
            pos += 1
        else:
            key = arg.keyword.value
            out.append((key if key in names or key in kwonly else double, arg))
    return out
