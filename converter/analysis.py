"""Analysis visitors: the ownership graph and the structural roles of a modeling file.

Roles are found by structure, never by attribute names:
- attention class: a class whose methods call the attention interface
  (``ALL_ATTENTION_FUNCTIONS.get_interface(...)`` / ``ALL_ATTENTION_FUNCTIONS[...]``);
- decoder stack: the ``nn.ModuleList`` whose element class transitively owns attention;
- base model: what the ``*ForCausalLM`` forward calls that transitively owns the stack.
"""

from __future__ import annotations

import ast
import builtins
from collections import deque

import libcst as cst
import libcst.matchers as m

from converter.context import Child, ClassInfo, ConversionContext

BUILTINS = frozenset(dir(builtins))
INTERFACE_REGISTRY = "ALL_ATTENTION_FUNCTIONS"
MODULE_LIST = m.Call(func=m.Attribute(attr=m.Name("ModuleList")) | m.Name("ModuleList"))


def dotted(node: cst.BaseExpression) -> str | None:
    """``self.model.decoder`` -> "self.model.decoder"; None for anything else."""
    if isinstance(node, cst.Name):
        return node.value
    if isinstance(node, cst.Attribute):
        base = dotted(node.value)
        return f"{base}.{node.attr.value}" if base else None
    return None


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


class _Finder(cst.CSTVisitor):
    def __init__(self, pred) -> None:
        self.pred = pred
        self.found: list[cst.CSTNode] = []

    def on_visit(self, node: cst.CSTNode) -> bool:
        if self.pred(node):
            self.found.append(node)
        return True


def find_all(node: cst.CSTNode, pred) -> list[cst.CSTNode]:
    finder = _Finder(pred)
    node.visit(finder)
    return finder.found


from converter.cstwalk import nodes_of  # noqa: E402  (re-exported for the passes)


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
    value: cst.BaseExpression, local: set[str]
) -> tuple[str, str | None, bool, cst.Call] | None:
    """(ctor code, local class, in_list, ctor call) for a module-constructing expression."""
    if not isinstance(value, cst.Call):
        return None
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


def line_index(source: str) -> dict[tuple[str, str], int]:
    """(enclosing def/class qualname, first code line of a statement) -> line, from
    Python's `ast` (cheap; LibCST positions cost a second pass over the code)."""
    lines = source.splitlines()
    index: dict[tuple[str, str], int] = {}

    def walk(node: ast.AST, scope: list[str]) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.stmt):
                key = lines[child.lineno - 1].strip()
                index.setdefault((".".join(scope), key), child.lineno)
                index.setdefault(("", key), child.lineno)
            if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                walk(child, scope + [child.name])
            else:
                walk(child, scope)

    walk(ast.parse(source), [])
    return index


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


def _ast_facts(source: str) -> dict[str, tuple[int, set[str], bool]]:
    """Per top-level class, from Python's `ast` (fast): line, config fields read
    (``config.X`` / ``self.config.X``), whether it looks up the attention interface."""
    facts = {}
    for node in ast.parse(source).body:
        if not isinstance(node, ast.ClassDef):
            continue
        reads: set[str] = set()
        interface = False
        for sub in ast.walk(node):
            if isinstance(sub, ast.Attribute):
                base = sub.value
                if (isinstance(base, ast.Name) and base.id == "config") or (
                    isinstance(base, ast.Attribute)
                    and base.attr == "config"
                    and isinstance(base.value, ast.Name)
                    and base.value.id == "self"
                ):
                    reads.add(sub.attr)
                if isinstance(base, ast.Name) and base.id == INTERFACE_REGISTRY:
                    interface = True
            elif isinstance(sub, ast.Subscript):
                if isinstance(sub.value, ast.Name) and sub.value.id == INTERFACE_REGISTRY:
                    interface = True
        facts[node.name] = (node.lineno, reads, interface)
    return facts


def _collect_classes(module: cst.Module, ctx: ConversionContext) -> dict[str, ClassInfo]:
    local = {s.name.value for s in module.body if isinstance(s, cst.ClassDef)}
    facts = _ast_facts(ctx.source_text)
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
        found = _child_of_assign(node.value, local)
        if found is None or attr in info.children:
            continue
        ctor, cls, in_list, call = found
        line = ctx.line_of(cst.SimpleStatementLine([node]), scope) or 0
        info.children[attr] = Child(attr, ctor, cls, in_list, call, line)


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
    symbols = top_level(module)
    ctx.module_symbols = set(symbols)
    ctx.functions = [s.name.value for s in module.body if isinstance(s, cst.FunctionDef)]
    ctx.line_index = line_index(ctx.source_text)
    ctx.classes = _collect_classes(module, ctx)
    _find_roles(module, ctx)


