"""The app in process (httpx's ASGI transport): an engine step that fails answers its
requests with OpenAI's error JSON (500, or an error event in a stream) and the server
goes on serving."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from hf2paged.serve.app import ServerConfig, build_app
from runtime.engine import LLM
from runtime.engine.async_llm import AsyncLLM


@pytest.fixture(scope="module")
def llm(tiny_model):
    engine = LLM(tiny_model, block_size=4, kv_cache_memory_bytes=1 << 20)
    yield engine
    engine.close()


def test_a_failing_step_is_a_500_then_the_server_recovers(llm, monkeypatch) -> None:
    app = build_app(AsyncLLM(llm), ServerConfig("llama"))
    server = app.state.server
    body = {"prompt": "abc", "max_tokens": 4, "temperature": 0}

    def broken(*args, **kwargs):
        raise RuntimeError("device lost")

    async def main():
        server.engine.start()  # the ASGI transport runs no lifespan
        try:
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test/v1") as http:
                with monkeypatch.context() as m:
                    m.setattr(llm.executor, "execute", broken)
                    r = await http.post("/completions", json=body)
                    assert r.status_code == 500, r.text
                    assert "device lost" in r.json()["error"]["message"]
                    r = await http.post("/chat/completions", json=dict(
                        messages=[{"role": "user", "content": "hi"}], stream=True, max_tokens=4
                    ))  # fmt: skip
                    events = [e for e in r.text.split("\n\n") if e]
                    assert events[-1] == "data: [DONE]"
                    assert "device lost" in json.loads(events[-2][6:])["error"]["message"]
                r = await http.post("/completions", json=body)
                assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
                while server.engine.stats.num_free_blocks != server.engine.stats.num_blocks:
                    await asyncio.sleep(0.01)
                metrics = (await http.get("http://test/metrics")).text
                assert 'hf2paged_requests_finished_total{finish_reason="error"} 2.0' in metrics
        finally:
            await server.engine.close()

    asyncio.run(main())
    assert llm.block_manager.num_free_blocks == llm.block_manager.num_blocks
