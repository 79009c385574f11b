"""AsyncLLM: the engine thread batches requests from many coroutines; results equal
`LLM.generate`; early exits abort and free blocks; overload, failures and `n` samples."""

from __future__ import annotations

import asyncio
import random

import pytest
from engine_models import build_model_dir

from runtime.engine import LLM, SamplingParams
from runtime.engine.async_llm import AsyncLLM, EngineError, EngineOverloaded, RequestObserver


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_model_dir("llama", tmp_path_factory.mktemp("async"))[0]


# The engine loop synchronous, and with asynchronous scheduling (tokens one step late).
@pytest.fixture(scope="module", params=[False, True], ids=["sync", "async"])
def llm(model_dir, request):
    engine = LLM(model_dir, block_size=4, kv_cache_memory_bytes=1 << 20, max_num_seqs=8,
                 async_scheduling=request.param)  # fmt: skip
    yield engine
    engine.close()


@pytest.fixture(autouse=True)
def no_leak(llm):
    yield
    assert not llm.has_unfinished_requests()
    assert llm.block_manager.num_free_blocks == llm.block_manager.num_blocks


def greedy(**kw) -> SamplingParams:
    return SamplingParams(temperature=0, **{"max_tokens": 12, "ignore_eos": True, **kw})


def prompts(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz "
    return ["".join(rng.choice(letters) for _ in range(rng.randint(3, 20))) for _ in range(count)]


async def read(stream) -> tuple[str, list[int], str | None]:
    text, tokens, reason = "", [], None
    async for updates in stream:
        for u in updates:
            text += u.text
            tokens += u.token_ids
            reason = u.finish_reason or reason
    return text, tokens, reason


def test_concurrent_requests_equal_generate(llm) -> None:
    """20 coroutines arriving at random times (more than max_num_seqs=8: some wait)."""
    texts = prompts(20)
    params = [greedy(max_tokens=4 + i % 9) for i in range(20)]
    offline = llm.generate(texts, params, use_tqdm=False)

    class Counting(RequestObserver):
        def __init__(self):
            self.first = self.gaps = 0
            self.finished = []

        def on_step(self, first_token_latencies, inter_token_latencies):
            assert min(first_token_latencies + inter_token_latencies) >= 0
            self.first += len(first_token_latencies)
            self.gaps += len(inter_token_latencies)

        def on_finished(self, reason, prompt_tokens, output_tokens, latency):
            self.finished.append((reason, prompt_tokens, output_tokens))

    observer = Counting()

    async def main():
        async with AsyncLLM(llm, observer=observer) as engine:

            async def one(i):
                await asyncio.sleep(random.Random(i).random() * 0.05)
                return await read(engine.add_request(texts[i], params[i], detokenize=i % 2 == 0))

            results = await asyncio.gather(*(one(i) for i in range(20)))
            assert engine.stats.num_steps > 0
            return results

    results = asyncio.run(main())
    for out, (text, tokens, reason) in zip(offline, results):
        assert (text, tokens, reason) == (out.text, out.token_ids, out.finish_reason)
    assert observer.first == 20
    assert observer.gaps == sum(len(o.token_ids) - 1 for o in offline)
    assert sorted(observer.finished) == sorted(
        ("length", len(o.prompt_token_ids), len(o.token_ids)) for o in offline
    )


def test_stop_strings_are_never_streamed_in_part(llm) -> None:
    """The streamed deltas add up to the final text, which ends before the stop string;
    no delta ever shows the start of the stop string that was cut."""
    base = llm.generate("hello", greedy(max_tokens=20), use_tqdm=False)[0].text
    stop = base[6:9]
    expected = llm.generate("hello", greedy(max_tokens=20, stop=[stop]), use_tqdm=False)[0]
    assert expected.finish_reason == "stop"

    async def main():
        async with AsyncLLM(llm) as engine:
            stream = engine.add_request("hello", greedy(max_tokens=20, stop=[stop]))
            pieces = []
            async for updates in stream:
                pieces += [u.text for u in updates]
            return pieces

    pieces = asyncio.run(main())
    assert "".join(pieces) == expected.text == base[: base.find(stop)]


@pytest.mark.parametrize("how", ["break", "cancel", "abort_waiting"])
def test_leaving_a_stream_early_aborts_and_frees_its_blocks(llm, how) -> None:
    async def main():
        async with AsyncLLM(llm) as engine:
            if how == "break":
                stream = engine.add_request("abc", greedy(max_tokens=50))
                async for _ in stream:
                    break
                stream.abort()  # `break` leaves the iterator open; the reader aborts
            elif how == "cancel":
                task = asyncio.create_task(read(engine.add_request("abc", greedy(max_tokens=50))))
                await asyncio.sleep(0.05)
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
            else:  # aborted before the engine thread even saw it
                engine.add_request("abc", greedy(max_tokens=50)).abort()
            for _ in range(200):
                await asyncio.sleep(0.01)
                stats = engine.stats
                if stats.num_free_blocks == stats.num_blocks and not stats.num_running:
                    break
            assert engine.stats.num_free_blocks == engine.stats.num_blocks
            # The engine keeps serving.
            assert (await read(engine.add_request("abc", greedy(max_tokens=3))))[2] == "length"

    asyncio.run(main())


def test_overload_bad_requests_and_duplicate_ids(llm) -> None:
    async def main():
        async with AsyncLLM(llm, max_waiting=2) as engine:
            with pytest.raises(ValueError, match="empty prompt"):
                engine.add_request("", greedy())
            # Fill the batch (max_num_seqs=8) with long requests, then the queue.
            engine.max_waiting = None
            running = [engine.add_request("ab", greedy(max_tokens=60)) for _ in range(8)]
            while engine.stats.num_running < 8:
                await asyncio.sleep(0.001)
            engine.max_waiting = 2
            first = engine.add_request("ab", greedy(max_tokens=4), request_id="x")
            with pytest.raises(ValueError, match="already in use"):
                engine.add_request("ab", greedy(), request_id="x")
            engine.add_request("ab", greedy(max_tokens=4)).abort()  # leaves the queue
            second = engine.add_request("cd", greedy(max_tokens=4))
            assert engine.num_waiting == 2
            with pytest.raises(EngineOverloaded, match="overloaded") as err:
                engine.add_request("ef", greedy())
            assert err.value.retry_after >= 1
            await asyncio.gather(read(first), read(second), *(read(s) for s in running))
            await read(engine.add_request("ef", greedy(max_tokens=2)))  # room again

    asyncio.run(main())


def test_n_samples_differ_by_seed_and_repeat(llm) -> None:
    params = SamplingParams(temperature=1.0, seed=7, max_tokens=10, ignore_eos=True)

    async def main():
        async with AsyncLLM(llm) as engine:
            samples: dict[int, list[int]] = {0: [], 1: [], 2: []}
            async for updates in engine.add_request("hello", params, n=3):
                for u in updates:
                    samples[u.index] += u.token_ids
            return samples

    samples = asyncio.run(main())
    assert len({tuple(t) for t in samples.values()}) == 3
    for i, tokens in samples.items():  # each sample is the offline request of seed 7 + i
        assert tokens == llm.generate("hello", params.for_sample(i), use_tqdm=False)[0].token_ids


def test_a_failing_step_fails_its_requests_and_the_engine_goes_on(llm, monkeypatch) -> None:
    def broken(*args, **kwargs):
        raise RuntimeError("device lost")

    async def main():
        async with AsyncLLM(llm) as engine:
            with monkeypatch.context() as m:
                m.setattr(llm.executor, "execute", broken)
                stream = engine.add_request("abc", greedy())
                with pytest.raises(EngineError, match="device lost"):
                    await read(stream)
            assert engine.stats.num_free_blocks == engine.stats.num_blocks
            assert (await read(engine.add_request("abc", greedy(max_tokens=2))))[2] == "length"
        with pytest.raises(EngineError, match="shut down"):
            engine.add_request("abc", greedy())

    asyncio.run(main())


def test_closing_fails_the_open_streams(llm) -> None:
    async def main():
        engine = AsyncLLM(llm)
        engine.start()
        stream = engine.add_request("abc", greedy(max_tokens=200))
        await engine.close()
        with pytest.raises(EngineError, match="shut down"):
            await read(stream)

    asyncio.run(main())
