"""`ModelRunner`: turns a scheduled step into tensors and runs the model on them.

`prepare_step` (host side, numpy, no per-token Python loop) flattens the step into
`StepInputs`, which is small and picklable: rank 0 builds it once and, under tensor
parallelism, broadcasts it to the other ranks. `ModelRunner.execute` uploads it (one
packed copy from pinned memory on CUDA), builds the `InputMetadata` with its host copies
(so attention layers never sync), runs ``model.forward`` and ``model.compute_logits``.
Decode-only batches replay CUDA graphs (see `cuda_graphs.py`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from runtime.attention.metadata import InputMetadata
from runtime.engine.scheduler import SchedulerOutput


@dataclass
class StepInputs:
    """One step, flattened: ``T`` tokens of ``B`` sequences (see `InputMetadata`)."""

    input_ids: np.ndarray  # [T] int64
    positions: np.ndarray  # [T] int64
    slot_mapping: np.ndarray  # [T] int64
    query_start_loc: np.ndarray  # [B+1] int64
    seq_lens: np.ndarray  # [B] int64, whole context incl. this step's tokens
    block_tables: np.ndarray  # [B, M] int64, -1 padded; M covers the longest seq_len
    logits_indices: np.ndarray  # [N] int64, last token of each sampling sequence
    max_query_len: int
    max_seq_len: int
    num_prefill_tokens: int

    @property
    def num_seqs(self) -> int:
        return self.seq_lens.shape[0]

    @property
    def is_decode_only(self) -> bool:
        return self.max_query_len == 1


def prepare_step(out: SchedulerOutput, block_size: int) -> StepInputs:
    seqs = out.seqs
    num_seqs = len(seqs)
    query_lens = np.fromiter(out.num_new_tokens, dtype=np.int64, count=num_seqs)  # [B]
    starts = np.fromiter((s.num_computed_tokens for s in seqs), dtype=np.int64, count=num_seqs)
    query_start_loc = np.zeros(num_seqs + 1, dtype=np.int64)  # [B+1]
    np.cumsum(query_lens, out=query_start_loc[1:])
    seq_lens = starts + query_lens  # [B]
    max_query_len = int(query_lens.max())
    if max_query_len == 1:  # one token per sequence (decodes, or 1-token prompt chunks)
        positions = starts  # [T == B]
        input_ids = np.fromiter(
            (s.token_ids[c] for s, c in zip(seqs, starts.tolist())), dtype=np.int64, count=num_seqs
        )
        seq_of_token = np.arange(num_seqs)
    else:
        seq_of_token = np.repeat(np.arange(num_seqs), query_lens)  # [T]
        positions = (
            np.arange(query_start_loc[-1])
            - query_start_loc[:-1][seq_of_token]
            + starts[seq_of_token]
        )  # [T]
        ids: list[int] = []
        for s, c, n in zip(seqs, starts.tolist(), out.num_new_tokens):
            ids.extend(s.token_ids[c : c + n])
        input_ids = np.array(ids, dtype=np.int64)
    blocks_needed = (seq_lens + block_size - 1) // block_size  # [B]
    block_tables = np.full((num_seqs, int(blocks_needed.max())), -1, dtype=np.int64)  # [B, M]
    for i, (s, n) in enumerate(zip(seqs, blocks_needed.tolist())):
        block_tables[i, :n] = s.block_table[:n]
    slot_mapping = (
        block_tables[seq_of_token, positions // block_size] * block_size + positions % block_size
    )  # [T]
    sample = np.fromiter(out.sample, dtype=bool, count=num_seqs)
    return StepInputs(
        input_ids=input_ids,
        positions=positions,
        slot_mapping=slot_mapping,
        query_start_loc=query_start_loc,
        seq_lens=seq_lens,
        block_tables=block_tables,
        logits_indices=query_start_loc[1:][sample] - 1,
        max_query_len=max_query_len,
        max_seq_len=int(seq_lens.max()),
        num_prefill_tokens=int(query_lens[query_lens > 1].sum()),
    )


def dummy_prefill_inputs(lens: list[int], block_size: int) -> StepInputs:
    """Whole prompts of token 0 with the given lengths, in consecutive blocks from 0
    (memory profiling)."""
    num_seqs = len(lens)
    query_lens = np.array(lens, dtype=np.int64)  # [B]
    query_start_loc = np.zeros(num_seqs + 1, dtype=np.int64)  # [B+1]
    np.cumsum(query_lens, out=query_start_loc[1:])
    blocks = (query_lens + block_size - 1) // block_size  # [B]
    first = np.concatenate([[0], np.cumsum(blocks)[:-1]])  # [B]
    width = int(blocks.max())
    block_tables = first[:, None] + np.arange(width)[None, :]  # [B, M]
    block_tables[np.arange(width)[None, :] >= blocks[:, None]] = -1
    seq_of_token = np.repeat(np.arange(num_seqs), query_lens)  # [T]
    positions = np.arange(query_start_loc[-1]) - query_start_loc[:-1][seq_of_token]  # [T]
    slot_mapping = (
        first[seq_of_token] + positions // block_size
    ) * block_size + positions % block_size
    return StepInputs(
        input_ids=np.zeros(query_start_loc[-1], dtype=np.int64),
        positions=positions,
        slot_mapping=slot_mapping,
        query_start_loc=query_start_loc,
        seq_lens=query_lens,
        block_tables=block_tables,
        logits_indices=query_start_loc[1:] - 1,
        max_query_len=int(query_lens.max()),
        max_seq_len=int(query_lens.max()),
        num_prefill_tokens=int(query_lens[query_lens > 1].sum()),
    )


class ModelRunner:
    """Runs one rank's model over its KV caches; eager, or CUDA graphs for decodes."""

    def __init__(
        self,
        model: nn.Module,
        kv_caches: list[torch.Tensor],
        device: torch.device,
        max_num_seqs: int = 256,
        max_model_len: int = 2048,
        use_cuda_graphs: bool = False,
        agree: Callable[[bool], bool] | None = None,
        warm_up: bool = False,
    ) -> None:
        """`warm_up`: compile every attention-kernel variant now (kernel_warmup.py), not in
        the first serving steps. `agree`: the TP ranks' vote on their graph captures."""
        self.model = model
        self.kv_caches = kv_caches
        self.device = device
        self.block_size = kv_caches[0].shape[2]
        self._staging: torch.Tensor | None = None
        self.graphs = None
        if warm_up:
            from runtime.engine.kernel_warmup import warm_up_kernels

            warm_up_kernels(self, max_num_seqs)
        if use_cuda_graphs and device.type == "cuda":
            from runtime.engine.cuda_graphs import DecodeGraphs

            self.graphs = DecodeGraphs.capture(self, max_num_seqs, max_model_len, agree)

    def release_graphs(self) -> None:
        """Destroy the decode graphs (before the TP group goes; see DecodeGraphs.release)."""
        if self.graphs is not None:
            self.graphs.release()
            self.graphs = None

    def upload(self, arrays: list[np.ndarray]) -> list[torch.Tensor]:
        """int64 host arrays -> device tensors (same shapes): on CUDA, packed into one
        pinned buffer and copied once, asynchronously."""
        if self.device.type != "cuda":
            return [torch.from_numpy(np.ascontiguousarray(a)) for a in arrays]
        total = sum(a.size for a in arrays)
        if self._staging is None or self._staging.numel() < total:
            self._staging = torch.empty(max(total, 1 << 16), dtype=torch.int64, pin_memory=True)
        host = self._staging.numpy()
        offset = 0
        for a in arrays:
            host[offset : offset + a.size] = a.reshape(-1)
            offset += a.size
        # Reusing the buffer next step is safe: every step ends with a device->host read
        # of the sampled tokens, which waits for this copy.
        packed = self._staging[:total].to(self.device, non_blocking=True)  # [total]
        out, offset = [], 0
        for a in arrays:
            out.append(packed[offset : offset + a.size].view(a.shape))
            offset += a.size
        return out

    def build(self, inputs: StepInputs) -> tuple[torch.Tensor, torch.Tensor, InputMetadata]:
        ids, pos, slots, qsl, seq_lens, tables, logits_idx = self.upload([
            inputs.input_ids, inputs.positions, inputs.slot_mapping, inputs.query_start_loc,
            inputs.seq_lens, inputs.block_tables, inputs.logits_indices,
        ])  # fmt: skip
        metadata = InputMetadata(
            slot_mapping=slots,
            query_start_loc=qsl.to(torch.int32),
            seq_lens=seq_lens.to(torch.int32),
            block_tables=tables.to(torch.int32),
            max_query_len=inputs.max_query_len,
            max_seq_len=inputs.max_seq_len,
            num_prefill_tokens=inputs.num_prefill_tokens,
            logits_indices=logits_idx,
            seq_lens_cpu=inputs.seq_lens.tolist(),
            query_lens_cpu=np.diff(inputs.query_start_loc).tolist(),
        )
        return ids, pos, metadata

    @torch.inference_mode()
    def execute(self, inputs: StepInputs) -> torch.Tensor | None:
        """Logits ``[N, vocab]`` for the step's sampling sequences (None when none samples).

        Every TP rank calls this with the same inputs: the model's collectives pair up.
        """
        if self.graphs is not None and inputs.is_decode_only and self.graphs.fits(inputs):
            hidden, metadata = self.graphs.run(inputs)
        else:
            ids, pos, metadata = self.build(inputs)
            hidden = self.model(ids, pos, self.kv_caches, metadata)  # [T, hidden]
        if inputs.logits_indices.size == 0:
            return None
        return self.model.compute_logits(hidden, metadata)  # [N, vocab]
