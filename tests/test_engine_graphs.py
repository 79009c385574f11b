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
    graphs.capture_all(llm.max_model_len)
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
