"""Stage select: keep the ``*ForCausalLM`` class and what it needs; drop the rest.

- Records the HF model machinery's class attributes (``base_model_prefix``,
  ``_tied_weights_keys``, ``_checkpoint_conversion_mapping``, ``_tp_plan``, ...) into ctx
  BEFORE the ``*PreTrainedModel`` class goes.
- Bases listed in ``rules/training.toml [bases]`` (and local subclasses of them) become
  ``nn.Module``; ``super().__init__(config)`` -> ``super().__init__()`` + ``self.config =
  config``; ``self.post_init()`` and class-level HF attributes are dropped.
- Methods: ``__init__``, ``forward``, ``extra_repr`` and what they reach through
  ``self.<name>``; module level: the dependency closure of the LM class (`shake`).
- Docstrings go.
"""

from __future__ import annotations

import ast

import libcst as cst
import libcst.matchers as m

from converter.analysis.dispatch import resolve_constructions
from converter.context import ConversionContext
from converter.cst_helpers import (
    bound_names,
    code,
    dotted,
    methods_of,
    names_read,
    nodes_of,
    reachable_methods,
)
from converter.hf.tables import config_model_type

KEPT_METHODS = ("__init__", "forward", "extra_repr")
HF_ATTRS = {
    "base_model_prefix": "base_model_prefix",
    "_tied_weights_keys": "tied_weights_keys",
    "_checkpoint_conversion_mapping": "checkpoint_conversion_mapping",
    "_tp_plan": "tp_plan",
    "_keys_to_ignore_on_load_unexpected": "keys_to_ignore_on_load_unexpected",
    "_keys_to_ignore_on_load_missing": "keys_to_ignore_on_load_missing",
}
SUPER_INIT = m.Call(func=m.Attribute(value=m.Call(func=m.Name("super")), attr=m.Name("__init__")))
SELF_CONFIG = m.SimpleStatementLine(
    body=[m.Assign(targets=[m.AssignTarget(m.Attribute(m.Name("self"), m.Name("config")))])]
)
POST_INIT = m.SimpleStatementLine(
    body=[m.Expr(value=m.Call(func=m.Attribute(value=m.Name("self"), attr=m.Name("post_init"))))]
)


def shake(module: cst.Module, roots: set[str]) -> cst.Module:
    """Keep module-level statements binding a name in the closure of `roots` (plus
    imports, which ruff prunes later); drop everything else (``__all__``, other heads)."""
    binders: dict[str, list[int]] = {}
    for i, stmt in enumerate(module.body):
        for name in bound_names(stmt):
            binders.setdefault(name, []).append(i)
    keep: set[int] = set()
    work = list(roots)
    seen: set[str] = set()
    while work:
        name = work.pop()
        if name in seen:
            continue
        seen.add(name)
        for i in binders.get(name, []):
            if i not in keep:
                keep.add(i)
                work.extend(names_read(module.body[i]) - seen)
    body = []
    for i, stmt in enumerate(module.body):
        is_import = m.matches(stmt, m.SimpleStatementLine(body=[m.Import() | m.ImportFrom()]))
        if i in keep or is_import:
            body.append(stmt)
    return module.with_changes(body=body)


def _literal(node: cst.BaseExpression):
    try:
        return ast.literal_eval(code(node))
    except (ValueError, SyntaxError):
        return None


def record_hf_attrs(module: cst.Module, ctx: ConversionContext, family: list[str]) -> None:
    """Literal class attributes of the PreTrainedModel family, LM class last (it wins)."""
    classes = {s.name.value: s for s in module.body if isinstance(s, cst.ClassDef)}
    order = [c for c in family if c != ctx.lm_class] + [ctx.lm_class]
    for name in order:
        node = classes[name]
        for stmt in node.body.body:
            if not isinstance(stmt, cst.SimpleStatementLine):
                continue
            for small in stmt.body:
                if isinstance(small, cst.Assign) and len(small.targets) == 1:
                    target, value = small.targets[0].target, small.value
                elif isinstance(small, cst.AnnAssign) and small.value is not None:
                    target, value = small.target, small.value
                else:
                    continue
                if isinstance(target, cst.Name):
                    val = _literal(value)
                    if val is not None and (
                        name == ctx.lm_class or target.value not in ctx.hf_attrs
                    ):
                        ctx.hf_attrs[target.value] = val
    for attr, field_name in HF_ATTRS.items():
        if attr in ctx.hf_attrs:
            val = ctx.hf_attrs[attr]
            if attr == "_tied_weights_keys" and isinstance(val, list):
                val = {k: "" for k in val}  # older list form: targets unknown
            setattr(ctx, field_name, val)


