"""Vocabulary-parallel embedding and LM head: drop-in replacements for `nn.Embedding`
and the final `nn.Linear(hidden, vocab)`.

The vocabulary is padded to a multiple of 64 * tp and split into equal contiguous
ranges, one per rank; the padding rows are zero and never reach the caller. The LM
head uses the same partitioning, so `lm_head.weight = embed_tokens.weight` ties them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from runtime.parallel.state import (
    get_tp_rank,
    get_tp_size,
    tensor_model_parallel_all_gather,
    tensor_model_parallel_all_reduce,
)
from runtime.parallel.weights import check_loaded_shape, copy_checked, make_param

# Padding the vocabulary to a multiple of 64 per rank keeps the logits matmul aligned.
VOCAB_PAD_TO = 64


def pad_vocab_size(vocab_size: int, tp_size: int, pad_to: int = VOCAB_PAD_TO) -> int:
    """`vocab_size` rounded up to a multiple of `pad_to * tp_size`."""
    multiple = pad_to * tp_size
    return -(-vocab_size // multiple) * multiple


class VocabParallelEmbedding(nn.Module):
    """Embedding whose rows (token ids) are split over TP ranks.

    Each rank looks up the ids that fall in its range, writes zeros for the others,
    and an all-reduce sums the partial results into every token's embedding.
    `num_embeddings` / `embedding_dim` / `padding_idx` are nn.Embedding's (full vocab).
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        padding_idx: int | None = None,
        params_dtype: torch.dtype | None = None,
    ):
        super().__init__()
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        # Only shapes the gradient in training; kept because HF code may read it.
        self.padding_idx = padding_idx
        self.tp_size = get_tp_size()
        self.tp_rank = get_tp_rank()
        self.num_embeddings_padded = pad_vocab_size(num_embeddings, self.tp_size)
        self.num_embeddings_per_partition = self.num_embeddings_padded // self.tp_size
        self.vocab_start_index = self.tp_rank * self.num_embeddings_per_partition
        self.vocab_end_index = self.vocab_start_index + self.num_embeddings_per_partition
        # Rows of this rank's shard that hold real tokens (the rest is padding).
        self.num_real_rows = max(
            0, min(self.vocab_end_index, num_embeddings) - self.vocab_start_index
        )
        self.weight = make_param(
            self.num_embeddings_per_partition, embedding_dim, dtype=params_dtype
        )
        self.weight.weight_loader = self.weight_loader

    def weight_loader(
        self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: object = None
    ) -> None:
        if shard_id is not None:
            raise ValueError(f"{type(self).__name__} takes no shard id, got {shard_id!r}")
        full = (self.num_embeddings, *param.shape[1:])  # weight [V, D] or LM-head bias [V]
        check_loaded_shape(loaded_weight, full, param)
        n = self.num_real_rows
        if n > 0:  # a small vocabulary can leave a rank with padding only
            copy_checked(param.data[:n], loaded_weight.narrow(0, self.vocab_start_index, n))
        param.data[n:].zero_()  # padding rows: zero logits/embeddings, trimmed anyway

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight)  # [..., D]
        in_range = (input_ids >= self.vocab_start_index) & (input_ids < self.vocab_end_index)
        local_ids = (input_ids - self.vocab_start_index) * in_range  # out-of-range ids -> row 0
        out = F.embedding(local_ids, self.weight)  # [..., D]
        out = out.masked_fill(~in_range.unsqueeze(-1), 0)  # other ranks own these tokens
        return tensor_model_parallel_all_reduce(out)  # [..., D]

    def extra_repr(self) -> str:
        return (
            f"{self.num_embeddings}, {self.embedding_dim}, "
            f"num_embeddings_per_partition={self.num_embeddings_per_partition}, "
            f"tp_size={self.tp_size}"
        )


class ParallelLMHead(VocabParallelEmbedding):
    """The output projection hidden -> vocab, split over TP ranks by vocabulary rows.

    `forward(h)` returns full-vocabulary logits `[..., num_embeddings]` on every rank
    (local logits, all-gathered, padding trimmed), so HF's `logits = self.lm_head(h)`
    works unchanged. Optional `bias` (phi, gpt-j) is split like the rows.
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        bias: bool = False,
        params_dtype: torch.dtype | None = None,
    ):
        super().__init__(num_embeddings, embedding_dim, params_dtype=params_dtype)
        # nn.Linear-style names, for code that reads them.
        self.in_features = embedding_dim
        self.out_features = num_embeddings
        if bias:
            self.bias = make_param(self.num_embeddings_per_partition, dtype=params_dtype)
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        logits = F.linear(hidden_states, self.weight, self.bias)  # [..., V_padded / tp]
        logits = tensor_model_parallel_all_gather(logits, dim=-1)  # [..., V_padded]
        return logits[..., : self.num_embeddings]  # [..., V]
