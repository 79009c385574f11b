"""torch.compile of generated models' blocks (runtime/engine/compile.py), on CPU.

Traced with the "aot_eager" backend: Dynamo, AOT functionalisation, the opaque attention
operator's fake implementation and its KV-cache mutation all run as they do under
Inductor on a GPU, without paying C++/Triton code generation. Each architecture runs a
step sequence that mixes prompt chunks, decodes and one-token steps; the compiled
runner's logits must equal the eager runner's, with one traced graph per distinct layer
(no graph breaks, no recompilation as the batch changes).
"""

from __future__ import annotations

import logging

import pytest
import torch
from engine_models import build_model_dir
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from moe_cases import HFWeights, Spec, routing
from torch._dynamo.utils import counters

from runtime.attention.forward_context import step_metadata
from runtime.attention.opaque_op import paged_attention_op
from runtime.engine import LLM, SamplingParams
from runtime.engine.build_model import build_model
from runtime.engine.compile import (
    MIN_COMPILED_TOKENS,
    CompiledBlock,
    CompiledModel,
    compile_requested,
    repeated_blocks,
)
from runtime.engine.config import EngineConfig
from runtime.engine.cuda_graphs import DecodeGraphs, graph_batch_sizes
from runtime.engine.model_runner import ModelRunner
from runtime.engine.step_inputs import StepInputs
from runtime.kv_cache import allocate_kv_caches

BLOCK = 4


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def steps() -> list[StepInputs]:
    """Two prompts; their decodes; a decode beside a new prompt; one sequence alone
    (a one-token step: the blocks run eagerly there)."""
    tables = [[0, 1, 2, 7], [3, 4, 8], [5, 6]]
    return [
        StepInputs.build(tables[:2], [0, 0], [9, 6], BLOCK, list(range(3, 18))),
        StepInputs.build(tables[:2], [9, 6], [1, 1], BLOCK, [7, 8]),
        StepInputs.build(tables, [10, 7, 0], [1, 1, 3], BLOCK, [9, 10, 11, 12, 13]),
        StepInputs.build(tables[:1], [11], [1], BLOCK, [9]),
        StepInputs.build(tables, [12, 8, 3], [1, 1, 1], BLOCK, [4, 5, 6]),
    ]


def run_steps(model, compile, sequence: list[StepInputs] | None = None) -> list[torch.Tensor]:
    """Logits of each step of `sequence` (default `steps()`), on 32 fresh KV blocks."""
    caches = allocate_kv_caches(model, 32, BLOCK, torch.float32, torch.device("cpu"))
    runner = ModelRunner(model, caches, torch.device("cpu"), compile=compile)
    with torch.inference_mode():
        out = [runner.execute(step) for step in (steps() if sequence is None else sequence)]
    runner.eager()
    return out


# (architecture, distinct layer graphs): layers of equal constants share one graph;
# gemma2/granite_swa alternate full and sliding layers.
ARCHITECTURES = [
    ("qwen3", 1),  # q/k norms, GQA, tied embeddings
    ("gemma2", 2),  # soft-capping, sliding window, four norms per layer
    ("falcon_alibi", 1),  # ALiBi slopes as an operator input
    ("granite_swa", 2),  # attention sinks, a NoPE layer
    ("minicpm3", 1),  # MLA: value head size differs from the key's
]


@pytest.mark.parametrize(("arch", "graphs"), ARCHITECTURES)
def test_compiled_blocks_match_eager(tmp_path, arch: str, graphs: int) -> None:
    model_dir, _ = build_model_dir(arch, tmp_path, with_tokenizer=False)
    model = build_model(model_dir)
    expected = run_steps(model, compile=False)
    got = run_steps(model, compile="aot_eager")
    for e, g in zip(expected, got, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)
    assert counters["stats"]["unique_graphs"] == graphs
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert not any("forward" in m.__dict__ for m in model.modules())  # eager() restored them


@pytest.fixture(scope="module")
def qwen3_model(tmp_path_factory):
    model_dir, _ = build_model_dir("qwen3", tmp_path_factory.mktemp("qwen3"), with_tokenizer=False)
    return build_model(model_dir)


@st.composite
def step_sequences(draw) -> list[StepInputs]:
    """Up to four sequences over their own blocks; each step picks some of them and gives
    each 1..5 new tokens (a prompt, a chunk after context, or a decode)."""
    tables = [list(range(i * 8, (i + 1) * 8)) for i in range(4)]  # 32 tokens each
    context = [0] * 4
    out = []
    for _ in range(draw(st.integers(1, 4))):
        seqs = sorted(draw(st.sets(st.integers(0, 3), min_size=1)))
        new = [draw(st.integers(1, 5)) for _ in seqs]
        ids = draw(st.lists(st.integers(0, 63), min_size=sum(new), max_size=sum(new)))
        out.append(StepInputs.build(
            [tables[i] for i in seqs], [context[i] for i in seqs], new, BLOCK, ids,
        ))  # fmt: skip
        for i, n in zip(seqs, new):
            context[i] += n
    return out


