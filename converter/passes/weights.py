"""Stage weights: emit ``load_weights`` on the LM class, and tie its head to the embedding.

The method comes from ``converter/render/templates/load_weights.py.jinja``, filled with this module's
tables: transformers' checkpoint renames (`converter.hf.tables`: conversion_mapping.py
for the LM class or model type, then the legacy table; plus the class's own
``_checkpoint_conversion_mapping``), its tensor converters (`converter.hf.converters`:
chunk / concatenate, emitted only when the model has some), the stacked-params mapping the TP pass recorded
(and the moe pass, for experts held as 2-D tensors: `runtime.moe.FlatExperts` shard ids),
the base-model prefix, ``_keys_to_ignore_on_load_unexpected`` and the tied keys.

Tying follows transformers: ``_tied_weights_keys`` (a dict, target -> source) applies
only when ``config.tie_word_embeddings``; the LM ``__init__`` then shares the parameter
(``self.lm_head.weight = self.model.embed_tokens.weight``), so ``named_parameters``
lists it once and ``load_weights`` skips the tied copy in a checkpoint.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import jinja2
import libcst as cst

from converter.context import ConversionContext
from converter.cst_helpers import add_import_from, code, methods_of
from converter.hf.converters import NamedRenaming
from converter.hf.tables import checkpoint_transforms

TEMPLATES = Path(__file__).resolve().parents[1] / "render" / "templates"


@cache
def _template() -> jinja2.Template:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=False,
    )
    return env.get_template("load_weights.py.jinja")


def _str(text: str) -> str:
    """A Python literal for `text`, raw when it holds backslashes (regexes)."""
    if "\\" in text and "'" not in text and not text.endswith("\\"):
        return f'r"{text}"' if '"' not in text else f"r'{text}'"
    return repr(text).replace("'", '"') if '"' not in text else repr(text)


def _converter_entry(table: tuple) -> str:
    """A `load_checkpoint` converter entry as code: strings as literals, raw for regexes."""
    *ops, sources, targets = table
    if len(ops) == 2:  # (op, dim): one operation
        ops_code = f"{_str(ops[0])}, {ops[1]}"
    else:  # ((op, dim), ...): a chain
        # no trailing comma but for one element: ruff would explode a "magic" one
        chain = ", ".join(f"({_str(op)}, {dim})" for op, dim in ops[0])
        ops_code = f"({chain}{',' if len(ops[0]) == 1 else ''})"
    listed = ", ".join("[" + ", ".join(_str(x) for x in xs) + "]" for xs in (sources, targets))
    return f"({ops_code}, {listed})"


def load_weights_source(ctx: ConversionContext) -> str:
    renames = [(k, v) for k, v in ctx.checkpoint_conversion_mapping.items()]
    renamings, converters = checkpoint_transforms(
        ctx.lm_class, ctx.config_model_type or ctx.model_type
    )
    entries = [f"({_str(p)}, {_str(r)})" for p, r in renames]
    for renaming in renamings:
        if isinstance(renaming, NamedRenaming):  # a runtime.checkpoint (pattern, function)
            entries.append(renaming.constant)
        else:
            entries += [f"({_str(p)}, {_str(r)})" for p, r in renaming.regexes()]
    prefix = ctx.base_model_prefix or ctx.base_model_attr
    tied = dict(ctx.tied_weights_keys)
    return _template().render(
        renames=entries,
        stacked=[
            (_str(f".{f}."), _str(f".{s}."), repr(i).replace("'", '"'))
            for f, s, i in ctx.stacked_params
        ]
        # experts' 2-D tensors: parameter names end the key (no dot after them)
        + [(_str(f".{f}"), _str(f".{s}"), i) for f, s, i in ctx.expert_checkpoint],
        converters=[_converter_entry(c.table()) for c in converters],
        prefix=_str(f"{prefix}." if prefix else ""),
        ignored=[_str(p) for p in ctx.keys_to_ignore_on_load_unexpected],
        tied_names=[_str(k) for k in tied],
        tied_target=", ".join(tied.values()) or "nothing",
    )


def _tie_statement(ctx: ConversionContext) -> cst.If | None:
    if not ctx.tied_weights_keys:
        return None
    lines = "\n".join(f"    self.{k} = self.{v}" for k, v in ctx.tied_weights_keys.items())
    return cst.parse_statement(
        'if getattr(self.config, "tie_word_embeddings", False):\n'
        "    # one parameter, as transformers ties it (lm_head shares the embedding's rows)\n"
        f"{lines}\n"
    )


def _with_tying(init: cst.FunctionDef, tie: cst.If | None) -> cst.FunctionDef:
    if tie is None:
        return init
    existing = code(init)
    first = code(tie.body.body[-1]).strip()
    if first in existing:  # an earlier pass already ties
        return init
    return init.with_changes(body=init.body.with_changes(body=[*init.body.body, tie]))


def _add_imports(module: cst.Module, named: set[str]) -> cst.Module:
    stmts = [cst.parse_statement("from collections.abc import Iterable")]
    have = {
        code(s).strip()
        for s in module.body
        if isinstance(s, cst.SimpleStatementLine)
        and isinstance(s.body[0], cst.Import | cst.ImportFrom)
    }
    body = list(module.body)
    for stmt in reversed(stmts):
        if code(stmt).strip() not in have:
            body.insert(0, stmt)
    module = module.with_changes(body=body)
    return add_import_from(module, {"load_checkpoint", *named}, "runtime.checkpoint")


def run(module: cst.Module, ctx: ConversionContext) -> cst.Module:
    method = cst.parse_module(load_weights_source(ctx)).body[0].body.body[0]
    tie = _tie_statement(ctx)
    body = []
    for stmt in module.body:
        if isinstance(stmt, cst.ClassDef) and stmt.name.value == ctx.lm_class:
            if "load_weights" in methods_of(stmt):
                raise ctx.error(f"{ctx.lm_class} already defines load_weights", stmt)
            members = [
                _with_tying(s, tie)
                if isinstance(s, cst.FunctionDef) and s.name.value == "__init__"
                else s
                for s in stmt.body.body
            ]
            stmt = stmt.with_changes(body=stmt.body.with_changes(body=[*members, method]))
        body.append(stmt)
    renamings, _ = checkpoint_transforms(ctx.lm_class, ctx.config_model_type or ctx.model_type)
    named = {r.constant for r in renamings if isinstance(r, NamedRenaming)}
    module = _add_imports(module.with_changes(body=body), named)
    if ctx.expert_checkpoint:  # the shard id of experts' 2-D checkpoint tensors
        module = add_import_from(module, {"FlatExperts"}, "runtime.moe")
    return module
