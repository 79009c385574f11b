"""The OpenAI-compatible HTTP app: FastAPI routes over an `AsyncLLM`.

    GET  /v1/models            the one served model
    POST /v1/completions       text or token-id prompts (several per request too)
    POST /v1/chat/completions  messages through the tokenizer's chat template
    GET  /health               200 while the engine runs, else 503
    GET  /metrics              Prometheus text format

Both POST routes stream server-sent events in OpenAI's chunk format with ``"stream":
true`` (a last usage chunk with ``stream_options.include_usage``). Errors are OpenAI's
error JSON: 400 for a bad body or a request the engine refuses (its own one-line
message), 401 for a missing or wrong API key, 404 for another model name, 503 with
Retry-After when the waiting queue is full. A client that disconnects aborts its
requests, freeing their KV blocks before the engine's next step.

The app serves an `AsyncLLM`: `hf2paged serve` gives it the engine in a process of its
own (`EngineProcess`), so this process's interpreter does HTTP, tokenization and
detokenization only.
"""

from __future__ import annotations

import hmac
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI
from pydantic import ValidationError
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from hf2paged.serve.metrics import HTTPMetricsMiddleware, ServerMetrics
from hf2paged.serve.protocol import (
    DEFAULT_COMPLETION_MAX_TOKENS,
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
)
from hf2paged.serve.responses import (
    Choice,
    ChunkWriter,
    TokenTexts,
    chat_choice,
    chat_delta_json,
    chat_logprobs,
    completion_choice,
    completion_choice_json,
    completion_logprobs,
    sse,
    usage,
)
from hf2paged.serve.streaming import EventStream, merge, until_disconnected
from runtime.engine import SamplingParams
from runtime.engine.async_llm import (
    AsyncLLM,
    EngineDeadError,
    EngineError,
    EngineOverloaded,
    RequestStream,
)

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 32 << 20
ROUTES = {"/v1/models", "/v1/completions", "/v1/chat/completions", "/health", "/metrics"}


@dataclass
class ServerConfig:
    served_model_name: str
    api_key: str | None = None


