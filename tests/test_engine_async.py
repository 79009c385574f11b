"""Asynchronous scheduling (the GPU default) gives the synchronous engine's tokens, token
for token: under chunked prefill, preemption, prefix caching, stop tokens, max_tokens,
aborts, failed steps, seeds, penalties and logprobs; and it really runs a step ahead.

On the CPU the "device" is the host, so nothing overlaps here, but every step still goes
through the asynchronous path: scheduled while the previous one's results are not taken,
pending input ids read from that step's sampled ids."""

from __future__ import annotations

import hypothesis.strategies as st
import pytest
from engine_models import build_model_dir
from hypothesis import HealthCheck, given, settings

from runtime.engine import LLM, SamplingParams

PROMPTS = [[5, 6, 7, 8, 9], [10, 11, 12], list(range(20, 45)), [3] * 17, [60, 61], [70]]
# layers * (k, v) * kv heads * head dim * fp32 of the tiny llama: bytes per cached token
TOKEN_BYTES = 2 * 2 * 2 * 16 * 4

# name -> engine settings: roomy; chunked prefill with preemption (14 blocks of 4 hold
# the longest request alone, not all of them); tiny budget with prefix caching
CONFIGS = {
    "roomy": dict(kv_cache_memory_bytes=1 << 20),
    "preempting": dict(
        block_size=4, kv_cache_memory_bytes=14 * 4 * TOKEN_BYTES, max_num_batched_tokens=16
    ),
    "budget3-prefix": dict(
        block_size=4,
        enable_prefix_caching=True,
        max_num_batched_tokens=3,
        kv_cache_memory_bytes=1 << 20,
    ),  # fmt: skip
}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_model_dir("llama", tmp_path_factory.mktemp("engine-async"))[0]


@pytest.fixture(scope="module")
def engines(model_dir):
    """(sync, async) engine pairs per config, built once."""
    built = {}

    def get(name: str) -> tuple[LLM, LLM]:
        if name not in built:
            built[name] = tuple(
                LLM(model_dir, async_scheduling=mode, **CONFIGS[name]) for mode in (False, True)
            )
        return built[name]

    yield get
    for pair in built.values():
        for llm in pair:
            llm.close()


def assert_idle(llm: LLM) -> None:
    assert not llm.has_unfinished_requests()
    assert llm.block_manager.num_free_blocks == llm.block_manager.num_blocks
    assert all(b.ref_count == 0 for b in llm.block_manager.blocks)
    assert not llm._requests
    assert llm._launched is None, "a finished run leaves no step in flight"


def outputs(llm: LLM, prompts, params) -> list[tuple[list[int], str | None, object]]:
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert_idle(llm)
    return [(o.token_ids, o.finish_reason, o.logprobs) for o in outs]


def count_overlaps(llm: LLM, monkeypatch) -> dict[str, int]:
    """Counts launches made while an earlier step was still in flight."""
    counts = {"launches": 0, "ahead": 0}
    real = llm._launch

    def launch(out, before):
        counts["launches"] += 1
        counts["ahead"] += before is not None
        return real(out, before)

    monkeypatch.setattr(llm, "_launch", launch)
    return counts


@pytest.mark.parametrize("config", list(CONFIGS))
def test_async_gives_the_sync_tokens(engines, config, monkeypatch) -> None:
    sync, asynchronous = engines(config)
    # Stop tokens taken from what the requests generate, so some of them do stop early.
    plain = [SamplingParams(temperature=0, max_tokens=12) for _ in PROMPTS]
    free = outputs(sync, PROMPTS, plain)
    params = [
        SamplingParams(temperature=0, max_tokens=3 + 2 * i, stop_token_ids=tokens[2:3] * (i % 2))
        for i, (tokens, _, _) in enumerate(free)
    ]
    expected = outputs(sync, PROMPTS, params)
    assert any(reason == "stop" for _, reason, _ in expected)
    assert any(reason == "length" for _, reason, _ in expected)
    counts = count_overlaps(asynchronous, monkeypatch)
    preemptions = asynchronous.scheduler.num_preemptions
    assert outputs(asynchronous, PROMPTS, params) == expected
    assert counts["ahead"] >= counts["launches"] // 2, "steps were launched one ahead"
    if config == "preempting":
        assert asynchronous.scheduler.num_preemptions > preemptions


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    config=st.sampled_from(list(CONFIGS)),
    requests=st.lists(
        st.tuples(
            st.lists(st.integers(3, 127), min_size=1, max_size=30),  # prompt
            st.integers(1, 12),  # max_tokens
            st.lists(st.integers(0, 127), max_size=3),  # stop tokens
            st.booleans(),  # ignore_eos
        ),
        min_size=1,
        max_size=7,
    ),
)
def test_random_workloads_give_the_sync_tokens(engines, config, requests) -> None:
    sync, asynchronous = engines(config)
    prompts = [r[0] for r in requests]
    params = [
        SamplingParams(temperature=0, max_tokens=m, stop_token_ids=stop, ignore_eos=ignore)
        for _, m, stop, ignore in requests
    ]
    assert outputs(asynchronous, prompts, params) == outputs(sync, prompts, params)


