"""LLM request handling: validation before scheduling, stop strings / stop tokens /
max_tokens, seeds, logprobs, streaming, abort."""

from __future__ import annotations

import json

import pytest
from engine_models import build_model_dir

from runtime.engine import LLM, SamplingParams

PROMPT = "hello world"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_model_dir("llama", tmp_path_factory.mktemp("requests"))[0]


# Every request feature under both engine loops: synchronous, and asynchronous scheduling
# (the GPU default: each step launched before the host has the last one's tokens).
@pytest.fixture(scope="module", params=[False, True], ids=["sync", "async"])
def llm(model_dir, request):
    engine = LLM(model_dir, block_size=4, kv_cache_memory_bytes=1 << 20,
                 async_scheduling=request.param)  # fmt: skip
    yield engine
    engine.close()


@pytest.fixture(autouse=True)
def no_leak(request):
    yield
    if "llm" in request.fixturenames:
        engine = request.getfixturevalue("llm")
        assert not engine.has_unfinished_requests()
        assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def greedy(**kw) -> SamplingParams:
    return SamplingParams(temperature=0, **{"max_tokens": 24, "ignore_eos": True, **kw})


@pytest.mark.parametrize(
    "kwargs",
    [dict(max_tokens=0), dict(max_tokens=-3), dict(temperature=-0.1), dict(top_p=0.0),
     dict(top_p=1.5), dict(top_k=0), dict(min_p=2.0), dict(repetition_penalty=0.0),
     dict(stop=[""]), dict(stop_token_ids=[-1])],
)  # fmt: skip
def test_invalid_sampling_params(kwargs) -> None:
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)


@pytest.mark.parametrize(
    "prompt, params, match",
    [
        ([], None, "empty prompt"),
        ("", None, "empty prompt"),
        ([1] * 128, None, "leaves no room"),
        ([1, 2, 999], None, "outside the vocabulary"),
        ([1, 2], SamplingParams(stop_token_ids=[128]), "stop_token_ids"),
    ],
)
def test_bad_requests_raise_before_scheduling(llm, prompt, params, match) -> None:
    with pytest.raises(ValueError, match=match):
        llm.add_request(prompt, params)
    # A batch with one bad request queues none of them.
    with pytest.raises(ValueError, match=match):
        llm.generate([[1, 2, 3], prompt], params, use_tqdm=False)
    assert not llm.has_unfinished_requests()


def test_bad_engine_arguments(tmp_path, llm) -> None:
    model_dir = llm.config.model
    with pytest.raises(ValueError, match="does not divide the model's 4 attention heads"):
        LLM(model_dir, tensor_parallel_size=3)
    with pytest.raises(ValueError, match="no such model directory"):
        LLM(tmp_path / "missing")
    with pytest.raises(ValueError, match="cannot read the model config"):
        LLM(tmp_path)
    (tmp_path / "config.json").write_text(
        json.dumps({"model_type": "llama", "architectures": ["NopeForCausalLM"]})
    )
    with pytest.raises(ValueError, match="hf2paged convert llama"):
        LLM(tmp_path)


def test_max_tokens_and_length_finish(llm) -> None:
    out = llm.generate(PROMPT, greedy(max_tokens=5), use_tqdm=False)[0]
    assert len(out.token_ids) == 5 and out.finish_reason == "length"
    assert out.text == llm.tokenizer.decode(out.token_ids, skip_special_tokens=True)
    # The context length caps generation too (128 tokens for this model).
    out = llm.generate([[5] * 120], greedy(max_tokens=50), use_tqdm=False)[0]
    assert len(out.token_ids) == 8 and out.finish_reason == "length"


def test_stop_token_ids_and_eos(llm) -> None:
    base = llm.generate(PROMPT, greedy(), use_tqdm=False)[0].token_ids
    stop_id = base[4]
    first = base.index(stop_id)
    out = llm.generate(PROMPT, greedy(stop_token_ids=[stop_id]), use_tqdm=False)[0]
    assert out.token_ids == base[: first + 1] and out.finish_reason == "stop"
    # EOS is a stop token unless ignore_eos: make the engine treat stop_id as EOS.
    saved = llm.eos_token_ids
    llm.eos_token_ids = [stop_id]
    try:
        out = llm.generate(PROMPT, greedy(ignore_eos=False), use_tqdm=False)[0]
        assert out.token_ids == base[: first + 1] and out.finish_reason == "stop"
        out = llm.generate(PROMPT, greedy(ignore_eos=True), use_tqdm=False)[0]
        assert out.token_ids == base
    finally:
        llm.eos_token_ids = saved


