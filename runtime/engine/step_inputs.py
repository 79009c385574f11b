"""`StepInputs`: one step of the model, flattened on the host, and the one builder of it.

Every path that runs the model builds its step here: the engine's scheduled steps
(`prepare_step`), the memory profile's dummy prefill, the kernel warm-up's dummy steps,
`hf2paged verify`'s parity driver, the demo and the tests. `StepInputs.build` turns
per-sequence block tables, cached-context lengths and new-token counts into the flat
arrays of `runtime.attention.InputMetadata` (numpy, no per-token Python loop);
`StepInputs` is small and picklable, so rank 0 builds it once and, under tensor
parallelism, broadcasts it to the other ranks. `to_device` makes the model's tensors.

Under asynchronous scheduling a step may be prepared before the host knows the token a
sequence's previous step sampled: its input id is then read on the device from that
step's sampled ids (``sampled_positions`` / ``sampled_rows``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch

from runtime.attention.metadata import InputMetadata

if TYPE_CHECKING:
    from runtime.engine.block_manager import BlockManager
    from runtime.engine.scheduler import SchedulerOutput

# int64 host arrays -> device tensors of the same shapes (ModelRunner.upload on CUDA).
Upload = Callable[[list[np.ndarray]], list[torch.Tensor]]

_EMPTY = np.zeros(0, dtype=np.int64)  # never written to


def _empty() -> np.ndarray:
    return _EMPTY


class StepTensors(NamedTuple):
    """A step on the device: the model's ``forward(input_ids, positions, kv_caches, metadata)``."""

    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    metadata: InputMetadata


