"""Strict checkpoint loading shared by every generated `load_weights`.

A generated module carries only its model's tables (transformers' renames, the base-model
prefix, the stacked-parameter mapping of fused layers, ignored keys, the tied head); the
matching, sharded loading and the strictness live here, once.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
from torch import nn

from runtime.parallel import default_weight_loader


def load_checkpoint(
    model: nn.Module,
    weights: Iterable[tuple[str, torch.Tensor]],
    *,
    renames: list[tuple[str, str]],
    stacked_params_mapping: list[tuple[str, str, object]],
    prefix: str,
    ignored: list[str],
    tied: set[str],
) -> set[str]:
    """Load (name, tensor) pairs into ``model``; returns the names of the parameters loaded.

    Each key goes through ``renames`` (regex, replacement; in order), is matched with or
    without ``prefix`` and through ``stacked_params_mapping`` ``(fused param, checkpoint
    name, shard id)``, and loads through its parameter's ``weight_loader`` (which shards for
    tensor parallelism). Keys of ``tied`` parameters and of buffers are skipped, as are those
    matching an ``ignored`` pattern. Strict: one ValueError names every checkpoint key that
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
    for checkpoint_name, tensor in weights:
        name = checkpoint_name
        for pattern, replacement in renames:
            name = re.sub(pattern, replacement, name, count=1)
        found = resolve(name)
        if found is None:
            bare = name.removeprefix(prefix)
            skip = {name, prefix + bare, bare} & (tied | buffers)
            if not skip and not any(re.search(p, name) for p in ignored):
                unknown.append(checkpoint_name)
            continue
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
