"""Stage strip: training- and API-only code, as listed in ``rules/training.toml``.

- decorators: `strip` ones go, `keep` ones stay, an unknown one stops the conversion;
- dropout: ``nn.Dropout`` attributes (found in the ownership graph) and their calls,
  functional dropout (-> its input), ``dropout_add(x, r, ...)`` -> ``(x + r)``;
- ``**kwargs`` parameters of every ``forward`` (the plumbing; prune drops their uses);
- ``return SomeOutput(field=expr, ...)`` -> ``return expr`` for output dataclasses, and
  the forward return annotations naming them;
- identity calls (``slice_logits_to_keep(h, n)`` -> ``h``), None calls (HF's attention-mask
  builders); listed ``self.<attr> =`` stores.
Labels/loss, caches, masks and output flags are left to the dataflow pruner.
"""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from converter.context import ConversionContext
from converter.cst_helpers import code, dotted, names_read, nodes_of, self_attr


def _decorator_name(dec: cst.Decorator) -> str:
    expr = dec.decorator.func if isinstance(dec.decorator, cst.Call) else dec.decorator
    return dotted(expr) or code(expr)


class _Strip(cst.CSTTransformer):
    def __init__(self, ctx: ConversionContext, output_names: set[str]) -> None:
        rules = ctx.rules.get("training", {})
        self.ctx = ctx
        self.strip = set(rules.get("decorators", {}).get("strip", []))
        self.keep = set(rules.get("decorators", {}).get("keep", []))
        calls = rules.get("calls", {})
        self.identity = set(calls.get("identity", [])) | set(calls.get("identity_functions", []))
        self.adds = set(calls.get("add_functions", []))
        self.nones = set(calls.get("none_functions", []))
        self.unsupported: dict[str, str] = calls.get("unsupported_functions", {})
        modules = set(calls.get("identity_modules", []))
        self.fields = rules.get("outputs", {}).get("fields", [])
        self.drop_attrs = set(rules.get("attributes", {}).get("drop", []))
        self.output_names = output_names
        self.dropout_attrs: dict[str, set[str]] = {
            cls: {a for a, c in info.children.items() if c.ctor in modules}
            for cls, info in ctx.classes.items()
        }
        self.cls: list[str] = []
        self.func: list[str] = []

    # --- scopes ---
    def visit_ClassDef(self, node: cst.ClassDef) -> None:
        self.cls.append(node.name.value)

    def leave_ClassDef(self, original: cst.ClassDef, updated: cst.ClassDef) -> cst.ClassDef:
        self.cls.pop()
        if original.name.value in self.output_names:
            # an output dataclass (@dataclass, docs): every `return X(...)` is unwrapped,
            # so the class goes unused and the pruner removes it with its decorators
            return updated
        return updated.with_changes(decorators=self._decorators(original, updated.decorators))

    def visit_FunctionDef(self, node: cst.FunctionDef) -> None:
        self.func.append(node.name.value)

    def leave_FunctionDef(
        self, original: cst.FunctionDef, updated: cst.FunctionDef
    ) -> cst.FunctionDef:
        self.func.pop()
        changes: dict = {"decorators": self._decorators(original, updated.decorators)}
        if original.name.value == "forward" and self.cls and not self.func:
            if updated.params.star_kwarg is not None:
                params = [
                    p.with_changes(comma=cst.MaybeSentinel.DEFAULT) for p in updated.params.params
                ]
                changes["params"] = updated.params.with_changes(star_kwarg=None, params=params)
                self.ctx.kwargs_stripped.add(f"{self.cls[-1]}.forward")
            if updated.returns is not None and names_read(updated.returns) & self.output_names:
                changes["returns"] = None
        return updated.with_changes(**changes)

    def _decorators(self, node: cst.CSTNode, decorators) -> list[cst.Decorator]:
        kept = []
        for dec in decorators:
            name = _decorator_name(dec)
            if name in self.strip:
                continue
            if name not in self.keep:
                raise self.ctx.error(
                    f"unknown decorator @{name}",
                    node,
                    hint="list it under [decorators] strip or keep in rules/training.toml",
                )
            kept.append(dec)
        return kept

    # --- statements ---
    def leave_SimpleStatementLine(self, original, updated):
        body = []
        for small in updated.body:
            if m.matches(small, m.Assign([m.AssignTarget(m.Name())], m.Name())) and (
                small.targets[0].target.value == small.value.value
            ):
                continue  # `x = x`, left by an identity (dropout) replacement
            if isinstance(small, cst.Assign) and len(small.targets) == 1:
                attr = self_attr(small.targets[0].target)
                cls = self.cls[-1] if self.cls else ""
                if attr is not None and (
                    attr in self.drop_attrs or attr in self.dropout_attrs.get(cls, ())
                ):
                    continue
            body.append(small)
        if not body:
            return cst.RemoveFromParent()
        return updated.with_changes(body=body)

    def leave_Return(self, original: cst.Return, updated: cst.Return) -> cst.Return:
        value = updated.value
        if isinstance(value, cst.Call) and dotted(value.func) in self.output_names:
            by_name = {a.keyword.value: a.value for a in value.args if a.keyword is not None}
            for name in self.fields:
                if name in by_name:
                    return updated.with_changes(value=by_name[name])
            raise self.ctx.error(
                f"output dataclass return without any of the fields {self.fields}",
                original,
                hint="extend [outputs] fields in rules/training.toml",
            )
        return updated

    def leave_Call(self, original: cst.Call, updated: cst.Call) -> cst.BaseExpression:
        name = dotted(updated.func)
        cls = self.cls[-1] if self.cls else ""
        attr = self_attr(updated.func)
        positional = [a for a in updated.args if a.keyword is None and not a.star]
        if attr is not None and attr in self.dropout_attrs.get(cls, ()) and positional:
            return positional[0].value
        if name in self.identity and positional:
            return positional[0].value
        if name in self.unsupported:
            raise self.ctx.error(
                f"{name}(...): {self.unsupported[name]}",
                original,
                line=_line_of_call(self.ctx, name),
                hint="not supported yet (rules/training.toml [calls.unsupported_functions])",
            )
        if name in self.nones:
            return cst.Name("None")
        if name in self.adds and len(positional) >= 2:
            lhs, rhs = positional[0].value, positional[1].value
            return cst.BinaryOperation(
                lhs, cst.Add(), rhs, lpar=[cst.LeftParen()], rpar=[cst.RightParen()]
            )
        return updated