def test_stop_strings_cut_the_text(llm) -> None:
    base = llm.generate(PROMPT, greedy(), use_tqdm=False)[0]
    text = base.text
    assert len(text) >= 10
    stop = text[6:9]
    cut = text.find(stop)
    out = llm.generate(PROMPT, greedy(stop=[stop, "\x00never"]), use_tqdm=False)[0]
    assert out.text == text[:cut] and out.finish_reason == "stop"
    assert out.token_ids == base.token_ids[: len(out.token_ids)]
    # Streaming holds back a possible stop-string start and never shows the stop string.
    chunks = list(llm.stream(PROMPT, greedy(stop=[stop])))
    assert "".join(chunks) == text[:cut]


def test_stream_deltas_concatenate_to_the_text(llm) -> None:
    expected = llm.generate(PROMPT, greedy(max_tokens=12), use_tqdm=False)[0].text
    chunks = list(llm.stream(PROMPT, greedy(max_tokens=12)))
    assert len(chunks) > 1 and "".join(chunks) == expected


def test_stream_closed_early_aborts(llm) -> None:
    it = llm.stream(PROMPT, greedy(max_tokens=20))
    next(it)
    it.close()  # the no_leak fixture checks the blocks came back


def test_seeds_reproduce_and_do_not_depend_on_the_batch(llm) -> None:
    seeded = SamplingParams(temperature=1.0, seed=7, max_tokens=16, ignore_eos=True)
    a = llm.generate(PROMPT, seeded, use_tqdm=False)[0].token_ids
    others = SamplingParams(temperature=1.0, max_tokens=16, ignore_eos=True)
    outs = llm.generate(["abc", PROMPT, "xyz"], [others, seeded, others], use_tqdm=False)
    assert outs[1].token_ids == a
    b = llm.generate(
        PROMPT,
        SamplingParams(temperature=1.0, seed=8, max_tokens=16, ignore_eos=True),
        use_tqdm=False,
    )
    assert b[0].token_ids != a


def test_logprobs(llm) -> None:
    out = llm.generate(PROMPT, greedy(max_tokens=4, logprobs=2), use_tqdm=False)[0]
    assert len(out.logprobs) == 4
    for token, (lp, top) in zip(out.token_ids, out.logprobs):
        assert len(top) == 2 and lp <= 0
        assert max(top, key=top.get) == token  # greedy: the sampled token is the most likely
    assert llm.generate(PROMPT, greedy(max_tokens=2), use_tqdm=False)[0].logprobs is None


def test_abort_frees_blocks_at_once(llm) -> None:
    bm = llm.block_manager
    rid = llm.add_request([4] * 30, greedy(max_tokens=50))
    keep = llm.add_request([9] * 10, greedy(max_tokens=8))
    for _ in range(3):
        llm.step()
    used = bm.num_blocks - bm.num_free_blocks
    mine = len(llm._requests[rid].block_table)
    assert mine >= 8
    llm.abort_request(rid)
    assert bm.num_blocks - bm.num_free_blocks == used - mine
    finished = []
    while llm.has_unfinished_requests():
        finished += [o for o in llm.step() if o.finished]
    assert [o.request_id for o in finished] == [keep]
    llm.abort_request("no-such-request")  # ignored


def test_text_prompt_chat_template_missing(llm) -> None:
    with pytest.raises(ValueError, match="no chat template"):
        llm.apply_chat_template([{"role": "user", "content": "hi"}])


def test_every_sampling_option_runs_through_the_engine(llm) -> None:
    params = SamplingParams(temperature=0.8, top_k=20, top_p=0.9, min_p=0.05,
                            repetition_penalty=1.3, seed=3, max_tokens=8, ignore_eos=True)  # fmt: skip
    a = llm.generate([PROMPT, "abc"], params, use_tqdm=False)
    b = llm.generate([PROMPT], params, use_tqdm=False)
    assert a[0].token_ids == b[0].token_ids and len(a[1].token_ids) == 8
    assert all(0 <= t < llm.vocab_size for o in a for t in o.token_ids)
