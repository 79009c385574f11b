"""Stage imports: relative imports -> absolute (`from ...utils import X` -> `from transformers.utils import X`).

Generated modules live outside transformers, so every relative import must name its
package. ``from ... import initialization as init`` has no module part: it becomes
``from transformers import initialization as init``. Unused imports are left to ruff.
A source outside transformers (a model directory's own code) keeps its one-dot imports
of the modules beside it (`ctx.local_modules`): they are written beside the generated
module (converter/hf/local.py).
"""

from __future__ import annotations

import libcst as cst

from converter.context import ConversionContext
from converter.cst_helpers import dotted


def absolute_module(package: str, dots: int, module: str | None) -> str:
    """``("transformers.models.llama", 3, "utils")`` -> ``"transformers.utils"``."""
    parts = package.split(".")
    if dots - 1 > len(parts) - 1:
        raise ValueError(f"relative import climbs above {package!r}")
    base = parts[: len(parts) - (dots - 1)]
    return ".".join(base + ([module] if module else []))


def _module_expr(name: str) -> cst.Attribute | cst.Name:
    parts = name.split(".")
    expr: cst.Attribute | cst.Name = cst.Name(parts[0])
    for part in parts[1:]:
        expr = cst.Attribute(value=expr, attr=cst.Name(part))
    return expr


class _Absolute(cst.CSTTransformer):
    def __init__(self, ctx: ConversionContext) -> None:
        self.ctx = ctx

    def leave_ImportFrom(self, original: cst.ImportFrom, updated: cst.ImportFrom) -> cst.ImportFrom:
        if not updated.relative:
            return updated
        module = dotted(updated.module) if updated.module is not None else None
        if len(updated.relative) == 1 and self._names_local_module(updated, module):
            return updated
        try:
            target = absolute_module(self.ctx.package, len(updated.relative), module)
        except ValueError as exc:
            raise self.ctx.error(str(exc), original, hint="pass the file's package") from None
        return updated.with_changes(relative=[], module=_module_expr(target))

    def _names_local_module(self, node: cst.ImportFrom, module: str | None) -> bool:
        """`from .x import A` / `from . import x` of a module beside the source."""
        local = self.ctx.local_modules
        if module is not None:
            return module.split(".")[0] in local
        if isinstance(node.names, cst.ImportStar):
            return False
        return all(alias.evaluated_name in local for alias in node.names)


def run(module: cst.Module, ctx: ConversionContext) -> cst.Module:
    # imports live at module level (possibly under if/try): visit only those statements
    fixer = _Absolute(ctx)
    body = [
        s if isinstance(s, (cst.ClassDef, cst.FunctionDef)) else s.visit(fixer) for s in module.body
    ]
    return module.with_changes(body=body)
