"""The decode-graph plumbing (static buffers, padding rows, partial logits rows) on CPU:
`capture_one` is replaced by an eager re-run over the same static buffers, so everything
but the CUDA capture itself is exercised and must give the eager engine's tokens."""

from __future__ import annotations

import pytest
from engine_models import build_model_dir

from runtime.engine import LLM, SamplingParams
from runtime.engine.cuda_graphs import DecodeGraphs, graph_batch_sizes


class EagerGraphs(DecodeGraphs):
    """Replays by running the model again on the static buffers, as a graph would."""

    replays = 0

    def capture_one(self, args, pool):
        model = self.runner.model
        hidden = model(*args)

        def replay():
            EagerGraphs.replays += 1
            hidden.copy_(model(*args))

        return replay, hidden, pool


def test_graph_batch_sizes() -> None:
    assert graph_batch_sizes(3) == [1, 2, 3]
    assert graph_batch_sizes(256)[:5] == [1, 2, 4, 8, 16] and graph_batch_sizes(256)[-1] == 256
    assert graph_batch_sizes(10_000)[-1] == 512


@pytest.mark.parametrize("budget", [2, 64])
def test_decode_graph_plumbing_gives_eager_tokens(tmp_path, budget: int) -> None:
    model_dir, _ = build_model_dir("llama", tmp_path)
    prompts = [[5, 6, 7, 8, 9], [10, 11, 12], list(range(20, 45))]
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (12, 5, 9)]
    eager = LLM(model_dir, block_size=4, kv_cache_memory_bytes=1 << 20)
    expected = [o.token_ids for o in eager.generate(prompts, params, use_tqdm=False)]

    llm = LLM(model_dir, block_size=4, kv_cache_memory_bytes=1 << 20, max_num_seqs=5,
              max_num_batched_tokens=budget)  # fmt: skip
    runner = llm.executor.worker.runner
    graphs = EagerGraphs(runner, max_num_seqs=5, max_model_len=llm.max_model_len)
    graphs.capture_all(llm.max_model_len, agree=lambda ok: ok)
    assert sorted(graphs.graphs) == [1, 2, 4, 5]
    runner.graphs = graphs
    # Dirty the static buffers: stale rows must not leak into later replays.
    graphs.block_tables.fill_(7)
    graphs.positions.fill_(3)
    EagerGraphs.replays = 0
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert [o.token_ids for o in outs] == expected
    assert EagerGraphs.replays > 5  # decodes (and 1-token chunks) went through the graphs
    assert llm.block_manager.num_free_blocks == llm.block_manager.num_blocks
    llm.close()  # the graphs go first (under TP they pin the NCCL communicator)
    assert runner.graphs is None and graphs.graphs == {}


class FlakyGraphs(EagerGraphs):
    """Captures fail from the `fail_at`-th size on (this rank's own failure)."""

    fail_at: int | None = None
    captured = 0

    def capture_one(self, args, pool):
        FlakyGraphs.captured += 1
        if self.fail_at is not None and FlakyGraphs.captured >= self.fail_at:
            raise RuntimeError("capture failed")
        return super().capture_one(args, pool)


@pytest.mark.parametrize(
    ("fail_at", "peer_ok", "expect_graphs", "captures"),
    [
        (None, True, True, 4),  # every rank captured every size
        (2, True, False, 2),  # this rank fails at the second size: stop, tell the peers
        (None, False, False, 1),  # a peer failed at the first size: this rank stops too
    ],
)
def test_capture_agreement_keeps_ranks_in_step(
    tmp_path, fail_at, peer_ok, expect_graphs, captures
) -> None:
    """Under TP every rank keeps graphs or none does, and none goes on capturing (each
    capture runs all-reduces) once one rank has failed."""
    model_dir, _ = build_model_dir("llama", tmp_path)
    llm = LLM(model_dir, block_size=4, kv_cache_memory_bytes=1 << 20, max_num_seqs=5)
    votes: list[bool] = []

    def agree(ok: bool) -> bool:  # the MIN over this rank and a peer
        votes.append(ok)
        return ok and peer_ok

    FlakyGraphs.fail_at, FlakyGraphs.captured = fail_at, 0
    graphs = FlakyGraphs.capture(llm.executor.worker.runner, 5, llm.max_model_len, agree)
    assert (graphs is not None) == expect_graphs
    assert FlakyGraphs.captured == captures == len(votes)
    assert votes[-1] == (fail_at is None)
