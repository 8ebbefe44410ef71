"""Completions and chat completions: request -> prompt ids + SamplingParams -> response or SSE."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import Request as HTTPRequest
from fastapi.responses import JSONResponse, Response, StreamingResponse

from duoserve.engine.llm_engine import LLMEngine, RequestError
from duoserve.engine.request import RequestOutput
from duoserve.layers.sampler import SamplingParams
from duoserve.server.bridge import EngineBridge, RequestStream
from duoserve.server.protocol import (
    MAX_CHARS_PER_PROMPT_TOKEN,
    APIError,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessageOut,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    SamplingRequest,
    Usage,
)
from duoserve.tokenizer import TokenizerError

CLIENT_CLOSED_REQUEST = 499  # nginx's status for a client that went away; never seen by it


def sse(payload: str) -> str:
    """One server-sent event carrying `payload`."""
    return f"data: {payload}\n\n"


class TextDeltas:
    """Splits a growing text into stream deltas that never need to be taken back.

    Held back until more text arrives: a trailing U+FFFD (an incomplete UTF-8 sequence) and
    a tail that could be the start of a stop string (the engine cuts stop strings out).
    """

    def __init__(self, stop: list[str]) -> None:
        self.stop = stop
        self.num_sent_chars = 0

    def next(self, text: str, is_finished: bool) -> str:
        end = len(text) if is_finished else self._safe_end(text)
        if end <= self.num_sent_chars:
            return ""
        delta = text[self.num_sent_chars : end]
        self.num_sent_chars = end
        return delta

    def _safe_end(self, text: str) -> int:
        end = len(text)
        while end > self.num_sent_chars and text[end - 1] == "\ufffd":
            end -= 1
        hold = 0
        for stop in self.stop:
            for k in range(min(len(stop) - 1, end), hold, -1):
                if text[end - k : end] == stop[:k]:
                    hold = k
                    break
        return end - hold


class _SSEResponse(StreamingResponse):
    """A text/event-stream response that calls `on_close` however the stream ends."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None]) -> None:
        super().__init__(content, media_type="text/event-stream")
        self.headers["Cache-Control"] = "no-cache"
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()  # a disconnect cancels the stream: abort the request


async def _wait_disconnect(raw: HTTPRequest) -> None:
    while (await raw.receive())["type"] != "http.disconnect":
        pass