def test_seeds_penalties_and_logprobs_give_the_sync_results(engines) -> None:
    """Seeded sampling draws the same noise per token; penalties (which read every token
    so far) make their steps synchronous; logprobs come back a step later, unchanged."""
    sync, asynchronous = engines("preempting")
    params = [
        SamplingParams(temperature=0.9, top_k=20, seed=1, max_tokens=9, logprobs=2),
        SamplingParams(temperature=0, repetition_penalty=1.5, max_tokens=10),
        SamplingParams(
            temperature=0.7,
            seed=5,
            presence_penalty=0.8,
            frequency_penalty=0.5,
            max_tokens=8,
            ignore_eos=True,
        ),  # fmt: skip
        SamplingParams(temperature=0, max_tokens=11, logprobs=0, ignore_eos=True),
        SamplingParams(temperature=1.0, top_p=0.8, min_p=0.05, seed=7, max_tokens=12),
        SamplingParams(temperature=0, max_tokens=5),
    ]
    expected = outputs(sync, PROMPTS, params)
    assert outputs(asynchronous, PROMPTS, params) == expected
    assert expected[0][2] is not None and len(expected[0][2]) == len(expected[0][0])


def test_penalties_wait_for_the_tokens_they_read(engines, monkeypatch) -> None:
    """A step that sampled a penalised request is taken before the next is launched."""
    _, asynchronous = engines("roomy")
    counts = count_overlaps(asynchronous, monkeypatch)
    params = SamplingParams(temperature=0, repetition_penalty=1.3, max_tokens=6, ignore_eos=True)
    outputs(asynchronous, PROMPTS[:2], params)
    assert counts["ahead"] == 0


def test_abort_while_a_step_is_in_flight(engines) -> None:
    """Aborting a request whose token is still on the device frees its blocks at once;
    the others keep the tokens they get alone, the aborted one a prefix of them."""
    sync, asynchronous = engines("roomy")
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    expected = [o[0] for o in outputs(sync, PROMPTS[:3], params)]
    ids = [asynchronous.add_request(p, params) for p in PROMPTS[:3]]
    got = {i: [] for i in ids}
    for _ in range(4):
        for d in asynchronous.step_tokens():
            got[d.request_id].append(d.token_id)
    assert asynchronous._launched is not None  # a step is in flight for the victim too
    used = asynchronous.block_manager.num_free_blocks
    asynchronous.abort_request(ids[1])
    assert asynchronous.block_manager.num_free_blocks > used
    while asynchronous.has_unfinished_requests():
        for d in asynchronous.step_tokens():
            assert d.request_id != ids[1], "no token after the abort"
            got[d.request_id].append(d.token_id)
    assert got[ids[0]] == expected[0] and got[ids[2]] == expected[2]
    assert got[ids[1]] == expected[1][: len(got[ids[1]])]
    assert_idle(asynchronous)


def test_step_tokens_report_each_token_once(engines) -> None:
    """Deltas of the async engine: one per new token, in order, ending with the finish
    reason; concatenated they are the sync output."""
    sync, asynchronous = engines("budget3-prefix")
    params = SamplingParams(temperature=0, max_tokens=7)
    expected = outputs(sync, PROMPTS, params)
    ids = [asynchronous.add_request(p, params) for p in PROMPTS]
    got = {i: [] for i in ids}
    reasons = {}
    while asynchronous.has_unfinished_requests():
        for d in asynchronous.step_tokens():
            assert d.request_id not in reasons, "a delta after the finish"
            got[d.request_id].append(d.token_id)
            assert d.num_output_tokens == len(got[d.request_id])
            if d.finished:
                reasons[d.request_id] = d.finish_reason
    assert [(got[i], reasons[i]) for i in ids] == [(t, r) for t, r, _ in expected]
    assert_idle(asynchronous)


def test_failed_steps_under_async_scheduling(model_dir) -> None:
    """A step that raises (model, Ctrl-C) while another is in flight: the failed one's
    sequences are recomputed, the one in flight still delivers; same tokens, no leak."""
    params = SamplingParams(temperature=0, max_tokens=10)
    prompts = [list(range(30, 50)) + [1], list(range(30, 50)) + [2], [7, 8, 9]]
    settings_ = dict(block_size=4, enable_prefix_caching=True, kv_cache_memory_bytes=1 << 20)
    with LLM(model_dir, **settings_) as sync:
        expected = [o[0] for o in outputs(sync, prompts, params)]
    llm = LLM(model_dir, async_scheduling=True, **settings_)
    runner = llm.executor.worker.runner
    real, calls = runner.execute, {"n": 0}

    def flaky(inputs):
        calls["n"] += 1
        if calls["n"] in (1, 4, 5):
            raise RuntimeError("device fault")
        return real(inputs)

    runner.execute = flaky
    ids = [llm.add_request(p, params) for p in prompts]
    done: dict[str, list[int]] = {}
    failures = 0
    while llm.has_unfinished_requests():
        try:
            outs = llm.step()
        except RuntimeError:
            failures += 1
            continue
        done.update({o.request_id: o.token_ids for o in outs if o.finished})
    assert failures == 3
    assert [done[i] for i in ids] == expected
    assert_idle(llm)
    llm.close()