def _line_of_call(ctx: ConversionContext, name: str) -> int | None:
    """The source line of the first call of `name` (a call inside an expression has no
    statement of its own for `ctx.line_of`)."""
    for number, text in enumerate(ctx.source_text.splitlines(), 1):
        if f"{name}(" in text and not text.lstrip().startswith(("#", "from ", "import ")):
            return number
    return None


def output_names(module: cst.Module, ctx: ConversionContext) -> set[str]:
    """Names imported from the output-dataclass modules."""
    modules = set(ctx.rules.get("training", {}).get("outputs", {}).get("modules", []))
    found: set[str] = set()
    for stmt in module.body:
        if m.matches(stmt, m.SimpleStatementLine(body=[m.ImportFrom()])):
            imp = stmt.body[0]
            if imp.module is not None and dotted(imp.module) in modules:
                if not isinstance(imp.names, cst.ImportStar):
                    found |= {
                        (a.asname.name.value if a.asname else dotted(a.name)) for a in imp.names
                    }
    # Local subclasses (`class CwmModelOutputWithPast(BaseModelOutputWithPast): pass`) are
    # output dataclasses too; classes come in source order, so one walk sees their bases.
    for stmt in module.body:
        if isinstance(stmt, cst.ClassDef) and any(dotted(b.value) in found for b in stmt.bases):
            found.add(stmt.name.value)
    return found


def _needs_visit(strip: _Strip, cls: str, func: cst.FunctionDef) -> bool:
    """Whether a def holds anything the transformer rewrites (checked with the fast walker)."""
    dropout = strip.dropout_attrs.get(cls, set())
    for node in nodes_of(func.body, cst.Call, cst.Return, cst.Assign):
        if isinstance(node, cst.Call):
            name = dotted(node.func)
            rewritten = strip.identity | strip.adds | strip.nones | set(strip.unsupported)
            if name in rewritten or self_attr(node.func) in dropout:
                return True
        elif isinstance(node, cst.Return):
            if isinstance(node.value, cst.Call) and dotted(node.value.func) in strip.output_names:
                return True
        elif any(self_attr(t.target) in (dropout | strip.drop_attrs) for t in node.targets):
            return True
    return False


def _strip_def(strip: _Strip, cls: str, func: cst.FunctionDef) -> cst.FunctionDef:
    if _needs_visit(strip, cls, func):
        return func.visit(strip)
    strip.visit_FunctionDef(func)
    return strip.leave_FunctionDef(func, func)


def run(module: cst.Module, ctx: ConversionContext) -> cst.Module:
    strip = _Strip(ctx, output_names(module, ctx))
    body = []
    for stmt in module.body:  # defs and classes only; a deep visit only where needed
        if isinstance(stmt, cst.ClassDef) and isinstance(stmt.body, cst.IndentedBlock):
            cls = stmt.name.value
            strip.visit_ClassDef(stmt)
            inner = [
                _strip_def(strip, cls, s) if isinstance(s, cst.FunctionDef) else s
                for s in stmt.body.body
            ]
            stmt = strip.leave_ClassDef(
                stmt, stmt.with_changes(body=stmt.body.with_changes(body=inner))
            )
        elif isinstance(stmt, cst.FunctionDef):
            stmt = _strip_def(strip, "", stmt)
        body.append(stmt)
    return module.with_changes(body=body)