class OpenAIServing:
    """Serves /v1/completions and /v1/chat/completions on top of an EngineBridge."""

    def __init__(self, engine: LLMEngine, bridge: EngineBridge, model_name: str) -> None:
        self.engine = engine
        self.bridge = bridge
        self.model_name = model_name
        self.max_prompt_chars = MAX_CHARS_PER_PROMPT_TOKEN * engine.max_model_len
        self.defaults = _generation_defaults(engine.tokenizer.generation_config)

    # ------------------------------------------------------------------ endpoints

    async def completion(self, req: CompletionRequest, raw: HTTPRequest) -> Response:
        """POST /v1/completions."""
        self._check_model(req.model)
        if isinstance(req.prompt, str):
            self._check_chars(len(req.prompt), "prompt")
            prompt_ids = await asyncio.to_thread(self.engine.tokenizer.encode, req.prompt)
        else:
            prompt_ids = list(req.prompt)
        params = self._sampling_params(req, req.max_tokens, len(prompt_ids))
        return await self._serve(raw, prompt_ids, params, req, _CompletionRender(self.model_name))

    async def chat(self, req: ChatCompletionRequest, raw: HTTPRequest) -> Response:
        """POST /v1/chat/completions."""
        self._check_model(req.model)
        try:
            messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        except ValueError as exc:
            raise APIError(400, str(exc), param="messages") from exc
        self._check_chars(sum(len(m["content"]) for m in messages), "messages")
        prompt_ids = await asyncio.to_thread(self._encode_chat, messages, req.add_generation_prompt)
        params = self._sampling_params(req, req.max_output_tokens, len(prompt_ids))
        return await self._serve(raw, prompt_ids, params, req, _ChatRender(self.model_name))

    # ------------------------------------------------------------------ request -> engine

    def _check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise APIError(404, f"The model `{name}` does not exist.", "model", "model_not_found")

    def _check_chars(self, num_chars: int, param: str) -> None:
        if num_chars > self.max_prompt_chars:
            raise APIError(
                400,
                f"the prompt has {num_chars} characters; at most {self.max_prompt_chars} "
                f"({MAX_CHARS_PER_PROMPT_TOKEN} per token of the {self.engine.max_model_len}-token"
                " context) are accepted",
                param,
            )

    def _encode_chat(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool
    ) -> list[int]:
        tokenizer = self.engine.tokenizer
        try:
            if add_generation_prompt:
                return tokenizer.encode_chat(messages)
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=False)
            return tokenizer.encode(text, add_special_tokens=False)
        except TokenizerError as exc:
            raise APIError(400, str(exc), "messages") from exc

    def _sampling_params(
        self, req: SamplingRequest, max_tokens: int | None, num_prompt_tokens: int
    ) -> SamplingParams:
        """Request fields (else the model's generation_config, else OpenAI's defaults)."""
        pick = lambda value, key, default: (  # noqa: E731
            value if value is not None else self.defaults.get(key, default)
        )
        vocab = self.engine.model_config.vocab_size
        bad_ids = [t for t in req.stop_token_ids or [] if t >= vocab]
        if bad_ids:
            raise APIError(
                400, f"stop_token_ids must be < {vocab}; got {bad_ids[:5]}", "stop_token_ids"
            )
        if max_tokens is None:
            max_tokens = max(self.engine.max_model_len - num_prompt_tokens, 1)
        top_k = pick(req.top_k, "top_k", 0)
        try:
            params = SamplingParams(
                temperature=pick(req.temperature, "temperature", 1.0),
                top_p=pick(req.top_p, "top_p", 1.0),
                top_k=0 if top_k == -1 else top_k,
                min_p=pick(req.min_p, "min_p", 0.0),
                max_tokens=max_tokens,
                seed=req.seed,
                stop=tuple(req.stop_list),
                stop_token_ids=tuple(req.stop_token_ids or ()),
                ignore_eos=req.ignore_eos,
            )
        except ValueError as exc:
            raise APIError(400, str(exc)) from exc
        return params

    async def _serve(
        self,
        raw: HTTPRequest,
        prompt_ids: list[int],
        params: SamplingParams,
        req: SamplingRequest,
        render: _Render,
    ) -> Response:
        try:
            self.engine.validate_prompt(prompt_ids, params)  # reads only immutable limits
        except RequestError as exc:
            code = "context_length_exceeded" if "maximum context length" in str(exc) else None
            raise APIError(400, str(exc), "prompt", code) from exc
        stream = self.bridge.submit(prompt_ids, params, render.id_prefix)
        if req.stream:
            events = self._events(stream, render, len(prompt_ids), params, req.include_usage)
            return _SSEResponse(events, on_close=lambda: self.bridge.release(stream))
        try:
            final = await self._wait_final(stream, raw)
        finally:
            self.bridge.release(stream)
        if final is None:
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        return JSONResponse(render.full(stream.request_id, final, len(prompt_ids)))

    async def _wait_final(self, stream: RequestStream, raw: HTTPRequest) -> RequestOutput | None:
        """The finished output, or None if the client disconnected first."""

        async def last_output() -> RequestOutput:
            final = None
            async for out in stream:
                final = out
            assert final is not None and final.finished, "a stream ends with its final output"
            return final

        result = asyncio.ensure_future(last_output())
        disconnect = asyncio.ensure_future(_wait_disconnect(raw))
        try:
            await asyncio.wait({result, disconnect}, return_when=asyncio.FIRST_COMPLETED)
            return result.result() if result.done() else None
        finally:
            result.cancel()
            disconnect.cancel()

    async def _events(
        self,
        stream: RequestStream,
        render: _Render,
        num_prompt_tokens: int,
        params: SamplingParams,
        include_usage: bool,
    ) -> AsyncIterator[str]:
        deltas = TextDeltas(list(params.stop))
        final = None
        try:
            async for out in stream:
                delta = deltas.next(out.text, out.finished)
                # As vLLM: a chunk for every output with new tokens, even when its text is
                # held back (or decodes to nothing), so clients time each token.
                if delta or out.finished or out.new_token_ids:
                    yield sse(render.chunk(stream.request_id, delta, out))
                final = out
        except APIError as exc:
            yield sse(ErrorResponse.of(exc).model_dump_json())
        if include_usage and final is not None:
            usage = Usage.of(num_prompt_tokens, len(final.output_token_ids))
            yield sse(render.usage_chunk(stream.request_id, usage))
        yield "data: [DONE]\n\n"


