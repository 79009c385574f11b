"""Tables the installed transformers ships, read from its source without importing it.

Importing transformers (and torch behind it) costs seconds per process; reading these
few literals with `ast` costs milliseconds and keeps `convert` fast. What is read:

- the config class's `base_model_tp_plan` (`configuration_<type>.py`): a literal, or
  literals expanded by comprehensions (no calls, no outside names);
- the checkpoint renames of `conversion_mapping.py` for a model class or type
  (`WeightRenaming` entries; HF applies every matching one in order, then the legacy
  table), and its `WeightConverter`s (`converter.hf.converters`: Chunk, Concatenate,
  the MoE chain MergeModulelist [+ Concatenate]). Other transform kinds are reported,
  so a conversion that needs them stops instead of loading wrong weights.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from converter.errors import ConversionError
from converter.hf.converters import (
    NAMED_RENAMINGS,
    Converter,
    NamedRenaming,
    parse_converter,
    source_regex,
)
from converter.hf.resolve import configuration_file, transformers_root


@dataclass(frozen=True)
class Renaming:
    """One `WeightRenaming`: every source regex is replaced by the first target."""

    sources: tuple[str, ...]
    target: str

    def regexes(self) -> list[tuple[str, str]]:
        """`(pattern, replacement)` pairs for `re.sub(..., count=1)`, compiled as HF does:
        `*.` is any prefix, and a pattern ending in a word character ends on a name
        boundary (`weight` matches `q_proj.weight`, not `q_proj.weight_scale`)."""
        return [(source_regex(source), self.target) for source in self.sources]


@dataclass(frozen=True)
class Unsupported:
    """A transform load_weights cannot express (the source text, for the error)."""

    code: str


Transform = Renaming | NamedRenaming | Converter | Unsupported


def config_classes(model_type: str) -> dict[str, ast.ClassDef]:
    """The classes of `configuration_<type>.py` by name ({} when there is none)."""
    path = configuration_file(model_type)
    if path is None:
        return {}
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}


def config_model_type(model_type: str, config_class: str) -> str | None:
    """The `model_type` literal of `config_class` (in `configuration_<type>.py`): the key
    transformers looks its checkpoint conversions up by (AriaTextConfig: "aria_text")."""
    node = config_classes(model_type).get(config_class)
    for stmt in _class_assigns(node, "model_type") if node else ():
        if isinstance(stmt.value, ast.Constant) and isinstance(stmt.value.value, str):
            return stmt.value.value
    return None


def _class_assigns(node: ast.ClassDef, name: str) -> list[ast.Assign | ast.AnnAssign]:
    """The statements of a class body assigning `name` (plain or annotated)."""
    found = []
    for stmt in node.body:
        if isinstance(stmt, ast.AnnAssign) and stmt.value is not None:
            target = stmt.target
        elif isinstance(stmt, ast.Assign) and len(stmt.targets) == 1:
            target = stmt.targets[0]
        else:
            continue
        if isinstance(target, ast.Name) and target.id == name:
            found.append(stmt)
    return found


def config_tp_plan(model_type: str, config_class: str = "") -> dict[str, str] | None:
    """`base_model_tp_plan` of the config class(es) in `configuration_<type>.py`; where
    several classes hold different plans (a composite model's text and vision configs),
    the one of `config_class` (the causal LM's), or the nearest local base's."""
    path = configuration_file(model_type)
    if path is None:
        return None
    classes = config_classes(model_type)
    chain, name = [], config_class
    while name in classes and name not in chain:
        chain.append(name)
        bases = [b.id for b in classes[name].bases if isinstance(b, ast.Name)]
        name = next((b for b in bases if b in classes), "")
    for name in chain:
        plans = _class_plans(classes[name], path)
        if plans:
            return plans[0]
    plans: list[dict[str, str]] = []
    for node in classes.values():
        plans += _class_plans(node, path)
    if len(plans) > 1 and any(p != plans[0] for p in plans):
        raise ConversionError(
            f"{len(plans)} different base_model_tp_plan tables",
            path=path,
            hint="pick one with a tp_plan override in rules/architectures.toml",
        )
    return plans[0] if plans else None


def _class_plans(node: ast.ClassDef, path: Path) -> list[dict[str, str]]:
    """The `base_model_tp_plan` a config class body assigns (zero or one)."""
    plans: list[dict[str, str]] = []
    for stmt in _class_assigns(node, "base_model_tp_plan"):
        try:
            plans.append(_plan_value(stmt.value))
        except ValueError as e:
            raise ConversionError(
                "base_model_tp_plan is not a literal dict",
                path=path,
                line=stmt.lineno,
                hint="add a tp_plan override in rules/architectures.toml",
            ) from e
    return plans


# A plan built from literals by comprehensions (`**{f"{s}.q_proj": "colwise" for s in
# ("L", "H")}`): names bound only by its own comprehensions, no calls or attributes.
_PLAN_NODES = (
    ast.Dict, ast.DictComp, ast.comprehension, ast.Constant, ast.JoinedStr,
    ast.FormattedValue, ast.Name, ast.Tuple, ast.List, ast.Load, ast.Store,
)  # fmt: skip


def _plan_value(node: ast.expr) -> dict:
    """The plan's value: a literal, or a closed comprehension expression evaluated with no
    builtins (any free name, call or attribute is a ValueError)."""
    try:
        return ast.literal_eval(node)
    except ValueError:
        pass
    bound = {
        n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)
    }
    for sub in ast.walk(node):
        if not isinstance(sub, _PLAN_NODES) or (isinstance(sub, ast.Name) and sub.id not in bound):
            raise ValueError(f"not a closed plan expression: {ast.unparse(sub)}")
    try:  # a comprehension variable read outside its comprehension: NameError
        value = eval(compile(ast.Expression(node), "<tp plan>", "eval"), {"__builtins__": {}})
    except Exception as e:
        raise ValueError(f"plan expression failed: {e}") from e
    if not isinstance(value, dict):
        raise ValueError("not a dict")
    return value


def _str_list(node: ast.expr) -> list[str]:
    value = ast.literal_eval(node)
    return [value] if isinstance(value, str) else list(value)


def _transform(node: ast.expr) -> Transform:
    code = ast.unparse(node)
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)):
        return Unsupported(code)
    if node.func.id == "WeightConverter":
        return parse_converter(node) or Unsupported(code)
    if node.func.id in NAMED_RENAMINGS and not node.args and not node.keywords:
        return NamedRenaming(node.func.id)
    if node.func.id == "PrefixChange":
        return _prefix_change(node) or Unsupported(code)
    if node.func.id != "WeightRenaming":
        return Unsupported(code)
    args = dict(zip(("source_patterns", "target_patterns"), node.args))
    args.update({k.arg: k.value for k in node.keywords if k.arg})
    try:
        sources = _str_list(args["source_patterns"])
        targets = _str_list(args["target_patterns"])
    except (KeyError, ValueError):
        return Unsupported(code)
    # A replacement may use group references (\\1) but no other escapes (re.sub rejects them).
    if re.search(r"\\[^0-9]", targets[0]):
        return Unsupported(code)
    return Renaming(tuple(sources), targets[0])


def _prefix_change(node: ast.Call) -> Renaming | None:
    """transformers' `PrefixChange` (a WeightRenaming spelled by prefixes) as its regex:
    remove `<model_prefix>.<prefix>.` (`model.language_model.x` -> `model.x`), or add
    `<prefix>.` after `<model_prefix>.` where it is not there yet."""
    if node.args:
        return None
    try:
        kw = {k.arg: ast.literal_eval(k.value) for k in node.keywords}
    except ValueError:
        return None
    add, remove, model = (
        kw.pop("prefix_to_add", None),
        kw.pop("prefix_to_remove", None),
        kw.pop("model_prefix", None) or "",
    )
    if (
        kw
        or (add is None) == (remove is None)
        or not all(re.fullmatch(r"[\w.]*", p or "") for p in (add, remove, model))
    ):
        return None
    prefix, plain = (rf"{re.escape(model)}\.", f"{model}.") if model else ("", "")
    if remove is not None:
        return Renaming((rf"^{prefix}{re.escape(remove)}\.(.+)",), rf"{plain}\1")
    return Renaming((rf"^{prefix}(?:(?!{re.escape(add)}\.))(.+)",), rf"{plain}{add}.\1")


class _MappingEvaluator:
    """Evaluates `_build_checkpoint_conversion_mapping`'s literal parts: the `mapping = {}`
    literal and later `mapping[k] = ...` / `mapping[k] += ...` statements."""

    def __init__(self) -> None:
        self.mapping: dict[str, list[Transform]] = {}
        # Keys whose value came from a statement this reader cannot evaluate.
        self.opaque: set[str] = set()

    def value(self, node: ast.expr) -> list[Transform] | None:
        if isinstance(node, ast.List):
            return [_transform(e) for e in node.elts]
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
            left, right = self.value(node.left), self.value(node.right)
            return None if left is None or right is None else left + right
        # mapping["x"].copy()  /  mapping["x"]
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "copy"
        ):
            node = node.func.value
        key = self.subscript_key(node)
        if key is not None and key in self.mapping and key not in self.opaque:
            return list(self.mapping[key])
        return None

    @staticmethod
    def subscript_key(node: ast.expr) -> str | None:
        if (
            isinstance(node, ast.Subscript)
            and isinstance(node.value, ast.Name)
            and node.value.id == "mapping"
            and isinstance(node.slice, ast.Constant)
            and isinstance(node.slice.value, str)
        ):
            return node.slice.value
        return None

    def statement(self, stmt: ast.stmt) -> None:
        if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1:
            target = stmt.targets[0]
            if (
                isinstance(target, ast.Name)
                and target.id == "mapping"
                and isinstance(stmt.value, ast.Dict)
            ):
                for k, v in zip(stmt.value.keys, stmt.value.values):
                    if isinstance(k, ast.Constant) and isinstance(k.value, str):
                        val = self.value(v)
                        self.mapping[k.value] = val or []
                        if val is None:
                            self.opaque.add(k.value)
                return
            key = self.subscript_key(target)
            if key is not None:
                val = self.value(stmt.value)
                self.mapping[key] = val or []
                (self.opaque.add if val is None else self.opaque.discard)(key)
                return
        if isinstance(stmt, ast.AugAssign) and isinstance(stmt.op, ast.Add):
            key = self.subscript_key(stmt.target)
            if key is not None:
                val = self.value(stmt.value)
                if val is None or key not in self.mapping:
                    self.opaque.add(key)
                else:
                    self.mapping[key] = self.mapping[key] + val
                return
        # Loops and other code may touch any key: mark the keys they name as opaque.
        for node in ast.walk(stmt):
            key = self.subscript_key(node) if isinstance(node, ast.Subscript) else None
            if key is not None and isinstance(node.ctx, ast.Store):
                self.opaque.add(key)


@cache
def _conversion_tables() -> tuple[dict, frozenset[str], dict[str, str]]:
    path = transformers_root() / "conversion_mapping.py"
    tree = ast.parse(path.read_text(encoding="utf-8"))
    aliases: dict[str, str] = {}
    evaluator = _MappingEvaluator()
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "_MODEL_TO_CONVERSION_PATTERN" for t in node.targets
        ):
            aliases = ast.literal_eval(node.value)
        if (
            isinstance(node, ast.FunctionDef)
            and node.name == "_build_checkpoint_conversion_mapping"
        ):
            for stmt in node.body:
                evaluator.statement(stmt)
    # The alias loop at the end of the builder: a type without its own entry copies its base's.
    for model_type, base in aliases.items():
        if model_type not in evaluator.mapping and base in evaluator.mapping:
            evaluator.mapping[model_type] = list(evaluator.mapping[base])
            if base in evaluator.opaque:
                evaluator.opaque.add(model_type)
    return evaluator.mapping, frozenset(evaluator.opaque), aliases


def checkpoint_renames(class_name: str, model_type: str) -> list[Renaming | NamedRenaming]:
    """The renames transformers applies when loading `class_name` (else `model_type`)
    checkpoints, in HF's order, before the legacy table every model shares (which the
    runtime applies itself: `runtime.checkpoint.LEGACY_RENAMES`, `legacy_renames`)."""
    return checkpoint_transforms(class_name, model_type)[0]


def legacy_renames() -> list[tuple[str, str]]:
    """transformers' legacy renames, as (regex, replacement) pairs in order."""
    mapping, _, _ = _conversion_tables()
    return [pair for t in mapping.get("legacy", []) for pair in t.regexes()]


def checkpoint_transforms(
    class_name: str, model_type: str
) -> tuple[list[Renaming | NamedRenaming], list[Converter]]:
    """`checkpoint_renames`, and the tensor converters HF tries (at most one per key)
    after every rename, in order. The legacy table is checked (it must hold renames
    only: the runtime applies them to every model) but not returned."""
    mapping, opaque, _ = _conversion_tables()
    chosen = class_name if class_name in mapping or class_name in opaque else model_type
    out: list[Renaming | NamedRenaming] = []
    converters: list[Converter] = []
    for key in (chosen, "legacy"):
        if key in opaque:
            raise ConversionError(
                f"transformers' checkpoint conversion mapping for {key!r} is built by code "
                "this reader cannot evaluate",
                path=Path("transformers/conversion_mapping.py"),
                hint="extend converter/hf/tables.py",
            )
        for t in mapping.get(key, []):
            if isinstance(t, Unsupported):
                raise ConversionError(
                    f"checkpoint conversion for {key!r} needs a tensor transform load_weights "
                    "cannot express",
                    path=Path("transformers/conversion_mapping.py"),
                    construct=t.code,
                    hint="extend converter/hf/converters.py",
                )
            if key == "legacy":
                if not isinstance(t, Renaming):
                    raise ConversionError(
                        "transformers' legacy checkpoint table holds more than renames",
                        path=Path("transformers/conversion_mapping.py"),
                        hint="apply it in runtime.checkpoint beside LEGACY_RENAMES",
                    )
                continue
            (converters if isinstance(t, Converter) else out).append(t)
    return out, converters
