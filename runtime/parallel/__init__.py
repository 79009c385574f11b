"""Tensor parallelism: process-group state, parallel linear/embedding layers, weight loaders."""

from runtime.parallel.embedding import ParallelLMHead, VocabParallelEmbedding, pad_vocab_size
from runtime.parallel.fused_linear import MergedColumnParallelLinear, QKVParallelLinear
from runtime.parallel.linear import ColumnParallelLinear, RowParallelLinear
from runtime.parallel.state import (
    destroy_parallel,
    divide,
    expert_parallel_enabled,
    get_tp_group,
    get_tp_rank,
    get_tp_size,
    init_parallel,
    local_head_block,
    local_num_heads,
    local_num_kv_heads,
    tensor_model_parallel_all_gather,
    tensor_model_parallel_all_reduce,
)
from runtime.parallel.weights import ModuleListShard, default_weight_loader

__all__ = [
    "ColumnParallelLinear",
    "MergedColumnParallelLinear",
    "ModuleListShard",
    "ParallelLMHead",
    "QKVParallelLinear",
    "RowParallelLinear",
    "VocabParallelEmbedding",
    "default_weight_loader",
    "destroy_parallel",
    "divide",
    "expert_parallel_enabled",
    "get_tp_group",
    "get_tp_rank",
    "get_tp_size",
    "init_parallel",
    "local_head_block",
    "local_num_heads",
    "local_num_kv_heads",
    "pad_vocab_size",
    "tensor_model_parallel_all_gather",
    "tensor_model_parallel_all_reduce",
]
