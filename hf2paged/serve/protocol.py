"""OpenAI request bodies (pydantic) and their translation into the engine's parameters.

Field names, defaults and ranges are OpenAI's; `top_k`, `min_p`, `repetition_penalty`,
`stop_token_ids`, `ignore_eos` and `return_token_ids` are vLLM's extensions, with vLLM's
meanings. Types are strict (no "0.5" for a float, no `true` for an int), NaN and
infinities are refused, and unknown fields are ignored, as OpenAI's own API does.
Anything wrong becomes an `APIError` (400 with OpenAI's error JSON) before the engine
sees the request.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from runtime.engine import SamplingParams

# OpenAI's limits: n <= 128 samples, completions' logprobs <= 5 (vLLM allows 20, as we
# do), chat's top_logprobs <= 20.
MAX_N = 128
MAX_LOGPROBS = 20
DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions

Float = Annotated[float, Field(allow_inf_nan=False)]


class APIError(Exception):
    """An error answered in OpenAI's JSON: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    include_usage: bool = False


class SamplingFields(BaseModel):
    """The fields both endpoints share."""

    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)

    model: str | None = None
    n: Annotated[int, Field(ge=1, le=MAX_N)] = 1
    temperature: Annotated[Float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[Float, Field(gt=0, le=1)] | None = None
    top_k: Annotated[int, Field(ge=-1)] | None = None
    min_p: Annotated[Float, Field(ge=0, le=1)] | None = None
    presence_penalty: Annotated[Float, Field(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[Float, Field(ge=-2, le=2)] | None = None
    repetition_penalty: Annotated[Float, Field(gt=0)] | None = None
    seed: Annotated[int, Field(ge=-(2**63), lt=2**64)] | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[Annotated[int, Field(ge=0)]] | None = None
    ignore_eos: bool = False
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # vLLM's extension: the prompt's and each choice's token ids in the response.
    return_token_ids: bool = False

    def sampling_params(self, max_tokens: int, logprobs: int | None) -> SamplingParams:
        top_k = self.top_k
        if top_k == 0:  # vLLM's other spelling of "off"
            top_k = -1
        values = dict(
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=top_k,
            min_p=self.min_p,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty,
            seed=self.seed,
            stop=self.stop,
            stop_token_ids=self.stop_token_ids,
            ignore_eos=self.ignore_eos,
            max_tokens=max_tokens,
            logprobs=logprobs,
        )
        try:
            return SamplingParams(**{k: v for k, v in values.items() if v is not None})
        except ValueError as err:
            raise APIError(400, str(err)) from None

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(SamplingFields):
    """POST /v1/completions."""

    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None
    logit_bias: dict[str, Float] | None = None

    def prompts(self) -> list[str | list[int]]:
        """The request's prompts: one text, several, one list of token ids, or several."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if not prompt:
            raise APIError(400, "prompt is empty: give a string, a list of strings or token ids")
        if all(isinstance(p, int) for p in prompt):
            return [prompt]
        return list(prompt)

    def check_unsupported(self) -> None:
        if self.best_of is not None and self.best_of != self.n:
            raise APIError(400, "best_of is not supported (use n)", param="best_of")
        if self.suffix:
            raise APIError(400, "suffix (insertion) is not supported", param="suffix")
        if self.logit_bias:
            raise APIError(400, "logit_bias is not supported", param="logit_bias")
        if self.echo and self.logprobs is not None:
            raise APIError(
                400, "echo with logprobs needs prompt log-probabilities, which the engine "
                "does not compute; use one or the other", param="echo",
            )  # fmt: skip


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")
    role: str
    content: str | list[TextPart] | None = None

    def as_template_input(self) -> dict[str, Any]:
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        extra = self.model_extra or {}
        return {**extra, "role": self.role, "content": content or ""}


class ChatCompletionRequest(SamplingFields):
    """POST /v1/chat/completions."""

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    tools: list[Any] | None = None
    response_format: dict[str, Any] | None = None
    logit_bias: dict[str, Float] | None = None

    def engine_logprobs(self) -> int | None:
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None

    def check_unsupported(self) -> None:
        if self.tools:
            raise APIError(400, "tools (function calling) are not supported", param="tools")
        if self.response_format and self.response_format.get("type") not in (None, "text"):
            raise APIError(
                400, "response_format other than text is not supported", param="response_format"
            )
        if self.logit_bias:
            raise APIError(400, "logit_bias is not supported", param="logit_bias")