def assert_compiled_matches_eager_in_one_graph(model, sequence: list[StepInputs]) -> None:
    # Each call starts from a fresh Dynamo cache and counters (Hypothesis runs many
    # examples inside one call of a test; the autouse fixture resets once per test).
    torch._dynamo.reset()
    counters.clear()

    expected = run_steps(model, False, sequence)
    for e, g in zip(expected, run_steps(model, "aot_eager", sequence), strict=True):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)
    assert counters["stats"].get("unique_graphs", 0) <= 1
    assert not counters["graph_break"], dict(counters["graph_break"])


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sequence=step_sequences())
def test_any_batch_matches_eager_with_one_graph(qwen3_model, sequence) -> None:
    """Property: whatever the step's mix of prompts, chunks and decodes and its token
    count, the compiled blocks give the eager logits, from one traced graph (the token
    count is dynamic: no batch size recompiles)."""
    assert_compiled_matches_eager_in_one_graph(qwen3_model, sequence)


def test_token_count_equal_to_a_model_size_traces_once(qwen3_model) -> None:
    """Steps of 9 tokens, then 16 (the tiny qwen3's head size), then 64 (its hidden
    size): only each input's token dimension is marked dynamic, so a count that equals
    another size does not retrace (it did once: 2 graphs, found by the property above)."""
    tables = [list(range(i * 8, (i + 1) * 8)) for i in range(4)]
    sequence = [
        StepInputs.build(tables[:1], [0], [9], BLOCK, list(range(9))),
        StepInputs.build(tables[1:2], [0], [16], BLOCK, list(range(16))),
        StepInputs.build(tables, [9, 16, 0, 0], [7, 16, 16, 25], BLOCK, list(range(64))),
    ]
    assert_compiled_matches_eager_in_one_graph(qwen3_model, sequence)


def test_repeated_blocks_are_the_decoder_layers(tmp_path) -> None:
    model = build_model(build_model_dir("llama", tmp_path, with_tokenizer=False)[0])
    assert repeated_blocks(model) == list(model.model.layers)
    compiled = CompiledModel(model, "aot_eager")
    assert all(isinstance(layer.__dict__["forward"], CompiledBlock) for layer in compiled.blocks)
    compiled.restore()
    assert all("forward" not in layer.__dict__ for layer in model.model.layers)


def test_one_token_steps_and_plain_calls_stay_eager(tmp_path) -> None:
    """A compiled block called outside CompiledModel (no step metadata) or on one token
    runs its eager forward: nothing is traced."""
    model = build_model(build_model_dir("llama", tmp_path, with_tokenizer=False)[0])
    caches = allocate_kv_caches(model, 8, BLOCK, torch.float32, torch.device("cpu"))
    compiled = CompiledModel(model, "aot_eager")
    one = StepInputs.build([[0]], [0], [1], BLOCK, [5]).to_device("cpu")
    two = StepInputs.build([[1]], [0], [2], BLOCK, [5, 6]).to_device("cpu")
    with torch.inference_mode():
        compiled(one.input_ids, one.positions, caches, one.metadata)
        model(two.input_ids, two.positions, caches, two.metadata)
        assert counters["stats"]["unique_graphs"] == 0
        compiled(two.input_ids, two.positions, caches, two.metadata)
    assert counters["stats"]["unique_graphs"] == 1 and MIN_COMPILED_TOKENS == 2


def test_opaque_operator_needs_the_step_metadata() -> None:
    q = torch.randn(2, 2, 8)
    cache = torch.zeros(2, 4, BLOCK, 2, 8)
    args = (q, q, q, cache, None, None, 1.0, None, None, 1.0, False)
    with pytest.raises(RuntimeError, match="without the step's metadata"):
        paged_attention_op(*args)
    md = StepInputs.build([[0]], [0], [2], BLOCK).to_device("cpu").metadata
    with step_metadata(md):
        out = paged_attention_op(*args)
    assert out.shape == (2, 2, 8) and cache[0, 0, :2].eq(q).all()  # stored, then attended


def test_fused_moe_is_a_graph_break() -> None:
    """FusedMoE runs eagerly inside a compiled region (its kernels pick experts on the
    host); what surrounds it is compiled, and the result is the eager one."""
    spec = Spec(8, 16, 8)
    layer = spec.layer(torch.float32)
    HFWeights.random(spec, torch.float32).load_into(layer)
    index, weights = routing(12, 8, 2, seed=0)

    def block(x):
        return layer(torch.nn.functional.silu(x) * 2, index, weights) + x

    x = torch.randn(12, 16)
    expected = block(x)
    got = torch.compile(block, backend="aot_eager")(x)
    torch.testing.assert_close(got, expected)
    assert sum(counters["graph_break"].values()) >= 1


