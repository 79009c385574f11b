"""Shape-checked weight copies shared by every parallel layer's `weight_loader`.

Error messages start with what was wrong, so the caller (a generated `load_weights`,
which knows the parameter's name) can prefix them: `raise ValueError(f"{name}: {e}")`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn


class ModuleListShard(NamedTuple):
    """The shard id of one module-list entry's tensor (``experts.3.up_proj.weight``) bound
    for a parameter that stacks the whole list, as transformers' chained converters
    ``MergeModulelist(dim=stack_dim)`` then ``Concatenate(dim=cat_dim)`` build it: the
    tensor is entry ``index`` along ``stack_dim`` of the stacked parameter and, when
    ``num_parts > 1``, part ``part`` of ``num_parts`` equal parts along ``cat_dim`` (both
    dims in the stacked parameter's coordinates; ``cat_dim`` is None without a
    concatenation). A parameter that takes these carries ``module_list_size`` (the
    number of entries of the full list), so the strict loader can name a missing entry.
    """

    index: int
    part: int = 0
    num_parts: int = 1
    stack_dim: int = 0
    cat_dim: int | None = None


def check_loaded_shape(
    loaded: torch.Tensor, expected: tuple[int, ...], param: torch.Tensor
) -> None:
    """Raise ValueError unless the full checkpoint tensor has the `expected` (unsharded) shape."""
    if tuple(loaded.shape) != tuple(expected):
        raise ValueError(
            f"checkpoint tensor has shape {tuple(loaded.shape)}, expected {tuple(expected)} "
            f"(this rank's parameter shard is {tuple(param.shape)})"
        )


def copy_checked(dst: torch.Tensor, src: torch.Tensor) -> None:
    """`dst.copy_(src)` after checking the shapes match exactly (copy_ would broadcast)."""
    if dst.shape != src.shape:
        raise ValueError(
            f"shape mismatch: parameter {tuple(dst.shape)} vs checkpoint {tuple(src.shape)}"
        )
    # Float-to-float casts are the point (a bf16 checkpoint served in fp32); an integer or
    # bool tensor where weights belong is a wrong key or a quantized format, never a cast.
    if dst.is_floating_point() != src.is_floating_point():
        raise ValueError(
            f"dtype mismatch: parameter {dst.dtype} {tuple(dst.shape)} vs checkpoint "
            f"{src.dtype} {tuple(src.shape)}"
        )
    dst.copy_(src)  # converts dtype and device (mmap'd CPU tensor -> GPU parameter)


def default_weight_loader(
    param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: object = None
) -> None:
    """Loader for replicated parameters (norms, plain nn.Linear, buffers made params)."""
    if shard_id is not None:
        raise ValueError(f"a replicated parameter takes no shard id, got {shard_id!r}")
    # A scalar stored as shape [] in one format and [1] in another is still one value.
    if param.numel() == 1 and loaded_weight.numel() == 1:
        param.data.fill_(loaded_weight.item())
        return
    copy_checked(param.data, loaded_weight)


def make_param(*shape: int, dtype: torch.dtype | None) -> nn.Parameter:
    """An uninitialised parameter (load_weights fills it) on the current default device."""
    data = torch.empty(*shape, dtype=dtype or torch.get_default_dtype())
    # Serving only: no gradients, and in-place collectives on outputs stay legal.
    return nn.Parameter(data, requires_grad=False)
