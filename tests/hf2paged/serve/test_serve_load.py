"""64 concurrent streaming clients (completions and chat, arriving at random times), a
third of them disconnecting at random points: every stream that finishes equals its
offline `LLM.generate` result, the KV blocks all come back, and /metrics counts what
was sent."""

from __future__ import annotations

import asyncio
import random

import openai
from serve_process import delta

from runtime.engine import SamplingParams

NUM_CLIENTS = 64
MODEL = "llama"


def make_clients(seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz "
    clients = []
    for i in range(NUM_CLIENTS):
        text = "".join(rng.choice(letters) for _ in range(rng.randint(2, 30)))
        max_tokens = rng.randint(4, 24)
        clients.append(
            dict(
                chat=i % 4 == 3,
                text=text,
                max_tokens=max_tokens,
                delay=rng.random() * 0.3,
                # Disconnect after this many tokens (0: right after the headers).
                leave_after=rng.randrange(max_tokens) if i % 3 == 0 else None,
            )
        )
    return clients


async def run_client(aclient: openai.AsyncOpenAI, c: dict) -> dict:
    await asyncio.sleep(c["delay"])
    common = dict(
        model=MODEL, max_tokens=c["max_tokens"], temperature=0, stream=True,
        extra_body={"ignore_eos": True, "return_token_ids": True},
    )  # fmt: skip
    if c["chat"]:
        stream = await aclient.chat.completions.create(
            messages=[{"role": "user", "content": c["text"]}], **common
        )
    else:
        stream = await aclient.completions.create(prompt=c["text"], **common)
    got = {"text": "", "token_ids": [], "finish": None, "left": False}
    if c["leave_after"] == 0:
        await stream.close()
        return dict(got, left=True)
    async for chunk in stream:
        for choice in chunk.choices:
            got["text"] += (choice.delta.content or "") if c["chat"] else choice.text
            got["token_ids"] += choice.model_extra.get("token_ids") or []
            got["finish"] = choice.finish_reason or got["finish"]
        leave = c["leave_after"] is not None and len(got["token_ids"]) >= c["leave_after"]
        if leave and got["finish"] is None:
            await stream.close()
            got["left"] = True
            break
    return got


def test_64_streaming_clients_with_disconnects(server, offline) -> None:
    clients = make_clients()
    prompts = [
        offline.apply_chat_template([{"role": "user", "content": c["text"]}])
        if c["chat"]
        else c["text"]
        for c in clients
    ]
    params = [
        SamplingParams(temperature=0, max_tokens=c["max_tokens"], ignore_eos=True) for c in clients
    ]
    expected = offline.generate(prompts, params, use_tqdm=False)
    before = server.wait_idle()

    async def main():
        async with openai.AsyncOpenAI(
            base_url=server.base_url, api_key="none", max_retries=0, timeout=120
        ) as aclient:
            return await asyncio.gather(*(run_client(aclient, c) for c in clients))

    results = asyncio.run(main())
    after = server.wait_idle()

    finished = [(r, e) for r, e in zip(results, expected) if not r["left"]]
    # A leaver whose last tokens came in one chunk with the finish stayed to the end.
    planned = sum(c["leave_after"] is not None for c in clients)
    assert NUM_CLIENTS - planned <= len(finished) < NUM_CLIENTS - planned // 2
    for r, e in finished:
        assert (r["text"], r["token_ids"], r["finish"]) == (e.text, e.token_ids, "length")
    for r, e in zip(results, expected):  # what the leavers saw is a prefix of the result
        assert r["token_ids"] == e.token_ids[: len(r["token_ids"])]

    def d(key: str) -> float:
        return delta(after, before, key)

    leavers = NUM_CLIENTS - len(finished)
    aborted = d("hf2paged_requests_finished_total{finish_reason=abort}")
    assert d("hf2paged_requests_finished_total{finish_reason=length}") + aborted == NUM_CLIENTS
    assert 0 < aborted <= leavers
    assert d("hf2paged_e2e_request_latency_seconds_count") == NUM_CLIENTS
    assert d("hf2paged_prompt_tokens_total") == sum(len(e.prompt_token_ids) for e in expected)
    generated = d("hf2paged_generation_tokens_total")
    sent = sum(len(r["token_ids"]) for r in results)
    assert sent <= generated <= sum(c["max_tokens"] for c in clients)
    started = d("hf2paged_time_to_first_token_seconds_count")
    assert len(finished) <= started <= NUM_CLIENTS
    assert d("hf2paged_inter_token_latency_seconds_count") == generated - started
    chat = sum(c["chat"] for c in clients)
    assert d("hf2paged_http_responses_total{route=/v1/chat/completions,status=200}") == chat
    assert (
        d("hf2paged_http_responses_total{route=/v1/completions,status=200}") == NUM_CLIENTS - chat
    )
    assert after["hf2paged_kv_cache_free_blocks"] == before["hf2paged_kv_cache_free_blocks"]
    assert after["hf2paged_kv_cache_free_blocks"] == after["hf2paged_kv_cache_blocks"]
