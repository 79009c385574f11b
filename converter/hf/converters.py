"""transformers' `WeightConverter` entries that load_weights can replay: one tensor
operation (`Chunk` or `Concatenate`) between checkpoint tensors and module parameters.

conversion_mapping.py describes checkpoints whose tensors do not map one-to-one onto the
module's parameters: `Chunk(dim)` splits one fused checkpoint tensor into equal pieces,
one per target (hrm_text's `gate_up_proj` -> `gate_proj`, `up_proj`), `Concatenate(dim)`
joins one tensor per source into one parameter, in source order. HF applies every
renaming first, then at most one converter; `runtime.checkpoint.load_checkpoint` does the
same with the table `Converter.table()` gives. Chained operations, config-sized chunk
counts (`num_shards_attribute`) and the MoE module-list merges are left unsupported, so
`hf_tables` reports them and conversion stops instead of loading wrong weights.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass

_OPS = {"Chunk": "chunk", "Concatenate": "concatenate"}

# transformers renamings defined by code, not patterns: the runtime.checkpoint constant
# (pattern, replacement function) that replays each
NAMED_RENAMINGS = {"LayerPairCollapse": "LAYER_PAIR_COLLAPSE"}


@dataclass(frozen=True)
class NamedRenaming:
    """A `WeightRenaming` subclass of transformers replayed by a runtime.checkpoint
    constant (`NAMED_RENAMINGS`); it takes its place among the renames, in order."""

    hf_class: str

    @property
    def constant(self) -> str:
        return NAMED_RENAMINGS[self.hf_class]


def source_regex(source: str) -> str:
    """A transform's source pattern compiled as HF does: `*.` is any prefix, and a pattern
    ending in a word character ends on a name boundary (`weight` matches
    `q_proj.weight`, not `q_proj.weight_scale`)."""
    pattern = source.replace("*.", r".*\.")
    if re.search(r"[a-zA-Z0-9]$", pattern):
        pattern += r"(?!\w)"
    return pattern


@dataclass(frozen=True)
class Converter:
    """One `WeightConverter` with a single `Chunk` or `Concatenate` operation."""

    sources: tuple[str, ...]
    targets: tuple[str, ...]
    op: str  # "chunk" | "concatenate"
    dim: int

    def table(self) -> tuple[str, int, list[str], list[str]]:
        """`(op, dim, source regexes, target names)` for `load_checkpoint(converters=...)`."""
        return self.op, self.dim, [source_regex(s) for s in self.sources], list(self.targets)


def _strings(node: ast.expr) -> tuple[str, ...]:
    value = ast.literal_eval(node)
    return (value,) if isinstance(value, str) else tuple(value)


def parse_converter(node: ast.Call) -> Converter | None:
    """The converter `node` (a `WeightConverter(...)` call) describes, or None when it
    needs anything beyond one plain Chunk / Concatenate."""
    args = dict(zip(("source_patterns", "target_patterns", "operations"), node.args))
    args.update({k.arg: k.value for k in node.keywords if k.arg})
    if set(args) != {"source_patterns", "target_patterns", "operations"}:
        return None
    ops = args["operations"]
    if not (isinstance(ops, ast.List) and len(ops.elts) == 1):
        return None
    op = ops.elts[0]
    if not (isinstance(op, ast.Call) and isinstance(op.func, ast.Name) and op.func.id in _OPS):
        return None
    if op.keywords and any(k.arg != "dim" for k in op.keywords) or len(op.args) > 1:
        return None
    dim_node = op.args[0] if op.args else next((k.value for k in op.keywords), None)
    try:
        sources, targets = _strings(args["source_patterns"]), _strings(args["target_patterns"])
        dim = 0 if dim_node is None else ast.literal_eval(dim_node)
    except ValueError:
        return None
    kind = _OPS[op.func.id]
    shape_ok = (
        len(sources) == 1 and len(targets) > 1
        if kind == "chunk"
        else len(sources) > 1 and len(targets) == 1
    )
    if not shape_ok or not isinstance(dim, int) or any("\\" in t for t in targets):
        return None
    return Converter(sources, targets, kind, dim)
