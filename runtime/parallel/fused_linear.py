"""Column-parallel layers that hold several projections in one matrix.

`MergedColumnParallelLinear` stacks independent projections (gate|up); each is split
over TP ranks separately, so every rank holds [gate_r | up_r]. `QKVParallelLinear`
does the same for attention heads, [Q_r | K_r | V_r]. Both load either one projection
at a time (`shard_id` = 0, 1, ... or "q"/"k"/"v", as vLLM's stacked_params_mapping
does for Llama's separate q_proj/k_proj/v_proj) or an already-fused checkpoint tensor
(`shard_id=None`, e.g. Phi-3's `gate_up_proj` and `qkv_proj`), which is cut into its
projections first and sharded segment by segment.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from runtime.parallel.linear import ColumnParallelLinear
from runtime.parallel.state import (
    divide,
    get_tp_size,
    local_num_heads,
    local_num_kv_heads,
    tensor_model_parallel_all_gather,
)
from runtime.parallel.weights import check_loaded_shape, copy_checked


class _StackedColumnLinear(ColumnParallelLinear):
    """Rows of the local weight are segments; segment i is rank r's shard of projection i.

    Subclasses fill `self._segments`: per shard id, (full size, local offset, local size,
    offset of this rank's shard within the full projection).
    """

    _segments: dict[object, tuple[int, int, int, int]]

    def weight_loader(
        self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: object = None
    ) -> None:
        loaded = self._as_out_in(param, loaded_weight)
        tail = tuple(param.shape[1:])  # () for a bias, (in,) for a weight
        if shard_id is None:
            # A fused checkpoint tensor: [sum of full sizes, ...] in shard-id order.
            total = sum(full for full, _, _, _ in self._segments.values())
            check_loaded_shape(loaded, (total, *tail), param)
            start = 0
            for sid, (full, _, _, _) in self._segments.items():
                self._load_segment(param, loaded.narrow(0, start, full), sid)
                start += full
            return
        if shard_id not in self._segments:
            raise ValueError(
                f"{type(self).__name__} shard id must be one of {list(self._segments)} "
                f"or None (fused), got {shard_id!r}"
            )
        self._load_segment(param, loaded, shard_id)

    def _load_segment(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object) -> None:
        full, local_offset, local_size, source_offset = self._segments[shard_id]
        check_loaded_shape(loaded, (full, *param.shape[1:]), param)
        dst = param.data.narrow(0, local_offset, local_size)
        copy_checked(dst, loaded.narrow(0, source_offset, local_size))


class MergedColumnParallelLinear(_StackedColumnLinear):
    """Several column-parallel projections of the same input in one matmul (gate|up).

    Shard ids are the positions in `output_sizes` (gate=0, up=1). With
    `gather_output=True` the output is the unsharded `[..., gate | up]`.
    """

    def __init__(
        self,
        input_size: int,
        output_sizes: list[int],
        bias: bool = True,
        gather_output: bool = False,
        params_dtype: torch.dtype | None = None,
        transposed: bool = False,
    ):
        tp = get_tp_size()
        self.output_sizes = list(output_sizes)
        locals_ = [divide(size, tp) for size in self.output_sizes]
        super().__init__(
            input_size, sum(self.output_sizes), bias, gather_output, params_dtype, transposed
        )
        self._local_sizes = locals_
        self._segments = {}
        offset = 0
        for i, (full, local) in enumerate(zip(self.output_sizes, locals_)):
            self._segments[i] = (full, offset, local, self.tp_rank * local)
            offset += local

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)  # [..., sum(output_sizes) / tp]
        if not self.gather_output or self.tp_size == 1:
            return y
        # Gathered rank by rank the columns read [gate_0|up_0|gate_1|up_1]; put them back in
        # the unsharded layout [gate|up] that the replaced nn.Linear produced.
        y = tensor_model_parallel_all_gather(y, dim=-1)  # [..., sum(output_sizes)]
        per_rank = y.unflatten(-1, (self.tp_size, -1))  # [..., tp, sum / tp]
        parts = per_rank.split(self._local_sizes, dim=-1)  # each [..., tp, size_i / tp]
        return torch.cat([p.flatten(-2) for p in parts], dim=-1)  # [..., sum(output_sizes)]


class QKVParallelLinear(_StackedColumnLinear):
    """Fused Q/K/V projection split by attention heads: rank r holds [Q_r | K_r | V_r].

    `q_size` / `kv_size` are this rank's widths, for the caller's
    `q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)`.
    """

    def __init__(
        self,
        hidden_size: int,
        head_size: int,
        total_num_heads: int,
        total_num_kv_heads: int | None = None,
        bias: bool = True,
        params_dtype: torch.dtype | None = None,
        transposed: bool = False,
    ):
        tp = get_tp_size()
        total_num_kv_heads = total_num_kv_heads or total_num_heads
        self.head_size = head_size
        self.total_num_heads = total_num_heads
        self.total_num_kv_heads = total_num_kv_heads
        self.num_heads = local_num_heads(total_num_heads)
        self.num_kv_heads = local_num_kv_heads(total_num_kv_heads)
        # With more ranks than KV heads, each KV head is replicated on tp // total_kv
        # ranks: every rank's query heads need a whole KV head, and cutting one head's
        # dimension over ranks would need a collective inside attention.
        self.num_kv_head_replicas = max(1, tp // total_num_kv_heads)
        self.q_size = self.num_heads * head_size
        self.kv_size = self.num_kv_heads * head_size
        # The "full" output the column split sees: replicated KV heads count once per rank.
        output_size = (total_num_heads + 2 * self.num_kv_heads * tp) * head_size
        super().__init__(hidden_size, output_size, bias, False, params_dtype, transposed)
        q_full = total_num_heads * head_size
        kv_full = total_num_kv_heads * head_size
        # Ranks r*replicas .. (r+1)*replicas - 1 share KV head block r.
        kv_source = (self.tp_rank // self.num_kv_head_replicas) * self.kv_size
        self._segments = {
            "q": (q_full, 0, self.q_size, self.tp_rank * self.q_size),
            "k": (kv_full, self.q_size, self.kv_size, kv_source),
            "v": (kv_full, self.q_size + self.kv_size, self.kv_size, kv_source),
        }
