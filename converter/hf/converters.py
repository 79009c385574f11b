"""transformers' `WeightConverter` entries that load_weights can replay: one tensor
operation (`Chunk` or `Concatenate`), or a module-list merge, between checkpoint tensors and
module parameters.

conversion_mapping.py describes checkpoints whose tensors do not map one-to-one onto the
module's parameters: `Chunk(dim)` splits one fused checkpoint tensor into equal pieces,
one per target (hrm_text's `gate_up_proj` -> `gate_proj`, `up_proj`), `Concatenate(dim)`
joins one tensor per source into one parameter, in source order. HF applies every
renaming first, then at most one converter; `runtime.checkpoint.load_checkpoint` does the
same with the table `Converter.table()` gives. `MergeModulelist(dim)` (optionally then
`Concatenate(dim)`) stacks a module list's per-entry tensors, `experts.N.w1.weight`, into
one parameter (the mixture-of-experts checkpoints saved before transformers 5 fused their
experts); the runtime loads each entry straight into its slice. Other chains and
config-sized chunk counts (`num_shards_attribute`) are left unsupported, so
`converter.hf.tables` reports them and conversion stops instead of loading wrong weights.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass

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


def source_regex(source: str, list_index: bool = False) -> str:
    r"""A transform's source pattern compiled as HF does: `*.` is any prefix, and a pattern
    ending in a word character ends on a name boundary (`weight` matches
    `q_proj.weight`, not `q_proj.weight_scale`). With `list_index`, the `*` between dots
    is a module list's index, captured (`experts.*.w1` -> `experts.(\d+).w1`)."""
    if list_index:
        source = source.replace(".*.", r".(\d+).")
    pattern = source.replace("*.", r".*\.")
    if re.search(r"[a-zA-Z0-9]$", pattern):
        pattern += r"(?!\w)"
    return pattern


@dataclass(frozen=True)
class Converter:
    """One `WeightConverter`: a single `Chunk` or `Concatenate`, or a module-list merge
    (`MergeModulelist`, optionally then `Concatenate`: the per-expert tensors of a
    mixture-of-experts layer stacked into one 3-D parameter)."""

    sources: tuple[str, ...]
    targets: tuple[str, ...]
    ops: tuple[tuple[str, int], ...]  # ("chunk" | "concatenate" | "merge_modulelist", dim)

    def table(self) -> tuple:
        """The entry for `load_checkpoint(converters=...)`: `(op, dim, source regexes,
        targets)` for one op, `(((op, dim), ...), source regexes, targets)` for a chain;
        a merge's sources capture the module-list index (their `*` between dots)."""
        merge = self.ops[0][0] == "merge_modulelist"
        sources = [source_regex(s, list_index=merge) for s in self.sources]
        if len(self.ops) == 1 and not merge:
            ((op, dim),) = self.ops
            return op, dim, sources, list(self.targets)
        return self.ops, sources, list(self.targets)


def _strings(node: ast.expr) -> tuple[str, ...]:
    value = ast.literal_eval(node)
    return (value,) if isinstance(value, str) else tuple(value)


# The operation chains load_checkpoint replays (runtime.checkpoint._CHAINS).
_CHAINS = {("Chunk",), ("Concatenate",), ("MergeModulelist",), ("MergeModulelist", "Concatenate")}
_OP_NAMES = {"Chunk": "chunk", "Concatenate": "concatenate", "MergeModulelist": "merge_modulelist"}


def _op(node: ast.expr) -> tuple[str, int] | None:
    """`Chunk(dim)` / `Concatenate(dim=d)` / `MergeModulelist(dim=d)` -> (name, dim)."""
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)):
        return None
    if node.func.id not in _OP_NAMES or len(node.args) > 1:
        return None
    if any(k.arg != "dim" for k in node.keywords):
        return None
    dim_node = node.args[0] if node.args else next((k.value for k in node.keywords), None)
    try:
        dim = 0 if dim_node is None else ast.literal_eval(dim_node)
    except ValueError:
        return None
    return (node.func.id, dim) if isinstance(dim, int) else None


def parse_converter(node: ast.Call) -> Converter | None:
    """The converter `node` (a `WeightConverter(...)` call) describes, or None when it
    needs anything `load_checkpoint` cannot replay (another operation or chain, a
    config-sized chunk count)."""
    args = dict(zip(("source_patterns", "target_patterns", "operations"), node.args))
    args.update({k.arg: k.value for k in node.keywords if k.arg})
    if set(args) != {"source_patterns", "target_patterns", "operations"}:
        return None
    ops_node = args["operations"]
    if not isinstance(ops_node, ast.List):
        return None
    ops = [_op(op) for op in ops_node.elts]
    if None in ops or tuple(name for name, _ in ops) not in _CHAINS:
        return None
    try:
        sources, targets = _strings(args["source_patterns"]), _strings(args["target_patterns"])
    except ValueError:
        return None
    kind = ops[0][0]
    shape_ok = {
        "Chunk": len(sources) == 1 and len(targets) > 1,
        "Concatenate": len(sources) > 1 and len(targets) == 1,
        # every source names the list index with one `*` between dots
        "MergeModulelist": len(targets) == 1
        and all(s.count(".*.") == 1 for s in sources)
        and (len(ops) == 2) == (len(sources) > 1),
    }[kind]
    if not shape_ok or any("\\" in t for t in targets):
        return None
    return Converter(sources, targets, tuple((_OP_NAMES[name], dim) for name, dim in ops))