def test_a_failing_compile_falls_back_to_eager(tmp_path, caplog) -> None:
    model = build_model(build_model_dir("llama", tmp_path, with_tokenizer=False)[0])
    caches = allocate_kv_caches(model, 16, BLOCK, torch.float32, torch.device("cpu"))

    def broken(gm, example_inputs):
        raise RuntimeError("no compiler here")

    with caplog.at_level(logging.WARNING, logger="runtime.engine.model_runner"):
        runner = ModelRunner(model, caches, torch.device("cpu"), max_num_seqs=4,
                             warm_up=True, compile=broken)  # fmt: skip
    assert runner.compiled is None and runner.forward is model
    assert "torch.compile of the model failed" in caplog.text
    assert "warm_up" in runner.startup_seconds
    assert all("forward" not in layer.__dict__ for layer in model.model.layers)


def test_compiled_warm_up_traces_on_a_full_decode_batch(tmp_path, monkeypatch) -> None:
    """The warm-up's first step through a compiled model is a batch of max_num_seqs
    decodes: the blocks are traced there, once, general in the token count."""
    model = build_model(build_model_dir("llama", tmp_path, with_tokenizer=False)[0])
    caches = allocate_kv_caches(model, 16, BLOCK, torch.float32, torch.device("cpu"))
    first: list[int] = []
    original = CompiledModel.__call__

    def spy(self, ids, pos, kv, md):
        first.append(md.num_tokens)
        return original(self, ids, pos, kv, md)

    monkeypatch.setattr(CompiledModel, "__call__", spy)
    ModelRunner(model, caches, torch.device("cpu"), max_num_seqs=6, warm_up=True,
                compile="aot_eager")  # fmt: skip
    assert first[0] == 6
    assert counters["stats"]["unique_graphs"] == 1


class EagerGraphs(DecodeGraphs):
    """Replays by running the runner's forward again on the static buffers."""

    def capture_one(self, args, pool):
        hidden = self.runner.forward(*args)

        def replay():
            hidden.copy_(self.runner.forward(*args))

        return replay, hidden, pool


def test_decode_graphs_of_a_compiled_model_start_at_two_rows(tmp_path) -> None:
    model_dir, _ = build_model_dir("qwen3", tmp_path)
    prompts = [[5, 6, 7, 8, 9], [10, 11, 12], list(range(20, 45))]
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (12, 5, 9)]
    eager = LLM(model_dir, block_size=BLOCK, kv_cache_memory_bytes=1 << 20)
    expected = [o.token_ids for o in eager.generate(prompts, params, use_tqdm=False)]

    llm = LLM(model_dir, block_size=BLOCK, kv_cache_memory_bytes=1 << 20, max_num_seqs=5)
    runner = llm.executor.worker.runner
    runner.compiled = CompiledModel(runner.model, "aot_eager")
    runner.forward = runner.compiled
    graphs = EagerGraphs(runner, max_num_seqs=5, max_model_len=llm.max_model_len)
    graphs.capture_all(llm.max_model_len, agree=lambda ok: ok)
    assert sorted(graphs.graphs) == [2, 4, 5]  # one sequence replays the two-row graph
    runner.graphs = graphs
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert [o.token_ids for o in outs] == expected
    assert counters["stats"]["unique_graphs"] == 1
    llm.close()


def test_graph_batch_sizes_from_two() -> None:
    assert graph_batch_sizes(3, smallest=2) == [2, 3]
    assert graph_batch_sizes(1, smallest=2) == [2]
    assert graph_batch_sizes(64, smallest=2)[:3] == [2, 4, 8]


def engine_config(device: str, tp: int = 1, enforce_eager: bool = False) -> EngineConfig:
    return EngineConfig(
        model=None, tensor_parallel_size=tp, dtype=torch.bfloat16, device_type=device,
        block_size=16, gpu_memory_utilization=0.9, max_num_seqs=8, max_num_batched_tokens=64,
        max_model_len=64, enable_prefix_caching=False, enforce_eager=enforce_eager,
        kv_cache_memory_bytes=None,
    )  # fmt: skip


def test_when_the_engine_compiles(monkeypatch) -> None:
    monkeypatch.delenv("HF2PAGED_COMPILE", raising=False)
    assert engine_config("cuda").use_compile
    assert not engine_config("cpu").use_compile  # CI never pays a compile
    assert not engine_config("cuda", enforce_eager=True).use_compile
    assert not engine_config("cuda", tp=2).use_compile  # not measured under TP yet
    monkeypatch.setenv("HF2PAGED_COMPILE", "1")
    assert engine_config("cuda", tp=2).use_compile and not engine_config("cpu").use_compile
    monkeypatch.setenv("HF2PAGED_COMPILE", "0")
    assert not engine_config("cuda").use_compile
    monkeypatch.setenv("HF2PAGED_COMPILE", "yes")
    with pytest.raises(ValueError, match="HF2PAGED_COMPILE='yes'"):
        compile_requested(True)
