"""Strict checkpoint loading shared by every generated `load_weights`.

A generated module carries only its model's tables (transformers' renames, the base-model
prefix, the stacked-parameter mapping of fused layers, ignored keys, the tied head); the
matching, sharded loading and the strictness live here, once.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn

from runtime.parallel import default_weight_loader


def load_checkpoint(
    model: nn.Module,
    weights: Iterable[tuple[str, torch.Tensor]],
    *,
    renames: list[tuple[str, str | Callable[[re.Match], str]]],
    stacked_params_mapping: list[tuple[str, str, object]],
    prefix: str,
    ignored: list[str],
    tied: set[str],
    converters: Sequence[tuple[str, int, list[str], list[str]]] = (),
) -> set[str]:
    """Load (name, tensor) pairs into ``model``; returns the names of the parameters loaded.

    Each key goes through ``renames`` (regex, replacement string or function of the
    match, as `re.sub` takes; in order), is matched with or
    without ``prefix`` and through ``stacked_params_mapping`` ``(fused param, checkpoint
    name, shard id)``, and loads through its parameter's ``weight_loader`` (which shards for
    tensor parallelism). Keys of ``tied`` parameters and of buffers are skipped, as are those
    matching an ``ignored`` pattern. After the renames, at most one of ``converters``
    ``(op, dim, source regexes, target names)`` applies, as in transformers: "chunk" splits
    the key's tensor into one equal piece per target along ``dim``, "concatenate" waits
    for one tensor per source (same key otherwise) and joins them in source order; the
    pieces then load like any checkpoint tensor, full size, through the target's
    ``weight_loader`` (so a chunk of a fused tensor is sharded as its own projection). Strict: one ValueError names every checkpoint key that
    matches no parameter and every parameter left unloaded (a lenient loader turns a rename
    into silently wrong logits); a loader error is prefixed with the parameter's name.
    """
    params = dict(model.named_parameters())
    buffers = {name for name, _ in model.named_buffers()}

    def resolve(name: str) -> tuple[str, object] | None:
        for candidate in (name, prefix + name, name.removeprefix(prefix)):
            for fused, shard, shard_id in stacked_params_mapping:
                if shard in candidate and candidate.replace(shard, fused) in params:
                    return candidate.replace(shard, fused), shard_id
            if candidate in params:
                return candidate, None
        return None

    shards: dict[str, set] = {}
    unknown: list[str] = []
    # concatenations waiting for their other sources: target key -> {source index: tensor}
    pending: dict[str, dict[int, tuple[str, torch.Tensor]]] = {}

    def load(name: str, tensor: torch.Tensor, checkpoint_name: str) -> None:
        found = resolve(name)
        if found is None:
            bare = name.removeprefix(prefix)
            skip = {name, prefix + bare, bare} & (tied | buffers)
            if not skip and not any(re.search(p, name) for p in ignored):
                unknown.append(checkpoint_name)
            return
        param_name, shard_id = found
        param = params[param_name]
        weight_loader = getattr(param, "weight_loader", default_weight_loader)
        try:
            if shard_id is None:
                weight_loader(param, tensor)
            else:
                weight_loader(param, tensor, shard_id)
        except ValueError as e:
            raise ValueError(f"{param_name} (checkpoint {checkpoint_name}): {e}") from None
        shards.setdefault(param_name, set()).add(shard_id)

    for checkpoint_name, tensor in weights:
        name = checkpoint_name
        for pattern, replacement in renames:
            name = re.sub(pattern, replacement, name, count=1)
        match = _convert(name, converters)
        if match is None:
            load(name, tensor, checkpoint_name)
            continue
        (op, dim, sources, targets), index, found = match
        # the key with the matched source replaced by each target
        keys = [name[: found.start()] + t + name[found.end() :] for t in targets]
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

    missing = [n for n in params if not complete(n)]
    if unknown or missing:
        raise ValueError(
            f"{type(model).__name__}.load_weights: "
            f"{len(unknown)} checkpoint key(s) match no parameter {unknown}; "
            f"{len(missing)} parameter(s) not loaded {missing}"
        )
    return set(shards)


def _convert(
    name: str, converters: Sequence[tuple[str, int, list[str], list[str]]]
) -> tuple[tuple[str, int, list[str], list[str]], int, re.Match] | None:
    """The first converter whose source regex matches ``name``: (converter, source
    index, match); None when none does."""
    for converter in converters:
        for index, pattern in enumerate(converter[2]):
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
