"""Strict checkpoint loading shared by every generated `load_weights`.

A generated module carries only its model's own tables (transformers' renames for it, the
base-model prefix, the stacked-parameter mapping of fused layers, ignored keys, the tied
head), each only where it has one; what every model shares (transformers' legacy renames,
`LEGACY_RENAMES`), the matching, sharded loading and the strictness live here, once.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from runtime.parallel import ModuleListShard, default_weight_loader

# transformers' legacy checkpoint renames (conversion_mapping.py's "legacy" entry): applied
# to every model's keys after its own renames, as transformers does. The converter emits
# only a model's own renames; tests/converter/test_legacy_renames.py keeps this table equal
# to the installed transformers'.
LEGACY_RENAMES: tuple[tuple[str, str], ...] = (
    (r"LayerNorm.gamma(?!\w)", "LayerNorm.weight"),
    (r"LayerNorm.beta(?!\w)", "LayerNorm.bias"),
    (r".weight_g(?!\w)", ".parametrizations.weight.original0"),
    (r".weight_v(?!\w)", ".parametrizations.weight.original1"),
    (r"^model\.language_model\.model(?!\w)", "model.language_model"),
    (r"^language_model\.model\.model(?!\w)", "model.language_model"),
)

# A converter as the generated tables write it: (op, dim, source regexes, target names) for
# one op, or (((op, dim), ...), source regexes, target names) for a chain of ops.
ConverterEntry = tuple


def load_checkpoint(
    model: nn.Module,
    weights: Iterable[tuple[str, torch.Tensor]],
    *,
    renames: Sequence[tuple[str, str | Callable[[re.Match], str]]] = (),
    stacked_params_mapping: Sequence[tuple[str, str, object]] = (),
    prefix: str = "",
    ignored: Sequence[str] = (),
    tied: set[str] = frozenset(),
    converters: Sequence[ConverterEntry] = (),
) -> set[str]:
    """Load (name, tensor) pairs into ``model``; returns the names of the parameters loaded.

    Each key goes through ``renames`` (regex, replacement string or function of the
    match, as `re.sub` takes; in order) and then `LEGACY_RENAMES`, is matched with or
    without ``prefix`` and through ``stacked_params_mapping`` ``(fused param, checkpoint
    name, shard id)``, and loads through its parameter's ``weight_loader`` (which shards for
    tensor parallelism). Persistent buffers (state the checkpoint holds, such as a router's
    ``e_score_correction_bias``) load by copy, replicated on every rank; keys of ``tied``
    parameters and of non-persistent buffers (``rotary_emb.inv_freq``, which the module
    recomputes) are skipped, as are those matching an ``ignored`` pattern.

    After the renames, at most one of ``converters`` applies, as in transformers (the first
    whose source regex matches; the matched span is replaced by the target name):

    - ``("chunk", dim, sources, targets)`` splits the tensor into one equal piece per target;
    - ``("concatenate", dim, sources, targets)`` waits for one tensor per source (same key
      otherwise) and joins them in source order;
    - ``((("merge_modulelist", d0),), sources, [target])`` and ``((("merge_modulelist", d0),
      ("concatenate", d1)), sources, [target])``, transformers' chain that stacks a module
      list's tensors (``experts.N.w1.weight``) into one parameter, then joins the sources:
      each source regex captures the list index in its first group; every tensor loads on
      its own into its place, with shard id ``ModuleListShard(index, source position,
      len(sources), d0, d1)``, so nothing waits and no stacked copy is built.

    Pieces load like any checkpoint tensor, full size, through the target's
    ``weight_loader`` (so a chunk of a fused tensor is sharded as its own projection).
    Strict: one ValueError names every checkpoint key that matches no parameter and every
    parameter left unloaded, a module-list parameter with the keys of the entries it still
    lacks (its ``module_list_size`` entries per source), a stacked parameter loaded in part
    with the names of the shards it lacks; a lenient loader turns a rename into silently
    wrong logits. A loader error is prefixed with the parameter's name.
    """
    params = dict(model.named_parameters())
    persistent = persistent_buffers(model)
    buffers = {name for name, _ in model.named_buffers()} - set(persistent)
    loaded_buffers: set[str] = set()
    chains = [_as_chain(c) for c in converters]

    def resolve(name: str) -> tuple[str, object] | None:
        for candidate in (name, prefix + name, name.removeprefix(prefix)):
            for fused, shard, shard_id in stacked_params_mapping:
                if shard in candidate and candidate.replace(shard, fused) in params:
                    return candidate.replace(shard, fused), shard_id
            if candidate in params or candidate in persistent:
                return candidate, None
        return None

    shards: dict[str, set] = {}
    entries: dict[str, _ModuleListLoad] = {}  # module-list parameters
    unknown: list[str] = []
    # concatenations waiting for their other sources: target key -> {source index: tensor}
    pending: dict[str, dict[int, tuple[str, torch.Tensor]]] = {}

    def load(
        name: str, tensor: torch.Tensor, checkpoint_name: str, entry: ModuleListShard | None = None
    ) -> str | None:
        found = resolve(name)
        if found is None:
            bare = name.removeprefix(prefix)
            skip = {name, prefix + bare, bare} & (tied | buffers)
            if not skip and not any(re.search(p, name) for p in ignored):
                unknown.append(checkpoint_name)
            return None
        param_name, shard_id = found
        if param_name in persistent:
            _load_buffer(persistent[param_name], tensor, param_name, checkpoint_name)
            loaded_buffers.add(param_name)
            return param_name
        if entry is not None:
            if shard_id is not None:
                raise ValueError(
                    f"{param_name} (checkpoint {checkpoint_name}): a module-list entry cannot "
                    f"also be a stacked shard ({shard_id!r})"
                )
            shard_id = entry
        param = params[param_name]
        weight_loader = getattr(param, "weight_loader", default_weight_loader)
        try:
            if shard_id is None:
                weight_loader(param, tensor)
            else:
                weight_loader(param, tensor, shard_id)
        except ValueError as e:
            raise ValueError(f"{param_name} (checkpoint {checkpoint_name}): {e}") from None
        if entry is None:
            shards.setdefault(param_name, set()).add(shard_id)
        return param_name

    for checkpoint_name, tensor in weights:
        name = checkpoint_name
        for pattern, replacement in (*renames, *LEGACY_RENAMES):
            name = re.sub(pattern, replacement, name, count=1)
        match = _convert(name, chains)
        if match is None:
            load(name, tensor, checkpoint_name)
            continue
        (ops, sources, targets), index, found = match
        # the key with the matched source replaced by each target
        keys = [name[: found.start()] + t + name[found.end() :] for t in targets]
        op, dim = ops[0]
        if op == "merge_modulelist":
            if found.re.groups < 1:
                raise ValueError(f"converter source {found.re.pattern!r} captures no list index")
            cat_dim = ops[1][1] if len(ops) > 1 else None
            shard = ModuleListShard(int(found[1]), index, len(sources), dim, cat_dim)
            param_name = load(keys[0], tensor, checkpoint_name, shard)
            if param_name is not None:
                entries.setdefault(param_name, _ModuleListLoad(sources)).add(index, found)
            continue
        if op == "chunk":
            for key, piece in zip(keys, torch.chunk(tensor, len(targets), dim=dim)):
                load(key, piece, checkpoint_name)  # piece: the full size of one target
            continue
        group = pending.setdefault(keys[0], {})
        group[index] = (checkpoint_name, tensor)
        if len(group) == len(sources):
            del pending[keys[0]]
            parts = [group[i] for i in range(len(sources))]
            joined = torch.cat([t for _, t in parts], dim=dim)  # sources in HF's order
            load(keys[0], joined, " + ".join(n for n, _ in parts))
    for target, group in pending.items():  # a concatenation short of a source
        unknown += [f"{n} (no other source for {target})" for n, _ in group.values()]

    def complete(param_name: str) -> bool:
        got = shards.get(param_name, set())
        needed = {s for fused, _, s in stacked_params_mapping if fused in param_name}
        return None in got or (bool(needed) and needed <= got)

    def lacking_shards(param_name: str) -> list[str]:
        """The checkpoint names of a stacked parameter's shards not loaded, once some
        were (nothing at all: the fused tensor may be what is missing)."""
        got = shards.get(param_name)
        if not got:
            return []
        return [
            param_name.replace(fused, shard)
            for fused, shard, s in stacked_params_mapping
            if fused in param_name and s not in got
        ]

    missing = []
    for param_name, param in params.items():
        if complete(param_name):
            continue
        if lacking := lacking_shards(param_name):
            missing.append(f"{param_name} (no {', '.join(lacking)})")
            continue
        if param_name in entries:
            lacking = entries[param_name].lacking(getattr(param, "module_list_size", None))
            if not lacking:
                shards.setdefault(param_name, set()).add(None)
                continue
            missing.append(f"{param_name} (no {', '.join(lacking)})")
            continue
        missing.append(param_name)
    missing += [
        f"{name} (a persistent buffer)" for name in persistent if name not in loaded_buffers
    ]
    if unknown or missing:
        raise ValueError(
            f"{type(model).__name__}.load_weights: "
            f"{len(unknown)} checkpoint key(s) match no parameter {unknown}; "
            f"{len(missing)} parameter(s) not loaded {missing}"
        )
    return set(shards) | loaded_buffers


def persistent_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    """The buffers `model.state_dict()` holds (name -> tensor), each once."""
    found: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        for name, buffer in module._buffers.items():
            if buffer is None or name in module._non_persistent_buffers_set or id(buffer) in seen:
                continue
            seen.add(id(buffer))
            found[f"{module_name}.{name}" if module_name else name] = buffer
    return found


def _load_buffer(buffer: torch.Tensor, tensor: torch.Tensor, name: str, checkpoint_name: str):
    if tuple(tensor.shape) != tuple(buffer.shape):
        raise ValueError(
            f"{name} (checkpoint {checkpoint_name}): shape {tuple(tensor.shape)} does not "
            f"match the buffer's {tuple(buffer.shape)}"
        )
    with torch.no_grad():
        buffer.copy_(tensor)


def _as_chain(converter: ConverterEntry) -> tuple[tuple[tuple[str, int], ...], list, list]:
    """(ops, sources, targets) of either table form; an unsupported chain is an error."""
    if len(converter) == 4:
        op, dim, sources, targets = converter
        ops = ((op, dim),)
    else:
        ops, sources, targets = converter
        ops = tuple((op, dim) for op, dim in ops)
    names = tuple(op for op, _ in ops)
    if names not in _CHAINS:
        raise ValueError(
            f"checkpoint converter {' + '.join(names)} for {sources} is not supported "
            f"(supported: {', '.join(' + '.join(c) for c in _CHAINS)})"
        )
    if names[0] == "merge_modulelist" and len(targets) != 1:
        raise ValueError(f"a module-list merge has one target, got {targets}")
    return ops, sources, targets


_CHAINS = (
    ("chunk",),
    ("concatenate",),
    ("merge_modulelist",),
    ("merge_modulelist", "concatenate"),
)


@dataclass
class _ModuleListLoad:
    """The entries of one module-list parameter loaded so far, per source."""

    sources: list[str]  # the converter's source regexes
    indices: dict[int, set[int]] = field(default_factory=dict)  # source -> list indices
    # source -> (a renamed key, span of its list index): the template of missing keys
    example: dict[int, tuple[str, int, int]] = field(default_factory=dict)

    def add(self, position: int, found: re.Match) -> None:
        self.indices.setdefault(position, set()).add(int(found[1]))
        self.example.setdefault(position, (found.string, found.start(1), found.end(1)))

    def lacking(self, size: int | None) -> list[str]:
        """The keys of the entries still missing (a few, and how many), [] when complete."""
        if size is None:
            return ["the parameter declares no module_list_size"]
        lacking = []
        for position, pattern in enumerate(self.sources):
            if position not in self.example:
                lacking.append(f"key matching {pattern}")
                continue
            key, start, end = self.example[position]
            lacking += [
                key[:start] + str(i) + key[end:]
                for i in range(size)
                if i not in self.indices[position]
            ]
        return lacking if len(lacking) <= 4 else lacking[:3] + [f"... ({len(lacking)} in all)"]


def _convert(
    name: str, chains: list[tuple[tuple[tuple[str, int], ...], list, list]]
) -> tuple[tuple, int, re.Match] | None:
    """The first converter whose source regex matches ``name``: (converter, source
    index, match); None when none does."""
    for converter in chains:
        for index, pattern in enumerate(converter[1]):
            found = re.search(pattern, name)
            if found is not None:
                return converter, index, found
    return None


def _layer_pair_collapse(match: re.Match) -> str:
    index, name = int(match[1]), match[2]
    name = {"attn_alpha": "lambda_1", "mlp_alpha": "lambda_2"}.get(
        name, ("self_attn", "mlp")[index % 2]
    )
    return f"layers.{index // 2}.{name}"


# transformers' LayerPairCollapse (core_model_loading.py), a renaming regexes cannot
# express: checkpoints storing decoder layer i as an attention block `layers.{2i}.mixer`
# and an MLP block `layers.{2i+1}.mixer` (alphas `attn_alpha` / `mlp_alpha`).
LAYER_PAIR_COLLAPSE = (r"layers\.(\d+)\.(mixer|attn_alpha|mlp_alpha)(?=\.|$)", _layer_pair_collapse)