def _generation_defaults(gen_cfg: dict[str, Any]) -> dict[str, float]:
    """Sampling defaults from generation_config.json, kept only when well-formed."""
    ranges = {
        "temperature": (0.0, 2.0),
        "top_p": (1e-9, 1.0),
        "top_k": (-1, 1 << 20),
        "min_p": (0, 1),
    }
    defaults = {}
    for key, (lo, hi) in ranges.items():
        value = gen_cfg.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and lo <= value <= hi:
            defaults[key] = int(value) if key == "top_k" else float(value)
    if gen_cfg.get("do_sample") is False:
        defaults["temperature"] = 0.0  # transformers' convention: greedy unless do_sample
    return defaults


class _Render:
    id_prefix = ""

    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self.is_first_chunk = True

    def chunk(self, request_id: str, delta: str, out: RequestOutput) -> str:
        raise NotImplementedError

    def usage_chunk(self, request_id: str, usage: Usage) -> str:
        raise NotImplementedError

    def full(self, request_id: str, out: RequestOutput, num_prompt_tokens: int) -> dict[str, Any]:
        raise NotImplementedError


def _finish(out: RequestOutput) -> tuple[str | None, str | int | None]:
    return (out.finish_reason, out.stop_reason) if out.finished else (None, None)


class _CompletionRender(_Render):
    id_prefix = "cmpl"

    def chunk(self, request_id: str, delta: str, out: RequestOutput) -> str:
        reason, stop_reason = _finish(out)
        choice = CompletionChoice(text=delta, finish_reason=reason, stop_reason=stop_reason)
        return CompletionResponse(
            id=request_id, model=self.model_name, choices=[choice]
        ).model_dump_json()

    def usage_chunk(self, request_id: str, usage: Usage) -> str:
        return CompletionResponse(
            id=request_id, model=self.model_name, choices=[], usage=usage
        ).model_dump_json()

    def full(self, request_id: str, out: RequestOutput, num_prompt_tokens: int) -> dict[str, Any]:
        choice = CompletionChoice(
            text=out.text, finish_reason=out.finish_reason, stop_reason=out.stop_reason
        )
        usage = Usage.of(num_prompt_tokens, len(out.output_token_ids))
        response = CompletionResponse(
            id=request_id, model=self.model_name, choices=[choice], usage=usage
        )
        return response.model_dump(mode="json")


class _ChatRender(_Render):
    id_prefix = "chatcmpl"

    def chunk(self, request_id: str, delta: str, out: RequestOutput) -> str:
        reason, stop_reason = _finish(out)
        message = ChatMessageOut(role="assistant" if self.is_first_chunk else None, content=delta)
        self.is_first_chunk = False
        choice = ChatChunkChoice(delta=message, finish_reason=reason, stop_reason=stop_reason)
        return ChatCompletionChunk(id=request_id, model=self.model_name, choices=[choice]).to_json()

    def usage_chunk(self, request_id: str, usage: Usage) -> str:
        chunk = ChatCompletionChunk(id=request_id, model=self.model_name, choices=[], usage=usage)
        return chunk.to_json()

    def full(self, request_id: str, out: RequestOutput, num_prompt_tokens: int) -> dict[str, Any]:
        message = ChatMessageOut(role="assistant", content=out.text)
        choice = ChatChoice(
            message=message, finish_reason=out.finish_reason, stop_reason=out.stop_reason
        )
        usage = Usage.of(num_prompt_tokens, len(out.output_token_ids))
        response = ChatCompletionResponse(
            id=request_id, model=self.model_name, choices=[choice], usage=usage
        )
        return response.model_dump(mode="json")