def _find_roles(module: cst.Module, ctx: ConversionContext) -> None:
    # transformers' causal-LM head naming: *ForCausalLM, older files *LMHeadModel (GPT-2)
    lms = [c for c in ctx.classes if c.endswith("ForCausalLM")] or [
        c for c in ctx.classes if c.endswith("LMHeadModel")
    ]
    if len(lms) != 1:
        raise ctx.error(
            f"expected exactly one *ForCausalLM class, found {lms or 'none'}",
            hint="convert a file with a single causal-LM head",
        )
    ctx.lm_class = lms[0]
    attention = [c for c, info in ctx.classes.items() if info.calls_attention_interface]
    attention = [c for c in attention if owns(ctx, ctx.lm_class, {c})]
    if not attention:
        raise ctx.error(
            "no attention class calls the attention interface (ALL_ATTENTION_FUNCTIONS)",
            line=ctx.classes[ctx.lm_class].line,
            hint="hand-written eager attention cores are not supported yet; extend converter/passes/attention.py",
        )
    ctx.attention_classes = attention
    targets = set(attention)
    stacks = [
        (cls, child)
        for cls, info in ctx.classes.items()
        for child in info.children.values()
        if child.in_list
        and child.cls
        and owns(ctx, child.cls, targets)
        and owns(ctx, ctx.lm_class, {cls})
    ]
    if len(stacks) != 1:
        found = [f"{c}.{ch.attr}" for c, ch in stacks]
        raise ctx.error(
            f"expected one ModuleList of decoder layers owning attention, found {found or 'none'}",
            line=ctx.classes[ctx.lm_class].line,
            hint="extend converter/analysis.py for this stack layout",
        )
    ctx.stack_class, stack_child = stacks[0]
    ctx.stack_attr = stack_child.attr
    ctx.decoder_layer_class = stack_child.cls or ""
    ctx.stack_path = tuple(_path_to(ctx, ctx.lm_class, ctx.stack_class)) + (ctx.stack_attr,)
    layer = ctx.classes[ctx.decoder_layer_class]
    direct = [c for c in layer.children.values() if c.cls in targets]
    ctx.attention_attr = direct[0].attr if direct else ""
    _find_base_model(module, ctx)
    _require_forwards(module, ctx)
    _find_helpers(ctx)


def _require_forwards(module: cst.Module, ctx: ConversionContext) -> None:
    """The passes rewrite the forward of every class on the LM -> attention path; one
    without its own forward (deleted, or inherited from a base) cannot be flattened."""
    roles = [ctx.base_model_class, ctx.stack_class, ctx.decoder_layer_class]
    for cls in dict.fromkeys(roles + ctx.attention_classes):
        if "forward" not in ctx.classes[cls].methods:
            node = next(
                s for s in module.body if isinstance(s, cst.ClassDef) and s.name.value == cls
            )
            raise ctx.error(
                f"{cls} has no forward method of its own",
                node,
                line=ctx.classes[cls].line,
                hint="define forward in the class (the passes rewrite it in place)",
            )


def _path_to(ctx: ConversionContext, start: str, goal: str) -> list[str]:
    queue: deque[tuple[str, list[str]]] = deque([(start, [])])
    seen = {start}
    while queue:
        cls, path = queue.popleft()
        if cls == goal:
            return path
        for child in ctx.classes[cls].children.values():
            if child.cls and not child.in_list and child.cls not in seen:
                seen.add(child.cls)
                queue.append((child.cls, path + [child.attr]))
    raise ctx.error(f"{goal} is not reachable from {start} through __init__ attributes")


def _find_base_model(module: cst.Module, ctx: ConversionContext) -> None:
    lm = next(
        s for s in module.body if isinstance(s, cst.ClassDef) and s.name.value == ctx.lm_class
    )
    forward = methods_of(lm).get("forward")
    if forward is None:
        raise ctx.error(f"{ctx.lm_class} has no forward", lm)
    for call in nodes_of(forward, cst.Call):
        name = dotted(call.func) or ""
        parts = name.split(".")
        if parts[0] != "self" or len(parts) < 2:
            continue
        cls = child_class(ctx, ctx.lm_class, parts[1:])
        if cls and owns(ctx, cls, {ctx.stack_class}):
            ctx.base_model_path = tuple(parts[1:])
            ctx.base_model_attr = parts[1]
            ctx.base_model_class = cls
            return
    raise ctx.error(
        f"{ctx.lm_class}.forward calls no base model owning {ctx.stack_class}",
        forward,
        hint="extend converter/analysis.py",
    )


def _find_helpers(ctx: ConversionContext) -> None:
    """Informational roles (C2's TP pass and the report): MLP, norms, rotary."""
    attention = set(ctx.attention_classes)
    for name, info in ctx.classes.items():
        locals_owned = [c for c in info.children.values() if c.cls]
        if info.param_attrs and not locals_owned and not info.children:
            ctx.norm_classes.append(name)
    layer = ctx.classes[ctx.decoder_layer_class]
    for child in layer.children.values():
        if child.cls and child.cls not in attention and child.cls not in ctx.norm_classes:
            if ctx.classes[child.cls].children:
                ctx.mlp_classes.append(child.cls)
    for child in ctx.classes[ctx.stack_class].children.values():
        if child.cls and child.cls not in ctx.norm_classes and not child.in_list:
            # rotary: fed the positions (HF's universal `position_ids` argument name)
            if "position_ids" in ctx.classes[child.cls].forward_params:
                ctx.rotary_classes.append(child.cls)
