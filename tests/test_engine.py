"""LLM end to end on tiny random checkpoints of every generated architecture: greedy
parity with transformers' generate, batching/preemption/chunking/prefix caching do not
change tokens, and no KV block leaks."""

from __future__ import annotations

import pytest
from engine_models import build_model_dir, hf_greedy
from parity.configs import ARCHS

from runtime.engine import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=10)
PROMPTS = [[5, 6, 7, 8, 9], [10, 11, 12], list(range(20, 45)), [3] * 17, [60, 61]]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine")
    built = {}

    def get(arch: str):
        if arch not in built:
            built[arch] = build_model_dir(arch, root)
        return built[arch]

    return get


def assert_no_leak(llm: LLM) -> None:
    assert not llm.has_unfinished_requests()
    assert llm.block_manager.num_free_blocks == llm.block_manager.num_blocks
    assert all(b.ref_count == 0 for b in llm.block_manager.blocks)


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_matches_transformers_generate(models, arch: str) -> None:
    model_dir, hf = models(arch)
    # A small token budget: prompts are prefilled in chunks mixed with decodes.
    llm = LLM(model_dir, max_num_batched_tokens=8, kv_cache_memory_bytes=1 << 20)
    prompts = PROMPTS[:3]  # 3, 5 and 25 tokens: the long one is prefilled in chunks
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        expected = hf_greedy(hf, prompt, GREEDY.max_tokens)
        assert out.token_ids == expected, f"{arch} prompt {prompt[:4]}..."
        assert out.finish_reason == ("stop" if len(expected) < 10 else "length")
    assert_no_leak(llm)


def run_alone(model_dir, prompts, params) -> list[list[int]]:
    llm = LLM(model_dir, kv_cache_memory_bytes=1 << 20)
    return [llm.generate([p], params, use_tqdm=False)[0].token_ids for p in prompts]


def test_mixed_batch_with_preemption_equals_each_request_alone(models) -> None:
    model_dir, _ = models("llama")
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    alone = run_alone(model_dir, PROMPTS, params)
    # 14 blocks of 4 slots hold the longest request (41 tokens) alone; all five need 36.
    block_bytes = 2 * 2 * 4 * 2 * 16 * 4  # layers * (k, v) * block * kv heads * dim * fp32
    llm = LLM(
        model_dir, block_size=4, kv_cache_memory_bytes=14 * block_bytes, max_num_batched_tokens=16
    )
    assert llm.block_manager.num_blocks == 14
    outs = llm.generate(PROMPTS, params, use_tqdm=False)
    assert [o.token_ids for o in outs] == alone
    assert llm.scheduler.num_preemptions > 0
    assert_no_leak(llm)


def test_prefix_caching_gives_identical_tokens_and_hits(models) -> None:
    model_dir, _ = models("qwen2")  # sliding window on one layer: cached blocks still serve
    shared = list(range(30, 58))
    prompts = [shared + [i, i + 1] for i in (3, 9, 70)] + [shared]
    alone = run_alone(model_dir, prompts, GREEDY)
    llm = LLM(model_dir, block_size=4, enable_prefix_caching=True, kv_cache_memory_bytes=1 << 20)
    first = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert [o.token_ids for o in first] == alone
    seqs_before = llm.block_manager.hash_to_block_id.copy()
    assert seqs_before, "full blocks were published"
    # Second round: every prompt finds its prefix cached.
    ids = [llm.add_request(p, GREEDY) for p in prompts]
    seqs = [llm._requests[i] for i in ids]
    outs = {}
    while llm.has_unfinished_requests():
        for o in llm.step():
            outs[o.request_id] = o.token_ids
    assert [outs[i] for i in ids] == alone
    assert all(s.num_cached_tokens >= 24 for s in seqs)
    assert_no_leak(llm)


def test_max_num_seqs_and_many_requests(models) -> None:
    model_dir, _ = models("llama")
    prompts = [[7 + i, 8, 9 + i] for i in range(12)]
    alone = run_alone(model_dir, prompts[:3], GREEDY)
    llm = LLM(model_dir, max_num_seqs=3, kv_cache_memory_bytes=1 << 20)
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert [o.token_ids for o in outs[:3]] == alone
    assert all(o.finished for o in outs)
    assert_no_leak(llm)


