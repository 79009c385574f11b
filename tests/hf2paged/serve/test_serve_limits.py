"""A server with an API key, one running request at most and one waiting: 401 without the
key, 503 with Retry-After beyond the waiting limit, a waiting request aborted by its
client leaves the queue at once; the command's argument errors."""

from __future__ import annotations

import json
import shutil
import time

import httpx
import openai
import pytest
from serve_process import ServerProcess
from typer.testing import CliRunner

KEY = "s3cret"
# Long enough that the running request outlasts the test's steps (its client leaves).
LONG = {"prompt": "ab", "max_tokens": 2000, "temperature": 0, "ignore_eos": True, "stream": True}


@pytest.fixture(scope="module")
def limited(tiny_model, tmp_path_factory):
    # The tiny model with a longer context (its 1 MiB KV cache holds 2048 tokens).
    model = tmp_path_factory.mktemp("limits") / "llama"
    shutil.copytree(tiny_model, model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps(dict(config, max_position_embeddings=4096)))
    args = ["--kv-cache-memory-mib", "1", "--block-size", "4", "--max-num-seqs", "1"]
    args += ["--max-waiting-requests", "1", "--api-key", KEY]
    with ServerProcess(model, *args) as proc:
        yield proc


def test_api_key(limited) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        r = httpx.get(f"{limited.base_url}/models", headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        r = httpx.post(f"{limited.base_url}/completions", json={"prompt": "a"}, headers=headers)
        assert r.status_code == 401
    assert httpx.get(f"{limited.url}/health").status_code == 200
    assert httpx.get(f"{limited.url}/metrics").status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=limited.base_url, api_key="wrong", max_retries=0).models.list()
    client = openai.OpenAI(base_url=limited.base_url, api_key=KEY, max_retries=0)
    assert client.completions.create(model="llama", prompt="a", max_tokens=2).choices


def wait_for(limited, key: str, value: float, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while limited.metrics()[key] != value:
        assert time.monotonic() < deadline, f"{key} never became {value}"
        time.sleep(0.02)


def test_overload_gets_503_and_a_waiting_client_can_leave(limited) -> None:
    headers = {"Authorization": f"Bearer {KEY}"}
    url = f"{limited.base_url}/completions"
    with (
        httpx.Client(headers=headers, timeout=60) as a,
        httpx.Client(headers=headers, timeout=60) as b,
    ):
        with a.stream("POST", url, json=LONG) as running:
            # Keep the iterator: dropping it closes the connection (a disconnect).
            lines = running.iter_lines()
            assert json.loads(next(lines).removeprefix("data: "))["choices"]
            with b.stream("POST", url, json=LONG) as waiting:
                assert waiting.status_code == 200
                wait_for(limited, "hf2paged_num_requests_waiting", 1)
                r = httpx.post(url, json=dict(LONG, stream=False), headers=headers)
                assert r.status_code == 503, (r.text, limited.output)
                assert int(r.headers["Retry-After"]) >= 1
                assert "overloaded" in r.json()["error"]["message"]
            # The waiting client left: its request leaves the queue, the other runs on.
            wait_for(limited, "hf2paged_num_requests_waiting", 0)
            assert limited.metrics()["hf2paged_num_requests_running"] == 1
    limited.wait_idle()
    m = limited.metrics()
    assert m["hf2paged_http_responses_total{route=/v1/completions,status=503}"] == 1
    assert m["hf2paged_requests_finished_total{finish_reason=abort}"] == 2


@pytest.mark.parametrize(
    "args, message",
    [
        (["/no/such/model"], "does not exist"),
        (["{model}/config.json"], "not a directory"),
        (["{model}", "--dtype", "float64"], "--dtype"),
        (["{model}", "--port", "70000"], "--port"),
        (["{model}", "--device", "gpu"], "--device"),
        (["{model}", "--max-model-len", "100000"], "max_model_len must be in [2, 128]"),
        (["{model}", "--max-num-batched-tokens", "0"], "--max-num-batched-tokens must be >= 1"),
    ],
)
def test_command_errors_are_one_line(tiny_model, args, message) -> None:
    from hf2paged.cli import app

    result = CliRunner().invoke(app, ["serve", *(a.format(model=tiny_model) for a in args)])
    assert result.exit_code in (1, 2), result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], result.output