def record_config_class(module: cst.Module, ctx: ConversionContext) -> None:
    """The LM class's config class (``def __init__(self, config: XConfig)``) and its
    ``model_type`` (read from the configuration file; the source's type when absent)."""
    for stmt in module.body:
        if isinstance(stmt, cst.ClassDef) and stmt.name.value == ctx.lm_class:
            init = methods_of(stmt).get("__init__")
            params = init.params.params[1:] if init else ()
            note = params[0].annotation if params and params[0].annotation else None
            ctx.config_class = dotted(note.annotation) or "" if note else ""
    ctx.config_model_type = (
        config_model_type(ctx.model_type, ctx.config_class) or ctx.model_type
        if ctx.config_class
        else ctx.model_type
    )


def hf_family(ctx: ConversionContext) -> list[str]:
    """Local classes deriving (transitively) from a `to_module` base such as PreTrainedModel."""
    roots = set(ctx.rules.get("training", {}).get("bases", {}).get("to_module", []))
    pretrained = {r for r in roots if r.endswith("PreTrainedModel")}
    family: list[str] = []
    changed = True
    while changed:
        changed = False
        for name, info in ctx.classes.items():
            if name in family:
                continue
            if any(b.split(".")[-1] in pretrained or b in family for b in info.bases):
                family.append(name)
                changed = True
    return family


def child_method_calls(module: cst.Module, ctx: ConversionContext) -> dict[str, set[str]]:
    """{class: methods other classes call on an owned instance}: `self.altup.predict(x)`
    in gemma3n's decoder layer keeps `Gemma3nTextAltUp.predict`."""
    found: dict[str, set[str]] = {}
    for stmt in module.body:
        info = ctx.classes.get(stmt.name.value) if isinstance(stmt, cst.ClassDef) else None
        if info is None:
            continue
        for call in nodes_of(stmt.body, cst.Call):
            func = call.func
            if not (isinstance(func, cst.Attribute) and isinstance(func.value, cst.Attribute)):
                continue
            if not m.matches(func.value.value, m.Name("self")):
                continue
            child = info.children.get(func.value.attr.value)
            if child is not None and child.cls is not None:
                found.setdefault(child.cls, set()).add(func.attr.value)
    return found


