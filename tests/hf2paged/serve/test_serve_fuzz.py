"""Property test: random and malformed bodies posted to the server never get a 500, never
crash it and never leak a KV block. Bodies are random bytes, random JSON, or a valid
request with one field replaced by a random JSON value (huge numbers, NaN, wrong types,
nesting) or removed."""

from __future__ import annotations

import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

COMPLETION = {"model": "llama", "prompt": "hello", "max_tokens": 3, "temperature": 0}
CHAT = {"model": "llama", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
FIELDS = [
    "model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature",
    "top_p", "top_k", "min_p", "n", "seed", "stop", "stop_token_ids", "logprobs",
    "top_logprobs", "echo", "presence_penalty", "frequency_penalty", "repetition_penalty",
    "stream", "stream_options", "ignore_eos", "best_of", "logit_bias", "user", "tools",
    "return_token_ids", "response_format",
]  # fmt: skip

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.sampled_from([0, 1, -1, 2, 128, 129, 2**31, 2**63, 2**64, 10**30])
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=30)
)
json_values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=12,
)


@st.composite
def bodies(draw) -> tuple[str, bytes]:
    route = draw(st.sampled_from(["completions", "chat/completions"]))
    kind = draw(st.sampled_from(["bytes", "json", "replace", "replace", "replace", "remove"]))
    if kind == "bytes":
        return route, draw(st.binary(max_size=200))
    if kind == "json":
        return route, json.dumps(draw(json_values)).encode()
    body = dict(COMPLETION if route == "completions" else CHAT)
    field = draw(st.sampled_from(FIELDS) | st.text(max_size=8))
    if kind == "remove":
        body.pop(field, None)
    else:
        body[field] = draw(json_values)
    return route, json.dumps(body).encode()  # NaN / Infinity literals included


def post(client: httpx.Client, url: str, route: str, body: bytes) -> int:
    with client.stream("POST", f"{url}/{route}", content=body) as r:
        data = r.read()
    assert r.status_code in (200, 400, 404, 413), (r.status_code, body, data)
    if r.status_code != 200:
        error = json.loads(data)["error"]
        assert error["message"] and "\n" not in error["message"], error
    elif r.headers["content-type"].startswith("text/event-stream"):
        events = [e for e in data.decode().split("\n\n") if e]
        assert events[-1] == "data: [DONE]"
        for event in events[:-1]:
            assert "error" not in json.loads(event.removeprefix("data: ")), event
    else:
        assert json.loads(data)["choices"]
    return r.status_code


def check_server(server, client: httpx.Client, examples: int) -> None:
    @settings(
        max_examples=examples, deadline=None, derandomize=examples < 100,
        suppress_health_check=[HealthCheck.too_slow],
    )  # fmt: skip
    @given(bodies())
    def prop(case):
        seen.append(post(client, server.base_url, *case))

    seen: list[int] = []
    prop()
    # Not vacuous: valid variations ran and invalid ones were refused.
    assert seen.count(200) >= examples // 10 and seen.count(400) >= examples // 10, seen
    assert server.proc.poll() is None, server.output
    assert client.get(f"{server.url}/health").status_code == 200
    server.wait_idle()


def test_random_and_malformed_bodies(server) -> None:
    with httpx.Client(timeout=120) as client:
        check_server(server, client, examples=60)


@pytest.mark.slow
def test_random_and_malformed_bodies_long(server) -> None:
    with httpx.Client(timeout=300) as client:
        check_server(server, client, examples=600)
