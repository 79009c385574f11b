"""`weight_loader`s of the `FusedMoE` parameters: transformers' layouts in, one layout held.

The layer always holds its experts as the kernels read them, this rank's share only:

    gate_up_proj       [E_local, 2 * I_local, H]   rows: this rank's gate | its up
    up_proj            [E_local, I_local, H]       (has_gate=False)
    down_proj          [E_local, H, I_local]
    *_bias             [E_local, 2 * I_local] / [E_local, I_local] / [E_local, H]

Checkpoints come in transformers' layout of the experts class, described by the flags of
``@use_experts_implementation``: ``gate_up_proj [E, 2I, H]`` (``is_transposed``: ``[E, H,
2I]``), gate and up concatenated ``[gate; up]`` or interleaved ``[g0, u0, g1, u1, ...]``
(``is_concatenated=False``), ``down_proj [E, H, I]`` (transposed ``[E, I, H]``). A loader
takes either the whole 3-D tensor (``shard_id=None``) or one expert's tensor as
transformers' ``MergeModulelist`` / ``Concatenate`` converters would stack it
(``shard_id=ModuleListShard(expert, part, num_parts, stack_dim, cat_dim)``, e.g. Mixtral's
``experts.3.w3.weight`` is part 1 of 2 along dim 1 of expert 3's ``gate_up_proj``). Either
way the tensor is placed by its coordinates in transformers' full parameter, so a piece
lands exactly where transformers' own loading would have put it, then this rank keeps its
experts (EP) and its intermediate slice (TP).

Experts held as 2-D parameters, every expert's weight of one projection stacked along dim
0 and viewed per expert by their own loop (DBRX's ``w1`` / ``v1`` / ``w2 [E * I, H]``),
load with ``shard_id=FlatExperts(part, num_parts, transposed)``: the tensor is viewed as
``[E, out, in]`` (``transposed``: ``[E, in, out]``, its own orientation, whatever the
layer's flags say) and placed as part ``part`` of the gate/up features like the rest.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from runtime.moe.partition import ExpertPartition
from runtime.parallel import ModuleListShard
from runtime.parallel.weights import check_loaded_shape

# What a parameter is, as the loader sees it.
GATE_UP, UP, DOWN = "gate_up", "up", "down"


@dataclass(frozen=True)
class ExpertLayout:
    """transformers' layout flags of an experts class (``@use_experts_implementation``)."""

    hidden_size: int
    is_transposed: bool = False  # weights stored [E, in, out] instead of [E, out, in]
    is_concatenated: bool = True  # gate/up as [gate; up]; False: interleaved g0, u0, g1, ...
    has_gate: bool = True


@dataclass(frozen=True)
class FlatExperts:
    """The shard id of a checkpoint tensor holding every expert's weight of one projection
    as one 2-D tensor, the experts stacked along dim 0: ``[E * out, in]`` (``transposed``:
    ``[E * in, out]``), as a loop viewing it ``.view(-1, out, in)[expert]`` reads it.
    ``part`` of ``num_parts``: which block of the gate/up features it is (gate 0 and up 1
    of 2 where the two are separate tensors; down is part 0 of 1)."""

    part: int = 0
    num_parts: int = 1
    transposed: bool = False