@pytest.mark.parametrize("budget", [1, 3])
def test_tiny_token_budgets_give_the_same_tokens(models, budget: int) -> None:
    """Budget 1: every prompt goes one token per step, batched with decodes (steps whose
    every query has length 1 but not every row samples)."""
    model_dir, hf = models("llama")
    prompts = PROMPTS[:2]
    llm = LLM(model_dir, max_num_batched_tokens=budget, kv_cache_memory_bytes=1 << 20)
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert [o.token_ids for o in outs] == [hf_greedy(hf, p, GREEDY.max_tokens) for p in prompts]
    assert_no_leak(llm)


def test_a_failed_step_leaves_the_engine_consistent(models) -> None:
    """An exception inside a step (model, sampler, Ctrl-C) recomputes that step's
    sequences later; nothing leaks and the tokens do not change."""
    model_dir, _ = models("llama")
    shared = list(range(30, 50))
    prompts = [shared + [1], shared + [2], [7, 8, 9]]
    expected = run_alone(model_dir, prompts, GREEDY)
    llm = LLM(model_dir, block_size=4, enable_prefix_caching=True, kv_cache_memory_bytes=1 << 20)
    runner = llm.executor.worker.runner
    real, calls = runner.execute, {"n": 0}

    def flaky(inputs):
        calls["n"] += 1
        if calls["n"] in (1, 4):
            raise RuntimeError("device fault")
        return real(inputs)

    runner.execute = flaky
    ids = [llm.add_request(p, GREEDY) for p in prompts]
    done: dict[str, list[int]] = {}
    failures = 0
    while llm.has_unfinished_requests():
        try:
            outs = llm.step()
        except RuntimeError:
            failures += 1
            continue
        done.update({o.request_id: o.token_ids for o in outs if o.finished})
    assert failures == 2
    assert [done[i] for i in ids] == expected
    assert_no_leak(llm)


@pytest.mark.parametrize("arch", ["qwen2", "minicpm3"])  # minicpm3: the [1, .., D + Dv] cache
def test_triton_backend_through_the_engine(models, monkeypatch, arch) -> None:
    """The GPU default backend (Triton, interpreted on CPU) on the engine's own metadata:
    chunked prefills mixed with decodes, 1-token chunks, prefix-cache hits."""
    monkeypatch.setenv("HF2PAGED_ATTENTION_BACKEND", "triton")
    model_dir, hf = models(arch)
    shared = list(range(30, 46))
    prompts = [[5, 6, 7, 8, 9], shared + [1, 2], shared + [3], [10, 11, 12]]
    llm = LLM(model_dir, block_size=4, max_num_batched_tokens=9, enable_prefix_caching=True,
              kv_cache_memory_bytes=1 << 20)  # fmt: skip
    params = SamplingParams(temperature=0, max_tokens=6)
    ids = [llm.add_request(p, params) for p in prompts]
    seqs = [llm._requests[i] for i in ids]
    done = {}
    while llm.has_unfinished_requests():
        done.update({o.request_id: o.token_ids for o in llm.step() if o.finished})
    assert [done[i] for i in ids] == [hf_greedy(hf, p, 6) for p in prompts]
    assert seqs[2].num_cached_tokens > 0
    assert_no_leak(llm)


def test_interrupted_generate_leaves_nothing_behind(models) -> None:
    """Ctrl-C inside generate: the exception propagates, its requests are aborted and
    every block is free; the engine keeps working."""
    model_dir, _ = models("llama")
    llm = LLM(model_dir, kv_cache_memory_bytes=1 << 20)
    runner = llm.executor.worker.runner
    real, calls = runner.execute, {"n": 0}

    def interrupted(inputs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(inputs)

    runner.execute = interrupted
    with pytest.raises(KeyboardInterrupt):
        llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert_no_leak(llm)
    runner.execute = real
    assert llm.generate(PROMPTS[:1], GREEDY, use_tqdm=False)[0].finished
    assert_no_leak(llm)


def test_token_budget_defaults_offline_serving_and_cpu(models) -> None:
    from runtime.engine.config import default_token_budget

    assert default_token_budget("cuda") == 16384
    assert default_token_budget("cuda", serving=True) == 8192
    assert default_token_budget("cpu") == default_token_budget("cpu", serving=True) == 2048
    llm = LLM(models(ARCHS[0])[0], kv_cache_memory_bytes=1 << 20)
    try:
        assert llm.config.max_num_batched_tokens == 2048  # this machine's CPU default
    finally:
        llm.close()
