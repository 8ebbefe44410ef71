"""The FastAPI application: routes, API-key check, body limit and the OpenAI error envelope."""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, Gauge
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from duoserve import __version__
from duoserve.engine.llm_engine import LLMEngine
from duoserve.engine.scheduler import SloTargets
from duoserve.server.bridge import EngineBridge
from duoserve.server.config import ServerConfig
from duoserve.server.metrics import ServerMetrics
from duoserve.server.protocol import (
    MAX_REQUEST_BYTES,
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    ErrorResponse,
    ModelCard,
    ModelList,
)
from duoserve.server.serving import OpenAIServing

if TYPE_CHECKING:
    from duoserve.bench.replay import TraceReplay

logger = logging.getLogger("duoserve.server")
ROUTING_HEADER = "x-duoserve-routing"
OWN_ROUTING = "model"  # the header's value when the model's own router decides


def error_response(exc: APIError) -> JSONResponse:
    """The OpenAI error envelope with the error's HTTP status."""
    return JSONResponse(ErrorResponse.of(exc).model_dump(), status_code=exc.status)


class BodyLimit:
    """Refuse request bodies over `max_bytes` (413), declared or streamed."""

    def __init__(self, app: ASGIApp, max_bytes: int = MAX_REQUEST_BYTES) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"0")
        if not declared.isdigit() or int(declared) > self.max_bytes:
            message = f"request body over {self.max_bytes} bytes or unreadable Content-Length"
            return await error_response(APIError(413, message))(scope, receive, send)
        num_bytes = 0

        async def limited_receive():
            nonlocal num_bytes
            message = await receive()
            num_bytes += len(message.get("body", b""))
            if num_bytes > self.max_bytes:  # HTTPException passes FastAPI's body parsing as is
                raise HTTPException(413, f"request body over {self.max_bytes} bytes")
            return message

        await self.app(scope, limited_receive, send)


class ApiKeyGuard:
    """Require `Authorization: Bearer KEY` on /v1/* (checked before the body is read)."""

    def __init__(self, app: ASGIApp, api_key: str | None) -> None:
        self.app = app
        self.expected = api_key.encode() if api_key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.expected is not None and scope["type"] == "http":
            path = scope.get("path", "")
            if path == "/v1" or path.startswith("/v1/"):
                error = self._check(dict(scope["headers"]).get(b"authorization", b""))
                if error is not None:
                    return await error_response(error)(scope, receive, send)
        await self.app(scope, receive, send)

    def _check(self, header: bytes) -> APIError | None:
        assert self.expected is not None
        scheme, _, token = header.partition(b" ")
        if scheme.lower() != b"bearer" or not token.strip():
            return APIError(
                401, "missing API key: send 'Authorization: Bearer <key>'", None, "invalid_api_key"
            )
        if not hmac.compare_digest(token.strip(), self.expected):
            return APIError(401, "invalid API key", None, "invalid_api_key")
        return None


class RoutingHeader:
    """Stamp every HTTP response with where the expert routing came from.

    `x-duoserve-routing: model` (the model's own router) or `replayed FILE` (a recorded trace
    forced the routing: outputs are then not the model's own, see bench/replay.py).
    """

    def __init__(self, app: ASGIApp, value: str) -> None:
        self.app = app
        self.header = (ROUTING_HEADER.encode(), value.encode("latin-1", "replace"))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_stamped(message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), self.header]}
            await send(message)

        await self.app(scope, receive, send_stamped)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    parts, first_param = [], None
    for err in exc.errors()[:5]:
        if err.get("type") == "json_invalid":
            return f"malformed JSON body: {err.get('ctx', {}).get('error', 'cannot parse')}", None
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        param = ".".join(loc) or None
        first_param = first_param or param
        msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
        parts.append(f"{param}: {msg}" if param else msg)
    return "; ".join(parts) or "invalid request", first_param


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return error_response(APIError(400, message, param))

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:
        return error_response(APIError(exc.status_code, str(exc.detail)))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s", request.url.path)
        return error_response(APIError(500, "internal server error"))


def build_app(
    engine: LLMEngine,
    config: ServerConfig,
    model_name: str | None = None,
    replay: TraceReplay | None = None,
) -> FastAPI:
    """The server app over a loaded engine; the engine thread runs while the app is up.

    `replay`: the trace replay already attached to `engine` (None: the model routes itself);
    every response then says so (header, /version, /v1/models).
    """
    ms = lambda value: None if value is None else value / 1e3  # noqa: E731
    slo = SloTargets(ttft_s=ms(config.ttft_slo_ms), tpot_s=ms(config.tpot_slo_ms))
    if slo.ttft_s is not None or slo.tpot_s is not None:
        engine.scheduler.slo = slo
    metrics = ServerMetrics(slo.ttft_s, slo.tpot_s, config.log_interval)
    bridge = EngineBridge(engine, metrics, config.max_waiting)
    name = config.served_model_name or model_name or engine.model_name
    serving = OpenAIServing(engine, bridge, name)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        bridge.start()
        try:
            yield
        finally:
            await asyncio.to_thread(bridge.stop)

    app = FastAPI(
        title="duoserve",
        version=__version__,
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.bridge, app.state.metrics, app.state.serving = bridge, metrics, serving
    routing = replay.describe() if replay is not None else "the model's own router"
    app.state.routing = routing
    if replay is not None:
        logger.warning("routing is forced: %s (outputs are not the model's own)", routing)
    app.add_middleware(BodyLimit)
    app.add_middleware(ApiKeyGuard, api_key=config.api_key)
    header = f"replayed {replay.path.name}" if replay is not None else OWN_ROUTING
    app.add_middleware(RoutingHeader, value=header)  # added last: runs first, stamps all
    help_text = "1, labelled with the routing source (model, or replayed FILE)"
    source = Gauge("duoserve:routing_info", help_text, ["source"], registry=metrics.registry)
    source.labels(source=header).set(1)
    _install_error_handlers(app)

    _add_routes(app, engine, bridge, serving, name, routing)
    return app


def _add_routes(
    app: FastAPI,
    engine: LLMEngine,
    bridge: EngineBridge,
    serving: OpenAIServing,
    name: str,
    routing: str,
) -> None:
    metrics = bridge.metrics

    @app.get("/health")
    async def health() -> Response:
        if bridge.is_draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        if not bridge.is_alive:
            return JSONResponse({"status": "engine not running"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": __version__, "routing": routing}

    v1 = APIRouter(prefix="/v1")

    @v1.get("/models")
    async def models() -> ModelList:
        card = ModelCard(
            id=name,
            root=engine.model_name,
            max_model_len=engine.max_model_len,
            vocab_size=engine.model_config.vocab_size,
            routing=routing,
        )
        return ModelList(data=[card])

    @v1.post("/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await serving.completion(body, request)

    @v1.post("/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await serving.chat(body, request)

    app.include_router(v1)