class ExpertWeightLoader:
    """The `weight_loader` of one FusedMoE parameter (a callable, so ``param.weight_loader =
    ExpertWeightLoader(...)`` reads like the parallel layers' bound methods)."""

    def __init__(
        self,
        kind: str,
        is_bias: bool,
        layout: ExpertLayout,
        partition: ExpertPartition,
        identity_experts: int = 0,
    ) -> None:
        self.kind, self.is_bias = kind, is_bias
        self.layout, self.partition = layout, partition
        # zero-computation experts after the E real ones: an in-projection may carry
        # unused rows for them (LongCat-Flash allocates gate_up_proj over all ids)
        self.unused_rows = identity_experts if kind != DOWN else 0

    # transformers' full (unsharded) shape of this parameter
    def full_shape(self) -> tuple[int, ...]:
        p, layout = self.partition, self.layout
        E, H, I = p.num_experts, layout.hidden_size, p.intermediate_size  # noqa: E741
        rows = 2 * I if self.kind == GATE_UP else I if self.kind == UP else H
        if self.is_bias:
            return (E, rows)
        if self.kind == DOWN:
            return (E, I, H) if layout.is_transposed else (E, H, I)
        return (E, H, rows) if layout.is_transposed else (E, rows, H)

    def _feature_dim(self) -> int:
        """The dim of the full parameter a Concatenate may join parts along: gate/up's
        output features (and the bias's only feature dim)."""
        if self.is_bias:
            return 1
        return 2 if self.layout.is_transposed else 1

    def __call__(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        full = self.full_shape()
        transposed = self.layout.is_transposed
        if shard_id is None:
            if self.unused_rows and loaded.shape[0] == full[0] + self.unused_rows:
                loaded = loaded.narrow(0, 0, full[0])  # the identity experts' rows: unused
            check_loaded_shape(loaded, full, param)
            first = self.partition.expert_start
            local = loaded.narrow(0, first, self.partition.num_local_experts)
            self._place(param, local, 0, full[self._feature_dim()], 0, transposed)
            return
        if isinstance(shard_id, FlatExperts):
            self._load_flat(param, loaded, shard_id)
            return
        if not isinstance(shard_id, ModuleListShard):
            raise ValueError(
                f"a FusedMoE parameter takes None (the fused tensor), a ModuleListShard "
                f"(one expert's tensor) or FlatExperts (every expert's, 2-D), got shard id "
                f"{shard_id!r}"
            )
        index, part, num_parts, stack_dim, cat_dim = shard_id
        if stack_dim == 0 and full[0] <= index < full[0] + self.unused_rows:
            return  # an identity expert's unused row (see __init__)
        if stack_dim != 0 or not 0 <= index < full[0]:
            raise ValueError(
                f"expert tensor {index} stacked along dim {stack_dim}: this parameter "
                f"stacks {full[0]} experts along dim 0"
            )
        piece = list(full[1:])
        if num_parts > 1:
            if self.kind == DOWN and not self.is_bias:
                raise ValueError("down_proj is not concatenated from parts")
            if cat_dim != self._feature_dim():
                raise ValueError(
                    f"parts concatenated along dim {cat_dim}, but this parameter's "
                    f"gate/up features run along dim {self._feature_dim()} of {full}"
                )
            width = full[cat_dim]
            if width % num_parts:
                raise ValueError(f"{width} features do not split into {num_parts} parts")
            piece[cat_dim - 1] = width // num_parts
        check_loaded_shape(loaded, tuple(piece), param)
        local = self.partition.local_expert(index)
        if local is None:
            return  # another rank's expert (EP): accounted for, not held here
        width = piece[self._feature_dim() - 1] if self.kind != DOWN or self.is_bias else 0
        self._place(param, loaded.unsqueeze(0), part * width, width, local, transposed)

    def _load_flat(self, param: nn.Parameter, loaded: torch.Tensor, shard: FlatExperts) -> None:
        """Every expert's weight of one projection (or one gate/up part), 2-D."""
        p, hidden = self.partition, self.layout.hidden_size
        if self.is_bias:
            raise ValueError("a bias does not load from a FlatExperts tensor")
        if self.kind == DOWN:
            if shard.num_parts != 1:
                raise ValueError("down_proj is not concatenated from parts")
            out, inner = hidden, p.intermediate_size
        else:
            rows = 2 * p.intermediate_size if self.kind == GATE_UP else p.intermediate_size
            if not 0 <= shard.part < shard.num_parts or rows % shard.num_parts:
                raise ValueError(f"{rows} features have no part {shard.part} of {shard.num_parts}")
            out, inner = rows // shard.num_parts, hidden
        a, b = (inner, out) if shard.transposed else (out, inner)
        check_loaded_shape(loaded, (p.num_experts * a, b), param)
        experts = loaded.reshape(p.num_experts, a, b)  # [E, out, in] or [E, in, out]
        local = experts.narrow(0, p.expert_start, p.num_local_experts)
        self._place(param, local, shard.part * out, out, 0, shard.transposed)

    def _place(
        self,
        param: nn.Parameter,
        loaded: torch.Tensor,  # [n, ...] transformers' layout, n experts from local_expert
        row_start: int,  # first gate/up feature row of transformers' fused axis covered
        num_rows: int,
        local_expert: int,
        transposed: bool,  # `loaded` is [n, in, out] rather than [n, out, in]
    ) -> None:
        if loaded.is_floating_point() != param.is_floating_point():
            raise ValueError(
                f"dtype mismatch: parameter {param.dtype} vs checkpoint {loaded.dtype}"
            )
        dst = param.data.narrow(0, local_expert, loaded.shape[0])  # [n, ...] held layout
        p = self.partition
        if self.kind == DOWN:
            if self.is_bias:  # [n, H]: replicated (TP) or the expert's own (EP)
                dst.copy_(loaded)
                return
            if transposed:
                loaded = loaded.transpose(1, 2)  # [n, H, I]
            dst.copy_(loaded.narrow(2, p.intermediate_start, p.local_intermediate_size))
            return
        if transposed and not self.is_bias:
            loaded = loaded.transpose(1, 2)  # [n, rows, H]
        rows = torch.arange(row_start, row_start + num_rows)  # transformers' feature rows
        held, keep = self._held_rows(rows)
        if keep.any():
            src = loaded.index_select(1, keep.nonzero().flatten().to(loaded.device))
            dst.index_copy_(1, held[keep].to(dst.device), src.to(dst.device, dst.dtype))

    def _held_rows(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Where each of transformers' feature ``rows`` goes in the held parameter, and
        whether this rank holds it at all (its intermediate slice)."""
        p = self.partition
        I = p.intermediate_size  # noqa: E741
        if self.kind == GATE_UP:
            if self.layout.is_concatenated:
                which, feature = rows // I, rows % I  # [gate; up]
            else:
                which, feature = rows % 2, rows // 2  # g0, u0, g1, u1, ...
        else:
            which, feature = torch.zeros_like(rows), rows
        local = feature - p.intermediate_start
        keep = (local >= 0) & (local < p.local_intermediate_size)
        return which * p.local_intermediate_size + local, keep
