"""Per-step batch description shared by every attention layer of a forward pass."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(slots=True)
class InputMetadata:
    """Where this step's tokens come from and where their K/V go.

    All sequences' new tokens form one flattened stream of ``T`` tokens; sequence ``b``
    owns ``query_start_loc[b]:query_start_loc[b+1]``. A batch may mix prefill chunks
    (several new tokens, possibly after cached context) and decodes (one new token).

    Worked example, block_size 4: sequence 0 is a fresh 3-token prompt in blocks [7];
    sequence 1 has 5 cached tokens in blocks [2, 9] and decodes its 6th token::

        slot_mapping    = [28, 29, 30, 37]   # block * block_size + offset, per token
        query_start_loc = [0, 3, 4]
        seq_lens        = [3, 6]             # whole context incl. this step's tokens
        block_tables    = [[7, -1], [2, 9]]  # -1 pads unused entries
        max_query_len = 3, max_seq_len = 6, num_prefill_tokens = 3
        logits_indices  = [2, 3]             # last token of each sequence

    Fields:
        slot_mapping: ``[T]`` int64 cache slot of each new token; ``< 0`` means "do not
            store" (padding tokens of CUDA-graph batches).
        query_start_loc: ``[B+1]`` int32 prefix sums of query lengths.
        seq_lens: ``[B]`` int32 total context per sequence, including this step's tokens.
        block_tables: ``[B, max_blocks]`` int32 physical block ids, ``-1`` padded.
        max_query_len / max_seq_len: host-side maxima (kernel grid sizes).
        num_prefill_tokens: tokens that belong to sequences with more than one query token.
        logits_indices: ``[N]`` int64 rows of the hidden states to turn into logits.
        seq_lens_cpu / query_lens_cpu: host copies, so layers never sync with the device.
    """

    slot_mapping: torch.Tensor
    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    block_tables: torch.Tensor
    max_query_len: int
    max_seq_len: int
    num_prefill_tokens: int
    logits_indices: torch.Tensor
    seq_lens_cpu: list[int] | None = None
    query_lens_cpu: list[int] | None = None

    def __post_init__(self) -> None:
        num_seqs = self.seq_lens.shape[0]
        if self.query_start_loc.shape[0] != num_seqs + 1:
            raise ValueError(
                f"query_start_loc has {self.query_start_loc.shape[0]} entries for "
                f"{num_seqs} sequences; expected {num_seqs + 1}"
            )
        if self.block_tables.dim() != 2 or self.block_tables.shape[0] != num_seqs:
            raise ValueError(
                f"block_tables must be [num_seqs={num_seqs}, max_blocks], got "
                f"{tuple(self.block_tables.shape)}"
            )

    @property
    def num_seqs(self) -> int:
        return self.seq_lens.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.slot_mapping.shape[0]

    def host_seq_lens(self) -> list[int]:
        return self.seq_lens_cpu if self.seq_lens_cpu is not None else self.seq_lens.tolist()

    def host_query_lens(self) -> list[int]:
        if self.query_lens_cpu is not None:
            return self.query_lens_cpu
        loc = self.query_start_loc.tolist()
        return [loc[i + 1] - loc[i] for i in range(len(loc) - 1)]

    @classmethod
    def build(
        cls,
        block_tables: Sequence[Sequence[int]],
        context_lens: Sequence[int],
        query_lens: Sequence[int],
        block_size: int,
        device: torch.device | str = "cpu",
        logits_indices: Sequence[int] | None = None,
    ) -> InputMetadata:
        """Metadata for sequences that already hold ``context_lens`` cached tokens and
        append ``query_lens`` new ones, with the given per-sequence block tables.

        ``logits_indices`` defaults to the last new token of every sequence.
        """
        if not (len(block_tables) == len(context_lens) == len(query_lens)):
            raise ValueError("block_tables, context_lens and query_lens differ in length")
        slots: list[int] = []
        starts = [0]
        seq_lens: list[int] = []
        for table, ctx, qlen in zip(block_tables, context_lens, query_lens):
            if qlen <= 0:
                raise ValueError(f"every sequence needs at least one new token, got {qlen}")
            total = ctx + qlen
            if total > len(table) * block_size:
                raise ValueError(f"{total} tokens do not fit {len(table)} blocks of {block_size}")
            for pos in range(ctx, total):
                slots.append(table[pos // block_size] * block_size + pos % block_size)
            starts.append(starts[-1] + qlen)
            seq_lens.append(total)
        max_blocks = max((len(t) for t in block_tables), default=0)
        padded = [list(t) + [-1] * (max_blocks - len(t)) for t in block_tables]
        if logits_indices is None:
            logits_indices = [s - 1 for s in starts[1:]]
        query_lens = list(query_lens)
        return cls(
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
            query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
            block_tables=torch.tensor(padded, dtype=torch.int32, device=device).view(
                len(block_tables), max_blocks
            ),
            max_query_len=max(query_lens, default=0),
            max_seq_len=max(seq_lens, default=0),
            num_prefill_tokens=sum(q for q in query_lens if q > 1),
            logits_indices=torch.tensor(list(logits_indices), dtype=torch.int64, device=device),
            seq_lens_cpu=seq_lens,
            query_lens_cpu=query_lens,
        )
