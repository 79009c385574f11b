"""CUDA graphs for decode-only steps: one graph per padded batch size.

A decode step launches a few hundred small kernels; replaying a captured graph removes
the launch cost. Everything a graph bakes in is part of its key or fixed for all of them:
the padded batch size (the key), the block-table width (``cdiv(max_model_len,
block_size)`` for every graph), ``max_query_len == 1``, ``num_prefill_tokens == 0`` (the
attention decode path reads no host value then) and the model, caches and dtype of this
runner. Inputs live in static buffers; a replay copies the step into them. Padding rows
decode a dummy token at slot -1 (nothing stored) over one key of block 0, and their
outputs are dropped. A compiled model (runtime/engine/compile.py) is captured as it
runs: compiled blocks with the attention kernels between them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
import torch.distributed as dist

from runtime.attention.metadata import InputMetadata
from runtime.engine.compile import MIN_COMPILED_TOKENS
from runtime.engine.step_inputs import fill_sampled

log = logging.getLogger(__name__)

# Called by every rank with "my capture succeeded"; True when all ranks' did.
Agreement = Callable[[bool], bool]


def graph_batch_sizes(max_num_seqs: int, smallest: int = 1) -> list[int]:
    """Padded batch sizes to capture: `smallest` (2 for a compiled model, whose blocks
    run eagerly on one token), 2, 4, 8, then every 16 up to ``min(max_num_seqs, 512)``."""
    sizes = [1, 2, 4, 8] + list(range(16, 513, 16))
    top = max(min(max_num_seqs, 512), smallest)
    return [s for s in sizes if smallest <= s < top] + [top]


class DecodeGraphs:
    """Captured decode graphs of one `ModelRunner`, keyed by padded batch size."""

    def __init__(self, runner, max_num_seqs: int, max_model_len: int) -> None:
        self.runner = runner
        # A compiled model runs its blocks eagerly on a single token: one sequence
        # replays the two-row graph instead (the padding row stores nothing).
        smallest = MIN_COMPILED_TOKENS if runner.compiled is not None else 1
        self.sizes = graph_batch_sizes(max_num_seqs, smallest)
        self.max_bs = self.sizes[-1]
        self.width = -(-max_model_len // runner.block_size)
        self.key_extra = (self.width, runner.block_size)  # fixed for every graph
        dev = runner.device
        n = self.max_bs
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(n, dtype=torch.int64, device=dev)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.int64, device=dev)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=dev)
        self.seq_lens = torch.ones(n, dtype=torch.int32, device=dev)
        self.block_tables = torch.zeros(n, self.width, dtype=torch.int32, device=dev)
        self.logits_indices = torch.arange(n, dtype=torch.int64, device=dev)
        self.graphs: dict[int, tuple] = {}  # bs -> (replay function, output [bs, hidden])
        self.captured: list[torch.cuda.CUDAGraph] = []

    def metadata(self, bs: int, max_seq_len: int) -> InputMetadata:
        return InputMetadata(
            slot_mapping=self.slot_mapping[:bs],
            query_start_loc=self.query_start_loc[: bs + 1],
            seq_lens=self.seq_lens[:bs],
            block_tables=self.block_tables[:bs],
            max_query_len=1,
            max_seq_len=max_seq_len,
            num_prefill_tokens=0,
            logits_indices=self.logits_indices[:bs],
            query_lens_cpu=[1] * bs,
        )

    @classmethod
    def capture(
        cls, runner, max_num_seqs: int, max_model_len: int, agree: Agreement | None = None
    ) -> DecodeGraphs | None:
        """Capture every size, or None (decode eagerly) when any capture fails.

        Under tensor parallelism every rank captures the same sizes in the same order
        (warm-up and capture both run the model's all-reduces, which must pair up), and
        `agree` (an all-reduce over the ranks' CPU group) makes all ranks keep graphs or
        all drop them after each size: a rank that failed alone would otherwise replay
        graphs while the others run eagerly, and their collectives would never meet.
        """
        graphs = cls(runner, max_num_seqs, max_model_len)
        try:
            graphs.capture_all(max_model_len, agree or (lambda ok: ok))
        except Exception as exc:  # noqa: BLE001 — a model that cannot be captured runs eagerly
            log.warning("CUDA graph capture failed (%s); decoding eagerly", exc)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            return None
        return graphs

    @torch.inference_mode()
    def capture_all(self, max_model_len: int, agree: Agreement) -> None:
        pool = None
        for bs in reversed(self.sizes):  # largest first: smaller graphs reuse its memory
            md = self.metadata(bs, max_model_len)
            args = (self.input_ids[:bs], self.positions[:bs], self.runner.kv_caches, md)
            error = None
            try:
                replay, hidden, pool = self.capture_one(args, pool)
            except Exception as exc:  # noqa: BLE001 — reported through the agreement first
                error = exc
            if not agree(error is None):
                raise error or RuntimeError("another tensor-parallel rank failed its capture")
            self.graphs[bs] = (replay, hidden)

    def capture_one(self, args: tuple, pool):
        """Capture ``model(*args)``; returns (replay function, its output, memory pool)."""
        model = self.runner.forward
        model(*args)  # warm-up: lazy initialisation and Triton compilation outside capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        # thread_local: NCCL's watchdog thread queries events while this thread captures
        # (a "global" capture makes those queries fail).
        mode = "thread_local" if dist.is_initialized() else "global"
        with torch.cuda.graph(graph, pool=pool, capture_error_mode=mode):
            hidden = model(*args)  # [bs, hidden]
        torch.cuda.synchronize()
        self.captured.append(graph)
        return graph.replay, hidden, graph.pool() if pool is None else pool

    def release(self) -> None:
        """Destroy the captured graphs. Under TP this must come before the process group
        is destroyed: a graph that captured an NCCL collective holds a reference on the
        communicator, and destroying the group then waits for it forever (pytorch#115388)."""
        if self.captured:
            torch.cuda.synchronize()
        for graph in self.captured:
            graph.reset()
        self.captured.clear()
        self.graphs.clear()

    def fits(self, inputs) -> bool:
        return inputs.num_seqs <= self.max_bs and inputs.block_tables.shape[1] <= self.width

    def run(self, inputs) -> tuple[torch.Tensor, InputMetadata]:
        """Replay the smallest graph that holds the batch; hidden states ``[B, hidden]``."""
        b = inputs.num_seqs
        bs = next(s for s in self.sizes if s >= b)
        arrays = [
            inputs.input_ids, inputs.positions, inputs.slot_mapping, inputs.seq_lens,
            inputs.block_tables, inputs.logits_indices,
        ]  # fmt: skip
        if inputs.sampled_positions.size:  # ids the previous step sampled, on the device
            arrays += [inputs.sampled_positions, inputs.sampled_rows]
        ids, pos, slots, seq_lens, tables, logits_idx, *sampled = self.runner.upload(arrays)
        if sampled:
            fill_sampled(ids, *sampled, self.runner.sampled)
        self.input_ids[:b].copy_(ids)
        self.positions[:b].copy_(pos)
        self.slot_mapping[:b].copy_(slots)
        self.seq_lens[:b].copy_(seq_lens)
        self.block_tables[:b, : tables.shape[1]].copy_(tables)
        if bs > b:  # padding rows: store nothing, read one key of block 0
            self.slot_mapping[b:bs].fill_(-1)
            self.seq_lens[b:bs].fill_(1)
            self.block_tables[b:bs, 0].fill_(0)
        replay, hidden = self.graphs[bs]
        replay()
        md = self.metadata(b, inputs.max_seq_len)
        md.seq_lens_cpu = inputs.seq_lens.tolist()
        # Not every row samples (a 1-token prompt chunk has no logits).
        md.logits_indices = logits_idx
        return hidden[:b], md
