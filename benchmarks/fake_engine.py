"""A stand-in engine for measuring the HTTP side of `hf2paged serve` alone
(`benchmarks/serve.py --fake-engine`).

`FakeLLM` has the stepping API the server drives (`add_checked_request`,
`abort_request`, `abort_all`, `has_unfinished_requests`, `step_tokens`, and the
scheduler / block counts its stats read) but no model: each step admits waiting requests
up to `max_num_seqs`, holds the interpreter lock for `host_ms` (the engine's own Python
work per step: scheduling, inputs, sampling bookkeeping) and sleeps for the rest of
`step_ms` (the GPU), then gives every running request one token. A request ends at its
`max_tokens` ("length"). Tokens: a text's tokens when a tokenizer is given (so
detokenization costs what it costs on real text), else ids derived from the prompt.

    python benchmarks/fake_engine.py --step-ms 8 --host-ms 3 [--tokenizer DIR] --port 0

starts a server on it as `hf2paged serve` does (the engine in a process of its own;
`--in-process`: on a thread of the server's process), printing its URL when ready.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from collections import deque
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from runtime.engine.loading import CheckedRequest, RequestChecker, load_tokenizer  # noqa: E402
from runtime.engine.outputs import TokenDelta  # noqa: E402

FAKE_VOCAB = 10_000  # without a tokenizer (benchmarks' prompt ids are below this)
NUM_BLOCKS = 1 << 16


class _FakeRequest:
    __slots__ = ("request_id", "prompt_ids", "max_tokens", "num_output", "offset", "logprobs",
                 "finish_reason")  # fmt: skip

    def __init__(self, request_id: str, checked: CheckedRequest) -> None:
        self.request_id = request_id
        self.prompt_ids = checked.prompt_token_ids
        self.max_tokens = checked.sampling_params.max_tokens
        self.logprobs = checked.sampling_params.logprobs
        self.num_output = 0
        self.offset = sum(self.prompt_ids[:8])
        self.finish_reason: str | None = None


class FakeLLM:
    """An engine without a model: tokens at a fixed step time (see the module doc)."""

    def __init__(
        self,
        step_ms: float = 8.0,
        host_ms: float = 3.0,
        max_num_seqs: int = 256,
        tokenizer: str | Path | None = None,
        max_model_len: int = 4096,
    ) -> None:
        if not 0 <= host_ms <= step_ms:
            raise ValueError(f"need 0 <= host_ms <= step_ms, got {host_ms}, {step_ms}")
        self.step_s = step_ms / 1e3
        self.host_s = host_ms / 1e3
        self.max_num_seqs = max_num_seqs
        model = Path(tokenizer) if tokenizer is not None else REPO / "benchmarks"
        self.tokenizer = load_tokenizer(model) if tokenizer is not None else None
        self.vocab_size = len(self.tokenizer) if self.tokenizer is not None else FAKE_VOCAB
        # Real text's tokens to emit (README), so detokenizing costs what it costs on text.
        self.text_tokens = (
            self.tokenizer.encode((REPO / "README.md").read_text())
            if self.tokenizer is not None
            else None
        )
        self.max_model_len = max_model_len
        self.checker = RequestChecker(model, self.tokenizer, self.vocab_size, max_model_len)
        self.config = SimpleNamespace(
            model=model, device_type="cpu", max_model_len=max_model_len, block_size=16,
            trust_remote_code=False,
        )  # fmt: skip
        self.scheduler = SimpleNamespace(running=[], waiting=deque(), num_preemptions=0)
        self.block_manager = SimpleNamespace(num_blocks=NUM_BLOCKS, num_free_blocks=NUM_BLOCKS)
        self._requests: dict[str, _FakeRequest] = {}

    # ------------------------------------------------------------------ requests
    def add_checked_request(
        self, request: CheckedRequest, request_id: str | None = None, detokenize: bool = True
    ) -> str:
        if request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        req = _FakeRequest(request_id, request)
        self._requests[request_id] = req
        self.scheduler.waiting.append(req)
        return request_id

    def abort_request(self, request_id: str) -> None:
        req = self._requests.pop(request_id, None)
        if req is None:
            return
        if req in self.scheduler.running:
            self.scheduler.running.remove(req)
        else:
            self.scheduler.waiting.remove(req)
        self._update_blocks()

    def abort_all(self) -> list[str]:
        ids = list(self._requests)
        for request_id in ids:
            self.abort_request(request_id)
        return ids

    def has_unfinished_requests(self) -> bool:
        return bool(self._requests)

    def _update_blocks(self) -> None:
        used = len(self.scheduler.running) + len(self.scheduler.waiting)
        self.block_manager.num_free_blocks = NUM_BLOCKS - used

    # ------------------------------------------------------------------ stepping
    def step_tokens(self) -> list[TokenDelta]:
        start = time.perf_counter()
        running, waiting = self.scheduler.running, self.scheduler.waiting
        while waiting and len(running) < self.max_num_seqs:
            running.append(waiting.popleft())
        while time.perf_counter() - start < self.host_s:  # the engine's Python work
            pass
        rest = self.step_s - (time.perf_counter() - start)
        if rest > 0:
            time.sleep(rest)  # the GPU: the interpreter lock is free
        deltas = []
        finished = []
        for req in running:
            token = self._token(req)
            req.num_output += 1
            if req.num_output >= req.max_tokens:
                req.finish_reason = "length"
                finished.append(req)
            logprobs = (-0.5, {token: -0.5}) if req.logprobs is not None else None
            deltas.append(
                TokenDelta(req.request_id, token, logprobs, req.finish_reason, req.num_output)
            )
        for req in finished:
            running.remove(req)
            self._requests.pop(req.request_id, None)
        self._update_blocks()
        return deltas

    def _token(self, req: _FakeRequest) -> int:
        if self.text_tokens is not None:
            return self.text_tokens[(req.offset + req.num_output) % len(self.text_tokens)]
        return req.prompt_ids[req.num_output % len(req.prompt_ids)]

    def close(self) -> None:
        pass


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--step-ms", type=float, default=8.0, help="one engine step, in ms")
    p.add_argument("--host-ms", type=float, default=3.0,
                   help="of which the engine's Python work (holding the interpreter lock)")  # fmt: skip
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--tokenizer", type=Path, default=None,
                   help="a model directory whose tokenizer makes the text (default: ids only)")  # fmt: skip
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--max-waiting-requests", type=int, default=4096)
    p.add_argument("--log-level", default="warning")
    p.add_argument("--in-process", action="store_true",
                   help="step the stand-in on a thread of the server's process")  # fmt: skip
    return p.parse_args(argv)


def main(argv=None) -> None:
    from hf2paged.serve.app import ServerConfig, build_app
    from hf2paged.serve.command import _run
    from runtime.engine.async_llm import AsyncLLM
    from runtime.engine.engine_process import EngineProcess

    args = parse_args(argv)
    make_llm = functools.partial(
        FakeLLM, args.step_ms, args.host_ms, args.max_num_seqs, args.tokenizer
    )
    engine = make_llm() if args.in_process else EngineProcess(make_llm)
    try:
        app = build_app(AsyncLLM(engine, args.max_waiting_requests), ServerConfig("fake"))
        _run(app, args.host, args.port, args.log_level)
    finally:
        engine.close()


if __name__ == "__main__":
    main()
