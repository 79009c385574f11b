"""Analysis visitors: the ownership graph and the structural roles of a modeling file.

Roles are found by structure, never by attribute names:
- attention class: a class whose methods call the attention interface
  (``ALL_ATTENTION_FUNCTIONS.get_interface(...)`` / ``ALL_ATTENTION_FUNCTIONS[...]``);
- decoder stack: the ``nn.ModuleList`` whose element class transitively owns attention;
- base model: what the ``*ForCausalLM`` forward calls that transitively owns the stack.
"""

from __future__ import annotations

import builtins

import libcst as cst
import libcst.matchers as m

from converter.ast_facts import INTERFACE_REGISTRY, class_facts, line_index
from converter.context import Child, ClassInfo, ConversionContext
from converter.cstwalk import dotted, nodes_of
from converter.dispatch import dispatch_tables

BUILTINS = frozenset(dir(builtins))
MODULE_LIST = m.Call(func=m.Attribute(attr=m.Name("ModuleList")) | m.Name("ModuleList"))


def self_attr(node: cst.BaseExpression) -> str | None:
    """``self.x`` -> "x"."""
    if m.matches(node, m.Attribute(value=m.Name("self"), attr=m.Name())):
        return node.attr.value
    return None


def is_interface_lookup(node: cst.CSTNode) -> bool:
    """``ALL_ATTENTION_FUNCTIONS.get_interface(...)`` or ``ALL_ATTENTION_FUNCTIONS[...]``."""
    if isinstance(node, cst.Call):
        name = dotted(node.func) or ""
        return name.split(".")[0] == INTERFACE_REGISTRY
    if isinstance(node, cst.Subscript):
        return dotted(node.value) == INTERFACE_REGISTRY
    return False


def find_all(node: cst.CSTNode, pred) -> list[cst.CSTNode]:
    """Every node under `node` (itself included) satisfying `pred`; see `cstwalk`."""
    return [n for n in nodes_of(node, cst.CSTNode) if pred(n)]


def methods_of(cls: cst.ClassDef) -> dict[str, cst.FunctionDef]:
    body = cls.body.body if isinstance(cls.body, cst.IndentedBlock) else []
    return {s.name.value: s for s in body if isinstance(s, cst.FunctionDef)}


def top_level(module: cst.Module) -> dict[str, cst.CSTNode]:
    """Module-level name -> the statement that binds it (classes, defs, assignments, imports)."""
    out: dict[str, cst.CSTNode] = {}
    for stmt in module.body:
        for name in bound_names(stmt):
            out.setdefault(name, stmt)
    return out


def bound_names(stmt: cst.CSTNode) -> list[str]:
    if isinstance(stmt, (cst.ClassDef, cst.FunctionDef)):
        return [stmt.name.value]
    names: list[str] = []
    if isinstance(stmt, cst.SimpleStatementLine):
        for small in stmt.body:
            if isinstance(small, (cst.Import, cst.ImportFrom)) and not isinstance(
                small.names, cst.ImportStar
            ):
                for alias in small.names:
                    if alias.asname is not None:
                        names.append(alias.asname.name.value)
                    else:
                        names.append((dotted(alias.name) or "").split(".")[0])
            elif isinstance(small, cst.Assign):
                for target in small.targets:
                    names += _target_names(target.target)
            elif isinstance(small, cst.AnnAssign):
                names += _target_names(small.target)
    elif isinstance(stmt, (cst.If, cst.Try)):
        for sub in _child_blocks(stmt):
            for inner in sub:
                names += bound_names(inner)
    return names


def _target_names(target: cst.BaseExpression) -> list[str]:
    if isinstance(target, cst.Name):
        return [target.value]
    if isinstance(target, (cst.Tuple, cst.List)):
        out: list[str] = []
        for el in target.elements:
            out += _target_names(el.value)
        return out
    return []


def _child_blocks(stmt: cst.CSTNode) -> list[list[cst.CSTNode]]:
    blocks: list[list[cst.CSTNode]] = []
    if isinstance(stmt, cst.If):
        blocks.append(list(stmt.body.body))
        if stmt.orelse is not None:
            orelse = stmt.orelse
            blocks.append([orelse] if isinstance(orelse, cst.If) else list(orelse.body.body))
    elif isinstance(stmt, cst.Try):
        blocks.append(list(stmt.body.body))
        for handler in stmt.handlers:
            blocks.append(list(handler.body.body))
    return blocks


def _child_of_assign(
    value: cst.BaseExpression, local: set[str], dispatch: dict[str, str]
) -> tuple[str, str | None, bool, cst.Call] | None:
    """(ctor code, local class, in_list, ctor call) for a module-constructing expression."""
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


def flat_statements(body) -> list[cst.BaseSmallStatement]:
    """Small statements of a block, descending into if/else/for/with/try (no visitor)."""
    out: list[cst.BaseSmallStatement] = []
    for stmt in body:
        if isinstance(stmt, cst.SimpleStatementLine):
            out += stmt.body
            continue
        for block in _child_blocks(stmt) or (
            [list(stmt.body.body)] if isinstance(getattr(stmt, "body", None), cst.BaseSuite) else []
        ):
            out += flat_statements(block)
    return out


def _collect_classes(module: cst.Module, ctx: ConversionContext) -> dict[str, ClassInfo]:
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
        bases = [cst.Module(body=[]).code_for_node(a.value) for a in node.bases]
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
        if found is None or attr in info.children:
            continue
        ctor, cls, in_list, call = found
        line = ctx.line_of(cst.SimpleStatementLine([node]), scope) or 0
        info.children[attr] = Child(attr, ctor, cls, in_list, call, line)


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
        c.cls is not None and owns(ctx, c.cls, target, seen)
        for c in ctx.classes[cls].children.values()
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


def analyze(module: cst.Module, ctx: ConversionContext) -> None:
    """Fill the ownership graph, module symbols, line index and roles of `ctx`."""
    ctx.module_symbols = set(top_level(module))
    ctx.functions = [s.name.value for s in module.body if isinstance(s, cst.FunctionDef)]
    ctx.line_index = line_index(ctx.source_text)
    ctx.classes = _collect_classes(module, ctx)
    from converter.roles import find_roles  # roles build on this module's helpers

    find_roles(module, ctx)
