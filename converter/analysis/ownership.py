"""The ownership graph of a modeling file: which class constructs which child module
(``self.x = Cls(...)``, ``nn.ModuleList([Cls(...) ...])``, dispatch tables), and the
queries over it (`owns`, `child_class`, `forward_owner`)."""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from converter.analysis.ast_facts import class_facts
from converter.analysis.dispatch import dispatch_tables
from converter.context import Child, ClassInfo, ConversionContext
from converter.cst_helpers import code, dotted, flat_statements, methods_of, self_attr

MODULE_LIST = m.Call(func=m.Attribute(attr=m.Name("ModuleList")) | m.Name("ModuleList"))


def _child_of_assign(
    value: cst.BaseExpression, local: set[str], dispatch: dict[str, str]
) -> tuple[str, str | None, bool, cst.Call] | None:
    """(ctor code, local class, in_list, ctor call) for a module-constructing expression."""
    if isinstance(value, cst.IfExp):  # `A(c) if x else B(c)`: the first arm's (see Child)
        arms = [_child_of_assign(v, local, dispatch) for v in (value.body, value.orelse)]
        arms = [a for a in arms if a is not None]
        return arms[0] if any(a[1] for a in arms) else None  # local classes only
    if not isinstance(value, cst.Call):
        return None
    if isinstance(value.func, cst.Subscript) and dotted(value.func.value) in dispatch:
        return (cls := dispatch[dotted(value.func.value)]), cls, False, value  # TABLE[key](..)
    ctor = dotted(value.func)
    if ctor is None:
        return None
    if m.matches(value, MODULE_LIST) and value.args:
        inner = value.args[0].value
        if isinstance(inner, (cst.ListComp, cst.List)):
            elt = (
                inner.elt
                if isinstance(inner, cst.ListComp)
                else (inner.elements[0].value if inner.elements else None)
            )
            if isinstance(elt, cst.Call) and dotted(elt.func):
                name = dotted(elt.func)
                return name, name if name in local else None, True, elt
    return ctor, ctor if ctor in local else None, False, value


def collect_classes(module: cst.Module, ctx: ConversionContext) -> dict[str, ClassInfo]:
    local = {s.name.value for s in module.body if isinstance(s, cst.ClassDef)}
    facts = class_facts(ctx.source_text)
    ctx.dispatch = dispatch_tables(module)
    classes: dict[str, ClassInfo] = {}
    for node in module.body:
        if not isinstance(node, cst.ClassDef):
            continue
        name = node.name.value
        line, reads, interface = facts[name]
        methods = methods_of(node)
        bases = [code(a.value) for a in node.bases]
        info = ClassInfo(name, bases, {}, list(methods), line, interface)
        info.config_reads = reads
        if "forward" in methods:
            info.forward_params = [p.name.value for p in methods["forward"].params.params]
        init = methods.get("__init__")
        for small in flat_statements(init.body.body) if init else []:
            if isinstance(small, cst.Assign):
                _record_child(ctx, info, small, local, f"{name}.__init__")
            elif isinstance(small, cst.Expr):
                _record_append(info, small.value, local)
        classes[name] = info
    return classes


def _record_child(ctx, info: ClassInfo, node: cst.Assign, local: set[str], scope: str) -> None:
    for target in node.targets:
        attr = self_attr(target.target)
        if attr is None:
            continue
        if m.matches(node.value, m.Call(func=m.Attribute(attr=m.Name("Parameter")))):
            info.param_attrs.append(attr)
            continue
        found = _child_of_assign(node.value, local, ctx.dispatch)
        if found is None:
            continue
        ctor, cls, in_list, call = found
        arms = (node.value.body, node.value.orelse) if isinstance(node.value, cst.IfExp) else ()
        others = [
            c
            for c in (_child_of_assign(v, local, ctx.dispatch) for v in arms)
            if c is not None and c[1] is not None
        ]
        if attr in info.children:  # another arm's assignment: an alternative class
            child = info.children[attr]
            new = {c for c in [cls, *(o[1] for o in others)] if c} - set(child.classes)
            child.alternatives += tuple(sorted(new))
            continue
        line = ctx.line_of(cst.SimpleStatementLine([node]), scope) or 0
        alternatives = tuple(sorted({o[1] for o in others} - {cls}))
        info.children[attr] = Child(attr, ctor, cls, in_list, call, line, alternatives)


def _record_append(info: ClassInfo, value: cst.BaseExpression, local: set[str]) -> None:
    """``self.<list>.append(Cls(...))`` into an ``nn.ModuleList()`` built empty (granite_swa's
    per-theta rotary embeddings): the list's element class is ``Cls``."""
    if not m.matches(value, m.Call(func=m.Attribute(attr=m.Name("append")), args=[m.Arg()])):
        return
    child = info.children.get(self_attr(value.func.value) or "")
    elt = value.args[0].value
    if child is None or child.cls or child.call.args or not m.matches(child.call, MODULE_LIST):
        return
    if isinstance(elt, cst.Call) and dotted(elt.func) in local:
        name = dotted(elt.func)
        info.children[child.attr] = Child(child.attr, name, name, True, elt, child.line)


def owns(ctx: ConversionContext, cls: str, target: set[str], seen: set[str] | None = None) -> bool:
    """Does `cls` (or anything it owns, transitively) belong to `target`?"""
    if cls in target:
        return True
    seen = seen if seen is not None else set()
    if cls in seen or cls not in ctx.classes:
        return False
    seen.add(cls)
    return any(
        owns(ctx, child_cls, target, seen)
        for c in ctx.classes[cls].children.values()
        for child_cls in c.classes
    )


def child_class(ctx: ConversionContext, cls: str, path: list[str]) -> str | None:
    """Follow ``a.b`` attributes from `cls` through the ownership graph."""
    for attr in path:
        info = ctx.classes.get(cls)
        child = info.children.get(attr) if info else None
        if child is None or child.cls is None:
            return None
        cls = child.cls
    return cls


def forward_owner(ctx: ConversionContext, cls: str, method: str = "forward") -> str | None:
    """The local class (`cls` or a local base) defining `method`."""
    seen = set()
    while cls in ctx.classes and cls not in seen:
        seen.add(cls)
        info = ctx.classes[cls]
        if method in info.methods:
            return cls
        local_bases = [b for b in info.bases if b in ctx.classes]
        if not local_bases:
            return None
        cls = local_bases[0]
    return None
