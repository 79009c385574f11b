"""Per-step batch description shared by every attention layer of a forward pass.

The engine builds it (`runtime.engine.step_inputs.StepInputs`); generated models and
attention layers only read it."""

from __future__ import annotations

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
        decode_ids / prefill_ids: ``[Bd]`` / ``[Bp]`` int32, in a batch that mixes decodes
            (one new token) and prefills, the sequences of each kind. Built with the step
            inputs (once per step, uploaded with them); None: the first attention layer
            makes them from the host query lengths and leaves them here for the others.
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
    decode_ids: torch.Tensor | None = None
    prefill_ids: torch.Tensor | None = None

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

    def mixed_split(self) -> tuple[torch.Tensor, torch.Tensor]:
        """`decode_ids`, `prefill_ids` of a batch mixing decodes and prefills (made once
        from the host query lengths when the builder did not supply them)."""
        if self.decode_ids is None or self.prefill_ids is None:
            lens = self.host_query_lens()
            device = self.query_start_loc.device
            self.decode_ids = torch.tensor(
                [b for b, n in enumerate(lens) if n == 1], dtype=torch.int32
            ).to(device)
            self.prefill_ids = torch.tensor(
                [b for b, n in enumerate(lens) if n > 1], dtype=torch.int32
            ).to(device)
        return self.decode_ids, self.prefill_ids
