"""`hf2paged serve` over HTTP with the official openai client and httpx: completions and
chat completions equal `LLM.generate` token for token, streamed and not; sampling
parameters, logprobs, n, echo, batches of prompts; OpenAI's errors."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from serve_process import delta

from runtime.engine import SamplingParams

PROMPTS = ["hello world", "abc", "the quick brown fox", "zz"]
MODEL = "llama"  # the model directory's name


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url, api_key="none", max_retries=0, timeout=120)


@pytest.fixture(autouse=True)
def no_leak(server):
    yield
    server.wait_idle()


def greedy(**kw) -> SamplingParams:
    return SamplingParams(**{"temperature": 0, "max_tokens": 12, "ignore_eos": True, **kw})


EXTRA = {"ignore_eos": True, "return_token_ids": True}


def read_completion_stream(stream) -> dict[int, dict]:
    """Per choice index: text, token ids, finish reason; plus the usage under -1."""
    choices: dict[int, dict] = {}
    for chunk in stream:
        if chunk.usage is not None:
            choices[-1] = chunk.usage.model_dump()
        for c in chunk.choices:
            got = choices.setdefault(c.index, {"text": "", "token_ids": [], "finish": None})
            got["text"] += c.text
            got["token_ids"] += c.model_extra.get("token_ids") or []
            got["finish"] = c.finish_reason or got["finish"]
    return choices


def test_models_and_health(server, client) -> None:
    assert [m.id for m in client.models.list()] == [MODEL]
    assert httpx.get(f"{server.url}/health").status_code == 200


@pytest.mark.parametrize("stream", [False, True])
def test_greedy_completions_equal_generate(server, client, offline, stream) -> None:
    expected = offline.generate(PROMPTS, greedy(), use_tqdm=False)
    for prompt, out in zip(PROMPTS, expected):
        kwargs = dict(model=MODEL, prompt=prompt, max_tokens=12, temperature=0, extra_body=EXTRA)
        if stream:
            got = read_completion_stream(
                client.completions.create(
                    **kwargs, stream=True, stream_options={"include_usage": True}
                )
            )
            text, ids, finish, use = got[0]["text"], got[0]["token_ids"], got[0]["finish"], got[-1]
        else:
            r = client.completions.create(**kwargs)
            c = r.choices[0]
            text, ids, finish, use = c.text, c.model_extra["token_ids"], c.finish_reason, r.usage
            use = use.model_dump()
            assert c.model_extra["prompt_token_ids"] == out.prompt_token_ids
        assert (text, ids, finish) == (out.text, out.token_ids, out.finish_reason)
        assert use["prompt_tokens"] == len(out.prompt_token_ids)
        assert use["completion_tokens"] == len(out.token_ids) == 12
        assert use["total_tokens"] == use["prompt_tokens"] + 12


def test_token_id_prompts_batches_n_and_echo(client, offline) -> None:
    ids = offline.tokenizer.encode("hello")
    expected = offline.generate([ids], greedy(max_tokens=5), use_tqdm=False)[0]
    r = client.completions.create(
        model=MODEL, prompt=ids, max_tokens=5, temperature=0, echo=True, extra_body=EXTRA
    )
    assert r.choices[0].text == "hello" + expected.text
    assert r.choices[0].model_extra["token_ids"] == expected.token_ids
    # Two prompts, two samples each: choices prompt-major, greedy samples equal.
    r = client.completions.create(
        model=MODEL, prompt=["abc", "zz"], n=2, max_tokens=4, temperature=0, extra_body=EXTRA
    )
    outs = offline.generate(["abc", "zz"], greedy(max_tokens=4), use_tqdm=False)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert [c.text for c in r.choices] == [outs[0].text] * 2 + [outs[1].text] * 2
    assert r.usage.prompt_tokens == sum(len(o.prompt_token_ids) for o in outs)
    assert r.usage.completion_tokens == 16


@pytest.mark.parametrize("stream", [False, True])
def test_chat_completions_equal_generate(client, offline, stream) -> None:
    messages = [
        {"role": "system", "content": "be brief"},
        {
            "role": "user",
            "content": [{"type": "text", "text": "hi "}, {"type": "text", "text": "there"}],
        },
    ]
    plain = [messages[0], {"role": "user", "content": "hi there"}]
    out = offline.generate(
        offline.apply_chat_template(plain), greedy(max_tokens=10), use_tqdm=False
    )[0]
    kwargs = dict(model=MODEL, messages=messages, max_tokens=10, temperature=0, extra_body=EXTRA)
    if not stream:
        r = client.chat.completions.create(**kwargs)
        c = r.choices[0]
        assert (c.message.role, c.message.content, c.finish_reason) == (
            "assistant",
            out.text,
            "length",
        )
        assert c.model_extra["token_ids"] == out.token_ids
        assert r.model_extra["prompt_token_ids"] == out.prompt_token_ids
        assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(out.prompt_token_ids), 10)
        return
    chunks = list(
        client.chat.completions.create(
            **kwargs, stream=True, stream_options={"include_usage": True}
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    ids = [t for c in chunks if c.choices for t in c.choices[0].model_extra.get("token_ids") or []]
    assert (text, ids) == (out.text, out.token_ids)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10


def test_chat_default_max_tokens_fill_the_context(client, offline) -> None:
    messages = [{"role": "user", "content": "go"}]
    r = client.chat.completions.create(
        model=MODEL, messages=messages, temperature=0, extra_body={"ignore_eos": True}
    )
    prompt_len = len(offline.check_request(offline.apply_chat_template(messages)).prompt_token_ids)
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == offline.max_model_len - prompt_len


def test_sampling_parameters_reach_the_engine(client, offline) -> None:
    """Seeded sampling with every filter and penalty equals the offline request with the
    same SamplingParams, and n seeded samples are the offline samples seed + i."""
    params = SamplingParams(
        temperature=0.9, top_p=0.9, top_k=20, min_p=0.05, presence_penalty=0.5,
        frequency_penalty=0.3, repetition_penalty=1.2, seed=1234, max_tokens=10,
        ignore_eos=True,
    )  # fmt: skip
    body = dict(
        model=MODEL, prompt="hello", n=3, max_tokens=10, temperature=0.9, top_p=0.9, seed=1234,
        presence_penalty=0.5, frequency_penalty=0.3,
        extra_body=dict(EXTRA, top_k=20, min_p=0.05, repetition_penalty=1.2),
    )  # fmt: skip
    r = client.completions.create(**body)
    expected = [
        offline.generate("hello", params.for_sample(i), use_tqdm=False)[0] for i in range(3)
    ]
    assert [c.model_extra["token_ids"] for c in r.choices] == [e.token_ids for e in expected]
    assert len({tuple(e.token_ids) for e in expected}) == 3
    # Stop strings: the text ends before the stop string, finish_reason "stop".
    full = offline.generate("hello", greedy(max_tokens=20), use_tqdm=False)[0].text
    stop = full[5:7]
    r = client.completions.create(
        model=MODEL, prompt="hello", max_tokens=20, temperature=0, stop=[stop], extra_body=EXTRA
    )
    assert (r.choices[0].text, r.choices[0].finish_reason) == (full[: full.find(stop)], "stop")


def test_logprobs_match_the_engine(client, offline) -> None:
    out = offline.generate("abc", greedy(max_tokens=4, logprobs=3), use_tqdm=False)[0]
    r = client.completions.create(
        model=MODEL, prompt="abc", max_tokens=4, temperature=0, logprobs=3, extra_body=EXTRA
    )
    lp = r.choices[0].logprobs
    assert lp.tokens == [offline.tokenizer.decode([t]) for t in out.token_ids]
    assert lp.token_logprobs == pytest.approx([c for c, _ in out.logprobs], abs=1e-4)
    assert len(lp.top_logprobs) == 4 and all(len(top) == 3 for top in lp.top_logprobs)
    assert lp.text_offset == list(range(4))  # one character per token
    r = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "abc"}], max_tokens=3,
        temperature=0, logprobs=True, top_logprobs=2, extra_body=EXTRA,
    )  # fmt: skip
    content = r.choices[0].logprobs.content
    assert len(content) == 3 and all(len(c.top_logprobs) == 2 for c in content)
    assert content[0].bytes == list(content[0].token.encode())
    assert max(c.top_logprobs[0].logprob for c in content) <= 0


BAD_BODIES = [
    (b"{not json", "invalid request body"),
    (b"[1, 2]", "invalid request body"),
    (b'{"prompt": "a", "max_tokens": "8"}', "max_tokens"),
    (b'{"prompt": "a", "temperature": 2.5}', "temperature"),
    (b'{"prompt": "a", "temperature": NaN}', "invalid request body"),
    (b'{"prompt": "a", "top_p": 0}', "top_p"),
    (b'{"prompt": "a", "n": 0}', "n"),
    (b'{"prompt": "a", "n": true}', "n"),
    (b'{"prompt": "a", "max_tokens": 0}', "max_tokens"),
    (b'{"prompt": "a", "top_k": -5}', "top_k"),
    (b'{"prompt": "a", "logprobs": 21}', "logprobs"),
    (b'{"prompt": "a", "stop": [""]}', "stop must be non-empty"),
    (b'{"prompt": "a", "seed": 18446744073709551616}', "seed"),
    (b'{"prompt": ""}', "empty prompt"),
    (b'{"prompt": []}', "prompt is empty"),
    (b'{"prompt": [[]]}', "empty prompt"),
    (b'{"prompt": [5, 999]}', "outside the vocabulary"),
    (b'{"prompt": "' + b"a" * 200 + b'"}', "leaves no room to generate"),
    (b'{"prompt": "a", "stop_token_ids": [4096]}', "stop_token_ids"),
    (b'{"prompt": "a", "best_of": 3}', "best_of"),
    (b'{"prompt": "a", "logit_bias": {"5": 1.0}}', "logit_bias"),
    (b'{"prompt": "a", "echo": true, "logprobs": 1}', "echo"),
    (b'{"max_tokens": 3}', "prompt"),
]


@pytest.mark.parametrize("body, message", BAD_BODIES)
def test_bad_completion_requests_get_400(server, body, message) -> None:
    r = httpx.post(f"{server.base_url}/completions", content=body, timeout=30)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert message in error["message"] and error["type"] == "invalid_request_error"
    assert "\n" not in error["message"]


@pytest.mark.parametrize(
    "body, message",
    [
        ({"messages": []}, "messages"),
        ({"messages": [{"content": "a"}]}, "role"),
        ({"messages": [{"role": "user", "content": "a"}], "top_logprobs": 2}, "needs logprobs"),
        (
            {"messages": [{"role": "user", "content": "a"}], "tools": [{"type": "function"}]},
            "tools",
        ),
        ({"messages": [{"role": "user", "content": "a" * 200}]}, "leaves no room"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages"),
    ],
)
def test_bad_chat_requests_get_400(server, body, message) -> None:
    r = httpx.post(f"{server.base_url}/chat/completions", json=body, timeout=30)
    assert r.status_code == 400, r.text
    assert message in r.json()["error"]["message"]


def test_openai_client_errors(client, server) -> None:
    with pytest.raises(openai.BadRequestError, match="leaves no room"):
        client.completions.create(model=MODEL, prompt="a" * 300)
    with pytest.raises(openai.NotFoundError, match="does not exist") as err:
        client.completions.create(model="gpt-4", prompt="a")
    assert err.value.code == "model_not_found"
    r = httpx.get(f"{server.base_url}/nowhere")
    assert r.status_code == 404 and r.json()["error"]["message"] == "Not Found"
    r = httpx.get(f"{server.base_url}/completions")
    assert r.status_code == 405 and "error" in r.json()


def test_a_client_that_gives_up_aborts_its_request(server) -> None:
    before = server.metrics()
    body = {"prompt": "ab", "max_tokens": 120, "temperature": 0, "ignore_eos": True}
    with pytest.raises(httpx.TimeoutException):
        httpx.post(f"{server.base_url}/completions", json=body, timeout=0.1)
    after = server.wait_idle()
    assert delta(after, before, "hf2paged_requests_finished_total{finish_reason=abort}") == 1
    # The streamed variant: close the response after the first event.
    with httpx.stream(
        "POST", f"{server.base_url}/completions", json=dict(body, stream=True), timeout=30
    ) as r:
        first = next(r.iter_lines())
        assert json.loads(first.removeprefix("data: "))["choices"][0]["text"]
    after2 = server.wait_idle()
    assert delta(after2, after, "hf2paged_requests_finished_total{finish_reason=abort}") == 1
