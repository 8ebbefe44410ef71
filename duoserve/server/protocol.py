"""The OpenAI-compatible wire protocol: request and response models, limits, the error envelope.

Requests ignore unknown fields (OpenAI clients send many) but every field we read is
bounded here, before the server tokenizes or allocates anything for it. Fields we know and
do not support (n > 1, logprobs, penalties, tools...) get a 400 rather than being ignored,
since ignoring them would silently change what the client asked for.
"""

from __future__ import annotations

import json
import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from duoserve.layers.sampler import MAX_STOP_STRING_CHARS, MAX_STOP_STRINGS

MAX_TOKENS_CAP = 1 << 20  # static bound; the context length check is the real one
MAX_STOP_TOKEN_IDS = 64
MAX_MESSAGES = 1024
MAX_CHARS_PER_PROMPT_TOKEN = 32  # prompt text longer than this x max_model_len is refused
MAX_REQUEST_BYTES = 16 << 20

StopString = Annotated[str, StringConstraints(min_length=1, max_length=MAX_STOP_STRING_CHARS)]
TokenId = Annotated[int, Field(ge=0, lt=1 << 31)]


class APIError(Exception):
    """An error answered with the OpenAI envelope and an HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    @property
    def type(self) -> str:
        return ERROR_TYPES.get(self.status, "internal_error")


ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    413: "invalid_request_error",
    500: "internal_error",
    503: "service_unavailable_error",
}


class ErrorInfo(BaseModel):
    """The inner object of the OpenAI error envelope."""

    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """`{"error": {"message", "type", "param", "code"}}`."""

    error: ErrorInfo

    @classmethod
    def of(cls, exc: APIError) -> ErrorResponse:
        return cls(
            error=ErrorInfo(message=exc.message, type=exc.type, param=exc.param, code=exc.code)
        )


# ----------------------------------------------------------------------------- requests


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Lenient):
    """`stream_options`: only include_usage is read."""

    include_usage: bool = False


class SamplingRequest(_Lenient):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model: str | None = None
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1, le=1 << 20)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    seed: int | None = Field(None, ge=-(1 << 63), lt=1 << 63)
    stop: StopString | Annotated[list[StopString], Field(max_length=MAX_STOP_STRINGS)] | None = None
    stop_token_ids: Annotated[list[TokenId], Field(max_length=MAX_STOP_TOKEN_IDS)] | None = None
    ignore_eos: bool = False
    n: int | None = 1
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = 0.0
    frequency_penalty: float | None = 0.0
    logit_bias: dict[str, float] | None = None

    @model_validator(mode="after")
    def _refuse_unsupported(self) -> SamplingRequest:
        if self.n is not None and self.n != 1:
            raise ValueError("n: only n=1 is supported; send separate requests for more choices")
        if self.presence_penalty or self.frequency_penalty:
            raise ValueError("presence_penalty and frequency_penalty are not supported")
        if self.logit_bias:
            raise ValueError("logit_bias is not supported")
        return self

    @property
    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


PromptText = Annotated[str, StringConstraints(min_length=1)]
PromptIds = Annotated[list[TokenId], Field(min_length=1)]


class CompletionRequest(SamplingRequest):
    """POST /v1/completions (one prompt: a string or a list of token ids)."""

    prompt: PromptText | PromptIds | Annotated[list[PromptText | PromptIds], Field(min_length=1)]
    max_tokens: int | None = Field(16, ge=1, le=MAX_TOKENS_CAP)
    echo: bool | None = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None

    @model_validator(mode="after")
    def _refuse_unsupported_completion(self) -> CompletionRequest:
        if self.echo:
            raise ValueError("echo is not supported")
        if self.logprobs:
            raise ValueError("logprobs is not supported")
        if self.best_of is not None and self.best_of != 1:
            raise ValueError("best_of is not supported")
        if self.suffix:
            raise ValueError("suffix is not supported")
        is_batch = (
            isinstance(self.prompt, list)
            and self.prompt
            and isinstance(self.prompt[0], (str, list))
        )
        if is_batch and len(self.prompt) > 1:
            raise ValueError("prompt: one prompt per request is supported; send separate requests")
        if is_batch:
            self.prompt = self.prompt[0]
        return self


class ContentPart(_Lenient):
    """One part of a message's content; only text parts are supported."""

    type: str
    text: str | None = None


class ChatMessage(_Lenient):
    """One chat message (extra keys such as `name` are ignored)."""

    role: Annotated[str, StringConstraints(min_length=1, max_length=64)]
    content: str | Annotated[list[ContentPart], Field(max_length=MAX_MESSAGES)] | None = None

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        for part in self.content:
            if part.type != "text":
                raise ValueError(f"content part type '{part.type}' is not supported (text only)")
        return "".join(part.text or "" for part in self.content)


class ChatCompletionRequest(SamplingRequest):
    """POST /v1/chat/completions."""

    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=MAX_MESSAGES)]
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_CAP)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_CAP)
    logprobs: bool | None = False
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    response_format: dict[str, Any] | None = None
    add_generation_prompt: bool = True

    @model_validator(mode="after")
    def _refuse_unsupported_chat(self) -> ChatCompletionRequest:
        if self.logprobs or self.top_logprobs:
            raise ValueError("logprobs is not supported")
        if self.tools:
            raise ValueError("tools are not supported")
        if self.response_format and self.response_format.get("type", "text") != "text":
            raise ValueError("response_format other than text is not supported")
        return self

    @property
    def max_output_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


# ----------------------------------------------------------------------------- responses


class Usage(BaseModel):
    """Token counts of one request."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, num_prompt: int, num_completion: int) -> Usage:
        return cls(
            prompt_tokens=num_prompt,
            completion_tokens=num_completion,
            total_tokens=num_prompt + num_completion,
        )


class CompletionChoice(BaseModel):
    """A completion choice, or its delta in a stream chunk."""

    index: int = 0
    text: str
    logprobs: None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None


class CompletionResponse(BaseModel):
    """A completion, or one stream chunk (then choices hold deltas)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ChatMessageOut(BaseModel):
    """The assistant's message, or a delta of it (role only in a stream's first chunk)."""

    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChoice(BaseModel):
    """One choice of a chat completion."""

    index: int = 0
    message: ChatMessageOut
    logprobs: None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None


class ChatChunkChoice(BaseModel):
    """One choice of a chat stream chunk."""

    index: int = 0
    delta: ChatMessageOut
    logprobs: None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None


class ChatCompletionResponse(BaseModel):
    """A chat completion."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None


class ChatCompletionChunk(BaseModel):
    """One chunk of a streamed chat completion (the usage chunk has no choices)."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None

    def to_json(self) -> str:
        """JSON with `role` left out of deltas that do not carry it, as OpenAI sends them."""
        data = self.model_dump()
        for choice in data["choices"]:
            if choice["delta"]["role"] is None:
                del choice["delta"]["role"]
        return json.dumps(data, ensure_ascii=False, separators=(",", ":"))


class ModelCard(BaseModel):
    """One entry of /v1/models."""

    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "duoserve"
    root: str
    max_model_len: int
    vocab_size: int
    routing: str  # "the model's own router", or which trace replay forces it


class ModelList(BaseModel):
    """GET /v1/models."""

    object: Literal["list"] = "list"
    data: list[ModelCard]