def build_app(engine: AsyncLLM, config: ServerConfig) -> FastAPI:
    """The app serving `engine` (its `max_waiting` answers 503 beyond); the app's lifespan
    starts the engine stepping and closes it."""
    server = OpenAIServer(engine, config)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        server.engine.start()
        try:
            yield
        finally:
            await server.engine.close()

    app = FastAPI(title="hf2paged", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.server = server
    app.add_api_route("/v1/models", server.models, methods=["GET"])
    app.add_api_route("/v1/completions", server.completions, methods=["POST"])
    app.add_api_route("/v1/chat/completions", server.chat_completions, methods=["POST"])
    app.add_api_route("/health", server.health, methods=["GET"])
    app.add_api_route("/metrics", server.metrics_text, methods=["GET"])
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(Exception, _internal_error)
    app.add_middleware(HTTPMetricsMiddleware, metrics=server.metrics, routes=ROUTES)
    return app


def _api_error(_request: Request, exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


def _http_error(_request: Request, exc: HTTPException) -> JSONResponse:
    kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    return _api_error(_request, APIError(exc.status_code, str(exc.detail), kind))


def _internal_error(_request: Request, exc: Exception) -> JSONResponse:
    log.exception("internal error")
    return _api_error(_request, APIError(500, f"internal error: {exc}", "server_error"))


def _engine_error(exc: Exception) -> APIError:
    if isinstance(exc, EngineOverloaded):
        headers = {"Retry-After": str(exc.retry_after)}
        return APIError(503, str(exc), "server_overloaded", headers=headers)
    if isinstance(exc, ValueError):
        return APIError(400, str(exc))
    if isinstance(exc, EngineDeadError):  # nothing will be served until a restart
        return APIError(503, f"the engine is not running: {exc}", "server_error")
    return APIError(500, str(exc), "server_error")


class OpenAIServer:
    """The route handlers; one per app."""

    def __init__(self, engine: AsyncLLM, config: ServerConfig) -> None:
        self.config = config
        self.model = config.served_model_name
        self.metrics = ServerMetrics()
        self.engine = engine
        self.metrics.attach(self.engine)
        self.token_text = TokenTexts(engine.tokenizer)
        self.created = int(time.time())

    # ------------------------------------------------------------------ plumbing
    def authorize(self, request: Request) -> None:
        key = self.config.api_key
        if key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            token.strip().encode(), key.encode()
        ):
            raise APIError(
                401, "invalid API key: send it as 'Authorization: Bearer <key>'",
                "authentication_error", code="invalid_api_key",
            )  # fmt: skip

    async def parse(self, request: Request, model: type):
        self.authorize(request)
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_BODY_BYTES:
                raise APIError(413, f"request body over {MAX_BODY_BYTES >> 20} MiB")
        try:
            parsed = model.model_validate_json(bytes(body))
        except ValidationError as err:
            raise APIError(400, _validation_message(err), param=_error_param(err)) from None
        if parsed.model is not None and parsed.model != self.model:
            raise APIError(
                404, f"the model `{parsed.model}` does not exist; this server serves `{self.model}`",
                "not_found_error", param="model", code="model_not_found",
            )  # fmt: skip
        parsed.check_unsupported()
        return parsed

    def add(
        self, prompts: list, params: SamplingParams, n: int, request_id: str, detokenize: bool
    ) -> list[RequestStream]:
        streams: list[RequestStream] = []
        try:
            for i, prompt in enumerate(prompts):
                rid = request_id if len(prompts) == 1 else f"{request_id}-{i}"
                streams.append(self.engine.add_request(prompt, params, rid, n, detokenize))
        except (ValueError, EngineError, EngineOverloaded) as exc:
            for stream in streams:
                stream.abort()
            raise _engine_error(exc) from None
        return streams

    async def collect(self, request: Request, streams: list[RequestStream], n: int):
        """Every choice, in order, once finished; None when the client went away."""

        async def gather() -> list[Choice]:
            choices: dict[int, Choice] = {}
            async for p, updates in merge(streams):
                for u in updates:
                    index = p * n + u.index
                    choices.setdefault(index, Choice(index)).add(u)
            return [choices[i] for i in sorted(choices)]

        try:
            done, choices = await until_disconnected(request, gather())
        except (ValueError, EngineError) as exc:
            raise _engine_error(exc) from None
        return choices if done else None

    # ------------------------------------------------------------------ routes
    async def models(self, request: Request) -> dict:
        self.authorize(request)
        card = {
            "id": self.model, "object": "model", "created": self.created,
            "owned_by": "hf2paged", "root": str(self.engine.info.model),
            "max_model_len": self.engine.max_model_len,
        }  # fmt: skip
        return {"object": "list", "data": [card]}

    async def health(self) -> Response:
        if self.engine.is_running:
            return Response(status_code=200)
        error = _engine_error(EngineDeadError(self.engine.dead_message()))
        return JSONResponse(error.body(), error.status)

    async def metrics_text(self) -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(self.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    async def completions(self, request: Request) -> Response:
        body: CompletionRequest = await self.parse(request, CompletionRequest)
        prompts = body.prompts()
        params = body.sampling_params(
            body.max_tokens or DEFAULT_COMPLETION_MAX_TOKENS, body.logprobs
        )
        request_id = f"cmpl-{uuid.uuid4().hex}"
        streams = self.add(prompts, params, body.n, request_id, detokenize=body.stream)
        echo = [self._prompt_text(p) if body.echo else "" for p in prompts]
        head = {"id": request_id, "object": "text_completion", "created": int(time.time()),
                "model": self.model}  # fmt: skip
        if body.stream:
            return EventStream(self._completion_events(body, streams, head, echo))
        choices = await self.collect(request, streams, body.n)
        if choices is None:
            return Response(status_code=499)
        out = []
        for c in choices:
            p = c.index // body.n
            choice = completion_choice(c, self.token_text, body.return_token_ids, echo[p])
            if body.return_token_ids:
                choice["prompt_token_ids"] = streams[p].prompt_token_ids
            out.append(choice)
        prompt_tokens = sum(len(s.prompt_token_ids) for s in streams)
        completion_tokens = sum(c.num_output_tokens for c in choices)
        return JSONResponse(
            {**head, "choices": out, "usage": usage(prompt_tokens, completion_tokens)}
        )

    async def _completion_events(
        self, body: CompletionRequest, streams: list[RequestStream], head: dict, echo: list[str]
    ) -> AsyncIterator[str]:
        n = body.n
        writer = ChunkWriter(head, body.include_usage)
        text_len: dict[int, int] = {}  # characters sent per choice (logprobs' text offsets)
        tokens: dict[int, int] = {}
        detail = body.logprobs is not None or body.return_token_ids
        try:
            async for p, updates in merge(streams):
                for u in updates:
                    index = p * n + u.index
                    first = index not in text_len
                    prefix = echo[p] if first else ""
                    tokens[index] = u.num_output_tokens
                    if not (u.text or prefix or u.finished or (detail and u.token_ids)):
                        continue
                    offset = text_len.get(index, 0)
                    logprobs = None
                    if u.logprobs is not None:
                        logprobs = completion_logprobs(
                            u.token_ids, u.logprobs, self.token_text, offset + len(prefix)
                        )
                    text_len[index] = offset + len(prefix) + len(u.text)
                    yield writer.event(
                        completion_choice_json(
                            index,
                            prefix + u.text,
                            u.finish_reason,
                            logprobs,
                            u.token_ids if body.return_token_ids else None,
                            streams[p].prompt_token_ids
                            if body.return_token_ids and first
                            else None,
                        )  # fmt: skip
                    )
            if body.include_usage:
                prompt_tokens = sum(len(s.prompt_token_ids) for s in streams)
                yield sse(
                    {**head, "choices": [], "usage": usage(prompt_tokens, sum(tokens.values()))}
                )
        except (ValueError, EngineError) as exc:
            yield sse(_engine_error(exc).body())
        yield "data: [DONE]\n\n"

    async def chat_completions(self, request: Request) -> Response:
        body: ChatCompletionRequest = await self.parse(request, ChatCompletionRequest)
        messages = [m.as_template_input() for m in body.messages]
        try:
            prompt = self.engine.apply_chat_template(messages)
        except ValueError as exc:
            raise APIError(400, str(exc), param="messages") from None
        except Exception as exc:  # noqa: BLE001 — the template's own checks (jinja raise_exception)
            raise APIError(
                400, f"the chat template refused the messages: {exc}", param="messages"
            ) from None
        try:
            ids = self.engine.check_request(prompt).prompt_token_ids
        except ValueError as exc:
            raise APIError(400, str(exc), param="messages") from None
        max_tokens = body.max_completion_tokens or body.max_tokens
        if max_tokens is None:  # OpenAI's default: as much as the context leaves
            max_tokens = max(1, self.engine.max_model_len - len(ids))
        params = body.sampling_params(max_tokens, body.engine_logprobs())
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        streams = self.add([ids], params, body.n, request_id, detokenize=body.stream)
        head = {"id": request_id, "object": "chat.completion", "created": int(time.time()),
                "model": self.model}  # fmt: skip
        if body.stream:
            head["object"] = "chat.completion.chunk"
            return EventStream(self._chat_events(body, streams[0], head))
        choices = await self.collect(request, streams, body.n)
        if choices is None:
            return Response(status_code=499)
        out = [chat_choice(c, self.token_text, body.return_token_ids) for c in choices]
        response = {**head, "choices": out,
                    "usage": usage(len(ids), sum(c.num_output_tokens for c in choices))}  # fmt: skip
        if body.return_token_ids:
            response["prompt_token_ids"] = ids
        return JSONResponse(response)

    async def _chat_events(
        self, body: ChatCompletionRequest, stream: RequestStream, head: dict
    ) -> AsyncIterator[str]:
        extra = {"usage": None} if body.include_usage else {}
        tokens: dict[int, int] = {}
        detail = body.logprobs or body.return_token_ids
        try:
            for index in range(body.n):
                role = {"index": index, "delta": {"role": "assistant", "content": ""},
                        "logprobs": None, "finish_reason": None}  # fmt: skip
                first = {**head, "choices": [role], **extra}
                if body.return_token_ids and index == 0:
                    first["prompt_token_ids"] = stream.prompt_token_ids
                yield sse(first)
            writer = ChunkWriter(head, body.include_usage)
            async for _, updates in merge([stream]):
                for u in updates:
                    tokens[u.index] = u.num_output_tokens
                    if not (u.text or u.finished or (detail and u.token_ids)):
                        continue
                    logprobs = None
                    if u.logprobs is not None:
                        logprobs = chat_logprobs(u.token_ids, u.logprobs, self.token_text)
                    content = u.text if u.text or not u.finished else None
                    yield writer.event(
                        chat_delta_json(
                            u.index,
                            content,
                            u.finish_reason,
                            logprobs,
                            u.token_ids if body.return_token_ids else None,
                        )  # fmt: skip
                    )
            if body.include_usage:
                prompt_tokens = len(stream.prompt_token_ids)
                yield sse(
                    {**head, "choices": [], "usage": usage(prompt_tokens, sum(tokens.values()))}
                )
        except (ValueError, EngineError) as exc:
            yield sse(_engine_error(exc).body())
        yield "data: [DONE]\n\n"

    def _prompt_text(self, prompt: str | list[int]) -> str:
        if isinstance(prompt, str):
            return prompt
        if self.engine.tokenizer is None:
            return ""
        return self.engine.tokenizer.decode(prompt, skip_special_tokens=True)


def _error_param(err: ValidationError) -> str | None:
    errors = err.errors()
    if errors and errors[0].get("loc"):
        return str(errors[0]["loc"][0])
    return None


def _validation_message(err: ValidationError) -> str:
    """The body's problems in one line: `field: what is wrong` (at most three)."""
    parts = []
    for e in err.errors()[:3]:
        loc = ".".join(str(x) for x in e.get("loc", ()))
        parts.append(f"{loc}: {e['msg']}" if loc else e["msg"])
    more = len(err.errors()) - 3
    return "invalid request body: " + "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")
