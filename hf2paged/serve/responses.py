"""OpenAI response bodies: completions and chat completions, whole and as stream chunks,
their logprobs and usage, built from the engine's `StreamUpdate`s."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from json.encoder import encode_basestring
from typing import Any

from runtime.engine.async_llm import StreamUpdate

# JSON has no -inf; vLLM reports an impossible token's log-probability as this.
MIN_LOGPROB = -9999.0


def dumps(body: dict[str, Any]) -> str:
    return json.dumps(body, ensure_ascii=False, separators=(",", ":"))


def sse(body: dict[str, Any] | str) -> str:
    """One server-sent event: ``data: <json>``."""
    return f"data: {body if isinstance(body, str) else dumps(body)}\n\n"


class ChunkWriter:
    """The server-sent events of one request's stream chunks, assembled from pieces: the
    fixed head (id, object, created, model) is encoded once, each chunk's choice by hand
    (`json.dumps` of the whole nested dict per token costs several times more, on the
    event loop the engine's results pass through)."""

    def __init__(self, head: dict[str, Any], include_usage: bool) -> None:
        self.prefix = "data: " + dumps(head)[:-1] + ',"choices":['
        self.suffix = '],"usage":null}\n\n' if include_usage else "]}\n\n"

    def event(self, choice_json: str) -> str:
        return self.prefix + choice_json + self.suffix


def _str_or_null(value: str | None) -> str:
    return "null" if value is None else encode_basestring(value)


def _ids(name: str, ids: list[int] | None) -> str:
    return "" if ids is None else f',"{name}":[{",".join(map(str, ids))}]'


def completion_choice_json(
    index: int,
    text: str,
    finish_reason: str | None,
    logprobs: dict | None = None,
    token_ids: list[int] | None = None,
    prompt_token_ids: list[int] | None = None,
) -> str:
    """One choice of a completion chunk, as JSON text."""
    return (
        f'{{"index":{index},"text":{encode_basestring(text)},'
        f'"logprobs":{"null" if logprobs is None else dumps(logprobs)},'
        f'"finish_reason":{_str_or_null(finish_reason)}'
        f"{_ids('token_ids', token_ids)}{_ids('prompt_token_ids', prompt_token_ids)}}}"
    )


def chat_delta_json(
    index: int,
    content: str | None,
    finish_reason: str | None,
    logprobs: dict | None = None,
    token_ids: list[int] | None = None,
) -> str:
    """One choice of a chat completion chunk (``content=None``: an empty delta), as JSON."""
    delta = "{}" if content is None else f'{{"content":{encode_basestring(content)}}}'
    return (
        f'{{"index":{index},"delta":{delta},'
        f'"logprobs":{"null" if logprobs is None else dumps(logprobs)},'
        f'"finish_reason":{_str_or_null(finish_reason)}{_ids("token_ids", token_ids)}}}'
    )


class TokenTexts:
    """The text of single tokens, as logprobs report them (cached); models without a
    tokenizer report ``token_id:<id>`` as vLLM does."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._cache.get(token_id)
        if text is None:
            if self.tokenizer is None:
                text = f"token_id:{token_id}"
            else:
                text = self.tokenizer.decode([token_id])
            if len(self._cache) < 1 << 17:
                self._cache[token_id] = text
        return text


def _logprob(value: float) -> float:
    return max(value, MIN_LOGPROB)


@dataclass
class Choice:
    """One choice (one sample of one prompt) accumulated from its updates."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list | None = None
    finish_reason: str | None = None
    num_output_tokens: int = 0

    def add(self, update: StreamUpdate) -> None:
        self.text += update.text
        self.token_ids += update.token_ids
        if update.logprobs is not None:
            self.logprobs = (self.logprobs or []) + update.logprobs
        self.finish_reason = update.finish_reason
        self.num_output_tokens = update.num_output_tokens


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


# ---------------------------------------------------------------------- completions
def completion_logprobs(
    token_ids: list[int], logprobs: list, token_text: TokenTexts, offset: int
) -> dict[str, Any]:
    """The legacy format: tokens, their logprobs, the top ones, offsets into the text."""
    tokens = [token_text(t) for t in token_ids]
    offsets = []
    for token in tokens:
        offsets.append(offset)
        offset += len(token)
    return {
        "tokens": tokens,
        "token_logprobs": [_logprob(chosen) for chosen, _ in logprobs],
        "top_logprobs": [
            {token_text(t): _logprob(v) for t, v in top.items()} for _, top in logprobs
        ],
        "text_offset": offsets,
    }


def completion_choice(
    choice: Choice, token_text: TokenTexts, return_token_ids: bool, prefix: str = ""
) -> dict[str, Any]:
    body = {
        "index": choice.index,
        "text": prefix + choice.text,
        "logprobs": None,
        "finish_reason": choice.finish_reason,
    }
    if choice.logprobs is not None:
        body["logprobs"] = completion_logprobs(
            choice.token_ids, choice.logprobs, token_text, len(prefix)
        )
    if return_token_ids:
        body["token_ids"] = choice.token_ids
    return body


# ---------------------------------------------------------------------- chat
def chat_logprobs(token_ids: list[int], logprobs: list, token_text: TokenTexts) -> dict:
    def entry(token_id: int, value: float) -> dict[str, Any]:
        text = token_text(token_id)
        return {"token": text, "logprob": _logprob(value), "bytes": list(text.encode())}

    content = []
    for token_id, (chosen, top) in zip(token_ids, logprobs):
        item = entry(token_id, chosen)
        item["top_logprobs"] = [entry(t, v) for t, v in top.items()]
        content.append(item)
    return {"content": content, "refusal": None}


def chat_choice(choice: Choice, token_text: TokenTexts, return_token_ids: bool) -> dict:
    body = {
        "index": choice.index,
        "message": {"role": "assistant", "content": choice.text},
        "logprobs": None,
        "finish_reason": choice.finish_reason,
    }
    if choice.logprobs is not None:
        body["logprobs"] = chat_logprobs(choice.token_ids, choice.logprobs, token_text)
    if return_token_ids:
        body["token_ids"] = choice.token_ids
    return body