@dataclass
class StepInputs:
    """One step, flattened: ``T`` tokens of ``B`` sequences (field meanings: `InputMetadata`)."""

    input_ids: np.ndarray  # [T] int64
    positions: np.ndarray  # [T] int64, 0-based per sequence
    slot_mapping: np.ndarray  # [T] int64, < 0: store nothing
    query_start_loc: np.ndarray  # [B+1] int64
    seq_lens: np.ndarray  # [B] int64, whole context incl. this step's tokens
    block_tables: np.ndarray  # [B, M] int64, -1 padded
    logits_indices: np.ndarray  # [N] int64 rows whose logits the step returns
    max_query_len: int
    max_seq_len: int
    num_prefill_tokens: int
    # Tokens whose id is the previous step's sample: input_ids[sampled_positions[i]] =
    # that step's sampled ids[sampled_rows[i]] (on the device; 0 on the host until then).
    sampled_positions: np.ndarray = field(default_factory=_empty)  # [P] int64
    sampled_rows: np.ndarray = field(default_factory=_empty)  # [P] int64
    # Mixed steps (decodes beside prompt chunks): which sequences decode / prefill.
    decode_ids: np.ndarray = field(default_factory=_empty)  # [Bd] int64
    prefill_ids: np.ndarray = field(default_factory=_empty)  # [Bp] int64

    @property
    def num_seqs(self) -> int:
        return self.seq_lens.shape[0]

    @property
    def is_decode_only(self) -> bool:
        return self.max_query_len == 1

    @classmethod
    def build(
        cls,
        block_tables: np.ndarray | Sequence[Sequence[int]],
        context_lens: np.ndarray | Sequence[int],
        query_lens: np.ndarray | Sequence[int],
        block_size: int,
        input_ids: np.ndarray | Sequence[int] | None = None,
        logits_indices: np.ndarray | Sequence[int] | None = None,
    ) -> StepInputs:
        """Sequences that hold ``context_lens[b]`` cached tokens append ``query_lens[b]``
        new ones (``input_ids``, flattened in sequence order; zeros when omitted), stored
        through their block tables (``[B, M]``, -1 padded, or one list per sequence).

        ``logits_indices`` defaults to the last new token of every sequence; pass every
        row to compare all positions (parity), or none for a step that samples nothing.
        """
        context = np.asarray(context_lens, dtype=np.int64).reshape(-1)  # [B]
        query = np.asarray(query_lens, dtype=np.int64).reshape(-1)  # [B]
        num_seqs = query.shape[0]
        if context.shape[0] != num_seqs or len(block_tables) != num_seqs:
            raise ValueError("block_tables, context_lens and query_lens differ in length")
        if num_seqs == 0 or query.min() < 1 or context.min() < 0:
            raise ValueError("a step needs sequences of >= 1 new token after >= 0 cached ones")
        tables = _padded(block_tables)  # [B, M]
        query_start_loc = np.zeros(num_seqs + 1, dtype=np.int64)  # [B+1]
        np.cumsum(query, out=query_start_loc[1:])
        num_tokens = int(query_start_loc[-1])
        seq_lens = context + query  # [B]
        max_query_len = int(query.max())
        if max_query_len == 1:  # one token per sequence (decodes): no repeat needed
            seq_of_token = np.arange(num_seqs)  # [T == B]
            positions = context  # [T]
        else:
            seq_of_token = np.repeat(np.arange(num_seqs), query)  # [T]
            positions = np.arange(num_tokens) - query_start_loc[:-1][seq_of_token]
            positions += context[seq_of_token]  # [T]
        if (-(-seq_lens // block_size) > tables.shape[1]).any():
            raise ValueError(f"{seq_lens.tolist()} tokens do not fit their block tables")
        blocks = tables[seq_of_token, positions // block_size]  # [T]
        if (blocks < 0).any():
            raise ValueError("a block table has -1 where this step stores a token")
        if input_ids is None:
            ids = np.zeros(num_tokens, dtype=np.int64)
        else:
            ids = np.asarray(input_ids, dtype=np.int64).reshape(-1)  # [T]
            if ids.shape[0] != num_tokens:
                raise ValueError(f"{ids.shape[0]} input ids for {num_tokens} new tokens")
        if logits_indices is None:
            logits = query_start_loc[1:] - 1  # [B]
        else:
            logits = np.asarray(logits_indices, dtype=np.int64).reshape(-1)  # [N]
        decode_ids = prefill_ids = _EMPTY
        if max_query_len > 1:
            decode = query == 1  # [B]
            if decode.any():  # mixed: attention splits the batch by these
                decode_ids = np.flatnonzero(decode)
                prefill_ids = np.flatnonzero(~decode)
        return cls(
            input_ids=ids,
            positions=positions,
            slot_mapping=blocks * block_size + positions % block_size,
            query_start_loc=query_start_loc,
            seq_lens=seq_lens,
            block_tables=tables,
            logits_indices=logits,
            max_query_len=max_query_len,
            max_seq_len=int(seq_lens.max()),
            num_prefill_tokens=int(query[query > 1].sum()),
            decode_ids=decode_ids,
            prefill_ids=prefill_ids,
        )

    def to_device(
        self,
        device: torch.device | str = "cpu",
        upload: Upload | None = None,
        sampled: torch.Tensor | None = None,
    ):
        """`StepTensors` on `device`; `upload` moves the int64 arrays (ModelRunner's packs
        them into one pinned copy on CUDA). The metadata keeps host copies of the sequence
        and query lengths and the mixed-batch split, so attention layers never synchronise
        with the device. `sampled`: the previous step's sampled ids on `device` (``[N]``
        int64), read where ``sampled_positions`` say."""
        if upload is None:
            upload = lambda arrays: [torch.from_numpy(a).to(device) for a in arrays]  # noqa: E731
        arrays = [
            self.input_ids, self.positions, self.slot_mapping, self.query_start_loc,
            self.seq_lens, self.block_tables, self.logits_indices,
        ]  # fmt: skip
        split = self.decode_ids.size > 0
        if split:
            arrays += [self.decode_ids, self.prefill_ids]
        if self.sampled_positions.size:
            arrays += [self.sampled_positions, self.sampled_rows]
        ids, pos, slots, qsl, seq_lens, tables, logits, *rest = upload(arrays)
        decode_ids = prefill_ids = None
        if split:
            decode_ids, prefill_ids = rest[0].to(torch.int32), rest[1].to(torch.int32)
            rest = rest[2:]
        if rest:
            fill_sampled(ids, rest[0], rest[1], sampled)
        metadata = InputMetadata(
            slot_mapping=slots,
            query_start_loc=qsl.to(torch.int32),
            seq_lens=seq_lens.to(torch.int32),
            block_tables=tables.to(torch.int32),
            max_query_len=self.max_query_len,
            max_seq_len=self.max_seq_len,
            num_prefill_tokens=self.num_prefill_tokens,
            logits_indices=logits,
            seq_lens_cpu=self.seq_lens.tolist(),
            query_lens_cpu=np.diff(self.query_start_loc).tolist(),
            decode_ids=decode_ids,
            prefill_ids=prefill_ids,
        )
        return StepTensors(ids, pos, metadata)


def fill_sampled(
    input_ids: torch.Tensor,  # [T] int64, on the device
    positions: torch.Tensor,  # [P] int64
    rows: torch.Tensor,  # [P] int64
    sampled: torch.Tensor | None,  # [N] int64, the previous step's sampled ids
) -> None:
    """``input_ids[positions] = sampled[rows]``, on the device (no host sync)."""
    if sampled is None:
        raise RuntimeError("the step reads the previous step's samples, but none were kept")
    input_ids.index_copy_(0, positions, sampled.index_select(0, rows))


def _padded(block_tables) -> np.ndarray:
    """``[B, M]`` int64, -1 padded, from an array or one list per sequence."""
    if isinstance(block_tables, np.ndarray):
        return block_tables.astype(np.int64, copy=False).reshape(len(block_tables), -1)
    width = max((len(t) for t in block_tables), default=0)
    tables = np.full((len(block_tables), width), -1, dtype=np.int64)
    for i, table in enumerate(block_tables):
        tables[i, : len(table)] = table
    return tables


def prepare_step(
    out: SchedulerOutput,
    block_manager: BlockManager,
    sampled_rows: dict[int, int] | None = None,
) -> StepInputs:
    """The scheduler's step: each sequence's next ``num_new_tokens`` tokens after its
    computed ones, its block table (its row of the block manager's tables) cut to the
    blocks they reach; logits for the sequences that sample.

    A token the host does not know yet (pending: sampled by the step in flight) is read
    on the device from that step's sampled ids; `sampled_rows` maps a sequence id to its
    row there.
    """
    seqs = out.seqs
    num_seqs = len(seqs)
    block_size = block_manager.block_size
    query = np.fromiter(out.num_new_tokens, dtype=np.int64, count=num_seqs)  # [B]
    context = np.fromiter(out.num_computed_tokens, dtype=np.int64, count=num_seqs)  # [B]
    if int(query.max()) == 1:  # decodes: one token each, -1 where still pending
        ids = np.fromiter(
            (t[c] if c < len(t) else -1
             for t, c in zip([s.token_ids for s in seqs], out.num_computed_tokens)),
            dtype=np.int64, count=num_seqs,
        )  # fmt: skip
    else:
        flat: list[int] = []
        for s, c, n in zip(seqs, out.num_computed_tokens, out.num_new_tokens):
            tokens = s.token_ids
            flat.extend(tokens[c : c + n])
            if c + n > len(tokens):  # the chunk ends on the pending token
                assert c + n == len(tokens) + 1, "one pending token per sequence"
                flat.append(-1)
        ids = np.array(flat, dtype=np.int64)
    pending = np.flatnonzero(ids < 0)  # [P]
    rows = _EMPTY
    if pending.size:
        if sampled_rows is None:
            raise RuntimeError("the step needs sampled ids of a step that is not in flight")
        starts = np.cumsum(query) - query  # [B] first token of each sequence
        owner = np.searchsorted(starts, pending, side="right") - 1  # [P] sequence of each
        rows = np.fromiter(
            (sampled_rows[seqs[b].seq_id] for b in owner.tolist()), dtype=np.int64,
            count=pending.size,
        )  # fmt: skip
        ids[pending] = 0
    blocks_needed = (context + query + block_size - 1) // block_size  # [B]
    width = int(blocks_needed.max())
    tables = block_manager.tables[block_manager.rows_of(seqs), :width]  # [B, M] (a copy)
    tables[np.arange(width)[None, :] >= blocks_needed[:, None]] = -1
    sample = np.fromiter(out.sample, dtype=bool, count=num_seqs)
    last = np.cumsum(query) - 1  # [B] last new token of each sequence
    inputs = StepInputs.build(tables, context, query, block_size, ids, last[sample])
    inputs.sampled_positions, inputs.sampled_rows = pending, rows
    return inputs


def dummy_prefill(lens: list[int], block_size: int) -> StepInputs:
    """Whole prompts of token 0 with the given lengths, in consecutive blocks from 0
    (the memory profile's largest step)."""
    tables, first = [], 0
    for n in lens:
        count = -(-n // block_size)
        tables.append(range(first, first + count))
        first += count
    return StepInputs.build(tables, [0] * len(lens), lens, block_size)