class _Select:
    """Class- and method-level rewrites, driven over the top-level statements by `run`."""

    def __init__(self, ctx: ConversionContext, family: list[str]) -> None:
        self.ctx = ctx
        self.family = set(family)
        bases = ctx.rules.get("training", {}).get("bases", {})
        self.to_module = set(bases.get("to_module", [])) | self.family
        self.drop = set(bases.get("drop", []))
        self.depth = 0
        self.in_family = False
        self.called: dict[str, set[str]] = {}

    def visit_ClassDef(self, node: cst.ClassDef) -> None:
        self.depth += 1
        if self.depth == 1:
            self.in_family = node.name.value in self.family

    def leave_ClassDef(self, original: cst.ClassDef, updated: cst.ClassDef) -> cst.ClassDef:
        self.depth -= 1
        if self.depth:
            return updated
        in_family = original.name.value in self.family
        bases, has_module = [], False
        for arg in updated.bases:
            name = code(arg.value).split(".")[-1]
            if name in self.drop:
                continue
            if name in self.to_module or code(arg.value) in self.to_module:
                if has_module:
                    continue
                arg = arg.with_changes(value=cst.parse_expression("nn.Module"))
                has_module = True
            bases.append(arg.with_changes(comma=cst.MaybeSentinel.DEFAULT))
        body = list(updated.body.body)
        body = [s for s in body if not _is_docstring(s)]
        if in_family:  # HF class attributes were recorded in ctx; the model machinery goes
            body = [s for s in body if not isinstance(s, cst.SimpleStatementLine)]
        methods = {s.name.value: s for s in body if isinstance(s, cst.FunctionDef)}
        roots = {n for n in KEPT_METHODS if n in methods}
        roots |= self.called.get(original.name.value, set()) & set(methods)
        keep = reachable_methods(methods, roots)
        body = [s for s in body if not isinstance(s, cst.FunctionDef) or s.name.value in keep]
        if not body:
            body = [cst.SimpleStatementLine([cst.Pass()])]
        parens = (
            {} if bases else {"lpar": cst.MaybeSentinel.DEFAULT, "rpar": cst.MaybeSentinel.DEFAULT}
        )
        return updated.with_changes(
            bases=bases, body=updated.body.with_changes(body=body), **parens
        )

    def leave_FunctionDef(
        self, original: cst.FunctionDef, updated: cst.FunctionDef
    ) -> cst.FunctionDef:
        if not isinstance(updated.body, cst.IndentedBlock):
            return updated
        body = [s for s in updated.body.body if not _is_docstring(s)]
        if original.name.value == "__init__":
            body = self._fix_init(body)
        if not body:
            body = [cst.SimpleStatementLine([cst.Pass()])]
        return updated.with_changes(body=updated.body.with_changes(body=body))

    def _fix_init(self, body: list[cst.BaseStatement]) -> list[cst.BaseStatement]:
        out: list[cst.BaseStatement] = []
        stores_config = any(m.matches(s, SELF_CONFIG) for s in body)  # GPT-NeoX's own store
        for stmt in body:
            if m.matches(stmt, POST_INIT):
                continue
            call = _super_init_call(stmt)
            # only the HF family's __init__(config); e.g. nn.Embedding subclasses keep args
            if call is not None and len(call.args) == 1 and self.in_family:
                first = call.args[0].value
                out.append(stmt.with_changes(body=[cst.Expr(call.with_changes(args=[]))]))
                out += (
                    []
                    if stores_config
                    else [
                        cst.SimpleStatementLine(
                            [
                                cst.Assign(
                                    [cst.AssignTarget(cst.parse_expression("self.config"))], first
                                )
                            ]
                        )
                    ]
                )
                continue
            out.append(stmt)
        return out


def _super_init_call(stmt: cst.BaseStatement) -> cst.Call | None:
    if m.matches(stmt, m.SimpleStatementLine(body=[m.Expr(value=SUPER_INIT)])):
        return stmt.body[0].value
    return None


def _is_docstring(stmt: cst.CSTNode) -> bool:
    return m.matches(
        stmt, m.SimpleStatementLine(body=[m.Expr(value=m.SimpleString() | m.ConcatenatedString())])
    )


def run(module: cst.Module, ctx: ConversionContext) -> cst.Module:
    family = hf_family(ctx)
    record_hf_attrs(module, ctx, family)
    record_config_class(module, ctx)
    sel = _Select(ctx, family)
    sel.called = child_method_calls(module, ctx)
    body = []
    for stmt in module.body:  # top-level structure only: no deep visit needed
        if isinstance(stmt, cst.ClassDef) and isinstance(stmt.body, cst.IndentedBlock):
            sel.in_family, sel.depth = stmt.name.value in sel.family, 1
            inner = [
                sel.leave_FunctionDef(s, s) if isinstance(s, cst.FunctionDef) else s
                for s in stmt.body.body
            ]
            stmt = sel.leave_ClassDef(
                stmt, stmt.with_changes(body=stmt.body.with_changes(body=inner))
            )
        elif isinstance(stmt, cst.FunctionDef):
            stmt = sel.leave_FunctionDef(stmt, stmt)
        elif _is_docstring(stmt):
            continue
        body.append(stmt)
    # `TABLE[key](...)` constructions -> the class analysis chose; the table then goes
    module = resolve_constructions(module.with_changes(body=body), ctx.dispatch)
    return shake(module, {ctx.lm_class})
