"""The conversion pipeline: source text -> parse -> analysis -> STAGES -> module.

Each stage is ``run(module, ctx) -> module``, one concern each, in ``converter/passes/``
(a module, or a package whose ``__init__`` is the stage). Analysis
(`converter.analysis.analyze`) runs once on the parsed source, before any stage, so every
stage sees the roles of the ORIGINAL file. Rendering the module to the text of
``generated/<type>.py`` (header, ruff) is `converter.render`'s, called by
`converter.convert.generate`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import libcst as cst
import tomllib

from converter.analysis import analyze
from converter.context import ConversionContext
from converter.errors import ConversionError
from converter.guard import check_not_generated, check_python, stage_errors, stage_name
from converter.passes import (
    attention,
    flatten,
    imports,
    moe,
    prune,
    select,
    strip,
    tidy,
    tp,
    weights,
)

Pass = Callable[[cst.Module, ConversionContext], cst.Module]
RULES_DIR = Path(__file__).resolve().parent.parent / "rules"

# In order; each stage's docstring says what it relies on from the ones before it.
STAGES: list[Pass] = [
    imports.run,  # relative imports made absolute
    moe.run,  # routed experts -> FusedMoE (before select drops what FusedMoE reads)
    select.run,  # keep the causal-LM class and what it needs
    strip.run,  # training-only code, decorators, HF base classes
    attention.run,  # attention -> PagedAttention
    flatten.run,  # [T] inputs, kv_caches and input_metadata threaded down
    prune.run,  # dataflow: what the dropped parameters made dead
    tp.run,  # tensor-parallel layers from the TP plan
    tidy.run,  # what the rewrites left unreferenced
    weights.run,  # load_weights, tied embeddings
]


@dataclass
class Conversion:
    module: cst.Module
    ctx: ConversionContext

    @property
    def code(self) -> str:
        """The module's code before rendering (no header, not ruff-formatted)."""
        return self.module.code


def load_rules(rules_dir: Path = RULES_DIR) -> dict:
    """Every ``rules/*.toml`` table, keyed by file stem (``rules["training"]``)."""
    rules: dict = {}
    for path in sorted(rules_dir.glob("*.toml")):
        try:
            with path.open("rb") as fh:
                rules[path.stem] = tomllib.load(fh)
        except tomllib.TOMLDecodeError as exc:
            raise ConversionError(
                f"invalid TOML: {exc}", path=path, hint="fix the rules file"
            ) from None
    return rules


_RULES_CACHE: dict[Path, dict] = {}


def package_of(path: Path, model_type: str) -> str:
    """``.../site-packages/transformers/models/llama/modeling_llama.py`` ->
    ``transformers.models.llama``; files outside transformers are assumed to be a copy
    of ``transformers.models.<model_type>``."""
    parts = path.resolve().parts
    if "transformers" in parts:
        idx = len(parts) - 1 - parts[::-1].index("transformers")
        return ".".join(parts[idx:-1])
    return f"transformers.models.{model_type}"


def model_type_of(path: Path) -> str:
    stem = path.stem
    if not stem.startswith("modeling_"):
        raise ValueError(f"{path}: expected a modeling_<type>.py file")
    return stem[len("modeling_") :]


def convert_source(
    source: str,
    path: str | Path,
    model_type: str | None = None,
    package: str | None = None,
    rules: dict | None = None,
    stages: list[Pass] | None = None,
    local_modules: frozenset[str] = frozenset(),
) -> Conversion:
    """Run the whole pipeline on `source` (the text of `path`). `local_modules`: the
    modules beside a source outside transformers, imported relatively (kept so)."""
    path = Path(path)
    model_type = model_type or model_type_of(path)
    ctx = ConversionContext.from_source(
        source, path, model_type, package or package_of(path, model_type)
    )
    ctx.local_modules = frozenset(local_modules)
    if rules is None:
        rules = _RULES_CACHE.get(RULES_DIR) or _RULES_CACHE.setdefault(RULES_DIR, load_rules())
    ctx.rules = rules
    check_python(source, path)
    check_not_generated(source, path)
    try:
        module = cst.parse_module(source)
    except cst.ParserSyntaxError as exc:
        raise ConversionError(
            f"cannot parse: {exc.message}", path=path, line=exc.raw_line
        ) from None
    with stage_errors(ctx, "analysis"):
        analyze(module, ctx)
    for stage in STAGES if stages is None else stages:
        with stage_errors(ctx, stage_name(stage)):
            module = stage(module, ctx)
    return Conversion(module, ctx)


def convert_file(path: str | Path, model_type: str | None = None) -> Conversion:
    path = Path(path)
    return convert_source(path.read_text(), path, model_type)
