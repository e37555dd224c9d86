"""HTTP routes only: parse, call `Serving`, return JSON or an event stream. Errors in OpenAI's shape.

Every request passes, outermost first: counting (by route template) -> Host check (against DNS rebinding)
-> CORS (a preflight is answered here, before the key is asked for) -> the API key -> the routes.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import json
import logging
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from glmkit.engine import Engine
from glmkit.engine.async_engine import AsyncEngine
from glmkit.engine.prefix_cache import DEFAULT_PREFIX_CACHE_MB
from glmkit.engine.protocol import EngineClient
from glmkit.engine.scheduler import DEFAULT_STEP_TOKENS
from glmkit.models.glm import GLM
from glmkit.serve.embeddings import EmbeddingRequest, EmbeddingResponse, Embeddings
from glmkit.serve.metrics import CONTENT_TYPE, UNMATCHED
from glmkit.serve.openai import APIError, Serving
from glmkit.serve.protocol import ChatCompletionRequest, CompletionRequest, ErrorResponse, LegacyRequest
from glmkit.text.chat_format import ChatFormat
from glmkit.text.formats import chat_format_for
from glmkit.text.protocol import Tokenizer

PAGE = Path(__file__).parent / "static" / "index.html"
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
# Answered without the API key: the page (it asks for the key itself), its icon, and the liveness check.
OPEN_PATHS = ("/", "/favicon.ico", "/health")
# What the OpenAPI schema says each POST route may answer besides 200.
ERRORS = {
    400: "a malformed or invalid request (the message names the field)",
    401: "a missing or wrong API key",
    404: "an unknown model",
    415: "a body that is not sent as application/json",
    429: "the queue is full: retry after Retry-After seconds",
    500: "generation failed on the server",
}
log = logging.getLogger("glmkit.serve")


def create_app(model: GLM, tokenizer: Tokenizer, model_name: str, *, api_key: str | None = None,
               max_batch: int = 8, max_queue: int = 64, cors_origins: list[str] | None = None,
               allowed_hosts: list[str] | None = None, metrics_public: bool = False,
               prefix_cache_mb: float = DEFAULT_PREFIX_CACHE_MB, kv_cache_mb: float | None = None,
               step_tokens: int = DEFAULT_STEP_TOKENS, kv_dtype: str | None = None) -> FastAPI:
    """The app over a new batching engine for `model` (the engine's settings: glmkit.engine.Engine)."""
    engine = start_engine(model, max_batch, max_queue, prefix_cache_mb, kv_cache_mb, step_tokens, kv_dtype)
    return build_app(engine, tokenizer, chat_format_for(tokenizer), model_name,
                     model.config.max_sequence_length, api_key=api_key, cors_origins=cors_origins,
                     allowed_hosts=allowed_hosts, metrics_public=metrics_public,
                     embedding_size=model.config.hidden_size)


def start_engine(model: GLM, max_batch: int, max_queue: int, prefix_cache_mb: float = DEFAULT_PREFIX_CACHE_MB,
                 kv_cache_mb: float | None = None, step_tokens: int = DEFAULT_STEP_TOKENS,
                 kv_dtype: str | None = None) -> EngineClient:
    """The one place the server builds its concrete engine: continuous batching on a thread of its own."""
    return AsyncEngine(Engine(model, max_batch=max_batch, max_queue=max_queue, prefix_cache_mb=prefix_cache_mb,
                              kv_cache_mb=kv_cache_mb, step_tokens=step_tokens, kv_dtype=kv_dtype))


def default_allowed_hosts(bind_host: str, given: list[str] | None) -> list[str] | None:
    """The Host headers to accept: those given (--allowed-host; '*' accepts any), else, for a loopback bind,
    only localhost's names, so a web page on another name that resolves to 127.0.0.1 (DNS rebinding)
    cannot reach the API. None: no check (a public bind, where the clients' names are not known)."""
    if given:
        return None if "*" in given else given
    if bind_host == "localhost":
        return list(LOOPBACK_NAMES)
    try:
        return list(LOOPBACK_NAMES) if ipaddress.ip_address(bind_host).is_loopback else None
    except ValueError:
        return None


def build_app(engine: EngineClient, tokenizer: Tokenizer, chat_format: ChatFormat, model_name: str, context: int, *,
              api_key: str | None = None, cors_origins: list[str] | None = None,
              allowed_hosts: list[str] | None = None, metrics_public: bool = False,
              embedding_size: int | None = None) -> FastAPI:
    """The routes over any engine client; `context` is the model's max_sequence_length.

    /metrics needs the API key when there is one (its counts tell who uses the server how much) unless
    metrics_public; allowed_hosts None accepts any Host header. /v1/embeddings is served when embedding_size
    (the model's hidden size) is given: an engine client that embeds nothing is built without it."""
    serving = Serving(engine, tokenizer, chat_format, model_name, context)
    app = FastAPI(title="glmkit", description="OpenAI-compatible and ChatGLM APIs for GLM models")
    app.state.serving = serving
    open_paths = (*OPEN_PATHS, "/metrics") if metrics_public else OPEN_PATHS
    # add_middleware wraps what is there, so the last added runs first.
    app.add_middleware(APIKeyMiddleware, api_key=api_key, open_paths=open_paths)
    if cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=cors_origins, allow_methods=["*"], allow_headers=["*"])
    if allowed_hosts:
        app.add_middleware(HostMiddleware, allowed=allowed_hosts)
    app.add_middleware(CountingMiddleware, app_routes=app.router.routes, count=serving.metrics.count)

    @app.exception_handler(APIError)
    async def api_error(_: Request, e: APIError):
        return error_response(e)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, e: RequestValidationError):
        content_type = request.headers.get("content-type", "")
        if content_type and not _is_json(content_type):
            return error_response(APIError(415, f"the body must be JSON sent with 'Content-Type: application/json', "
                                                f"not {content_type!r}", code="unsupported_media_type"))
        first = e.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        if first.get("type") == "json_invalid":
            return error_response(APIError(400, "the body is not valid JSON"))
        message = first["msg"].removeprefix("Value error, ")
        return error_response(APIError(400, f"{where}: {message}" if where else message, param=where or None))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, e: StarletteHTTPException):
        message, code = str(e.detail), {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        if e.status_code == 400 and isinstance(e.__cause__, UnicodeDecodeError):
            message = "the body is not valid UTF-8 (JSON must be UTF-8 encoded)"
        elif e.status_code == 400 and isinstance(e.__cause__, RecursionError):
            message = "the body's JSON is nested too deeply"
        elif e.status_code == 400 and e.__cause__ is not None:
            message = f"the body could not be read as JSON: {e.__cause__}"
        return error_response(APIError(e.status_code, message, code=code), getattr(e, "headers", None))

    @app.exception_handler(ClientGone)
    async def client_gone(_: Request, e: ClientGone):
        return Response(status_code=499)  # nobody reads it; nginx's code for "client closed the request"

    @app.exception_handler(Exception)
    async def server_error(_: Request, e: Exception):
        log.exception("request failed: %s", e)
        return error_response(APIError(500, "the server failed to answer; see its log", code="server_error"))

    errors = {status: {"model": ErrorResponse, "description": text} for status, text in ERRORS.items()}
    event = {"type": "object", "description": "one server-sent event: data is a JSON chunk, '[DONE]' or an error body",
             "properties": {"data": {"type": "string"}, "event": {"type": "string"}}, "required": ["data"]}
    answers = {200: {"content": {"application/json": {}, "text/event-stream": {"schema": event}},
                     "description": "the completion, or with stream: true an event stream of chunks ending in "
                                    "'data: [DONE]' (or in one event with an error body)"}, **errors}

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return PAGE.read_text(encoding="utf-8")

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon():
        return Response(status_code=204)  # no icon, and no 404 in the browser's console

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name}

    @app.get("/v1/models", responses={401: errors[401]})
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "owned_by": "glmkit"}]}

    @app.post("/v1/chat/completions", responses=answers)
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        return respond(await unless_disconnected(request, serving.chat_completion(body)))

    @app.post("/v1/completions", responses=answers)
    async def completions(body: CompletionRequest, request: Request):
        return respond(await unless_disconnected(request, serving.completion(body)))

    if embedding_size is not None:
        embeddings = Embeddings(serving, embedding_size)

        @app.post("/v1/embeddings", responses={200: {"model": EmbeddingResponse, "description": "the embeddings"},
                                               **errors})
        async def create_embeddings(body: EmbeddingRequest, request: Request):
            # A JSONResponse as it is: FastAPI's encoder would walk every float of every vector first.
            return JSONResponse(await unless_disconnected(request, embeddings.create(body)))

    @app.post("/", responses={k: v for k, v in errors.items() if k != 404})
    async def legacy(body: LegacyRequest, request: Request):
        return respond(await unless_disconnected(request, serving.legacy(body)))

    @app.get("/metrics", responses={200: {"content": {CONTENT_TYPE: {"schema": {"type": "string"}}},
                                          "description": "Prometheus metrics"}, 401: errors[401]})
    async def metrics():
        return Response(serving.metrics.text(), media_type=CONTENT_TYPE)

    openapi = app.openapi

    def schema_without_422() -> dict:
        """FastAPI documents a 422 for every body; this server answers those errors with a 400."""
        if app.openapi_schema is None:
            schema = openapi()
            for path in schema.get("paths", {}).values():
                for operation in path.values():
                    operation.get("responses", {}).pop("422", None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = schema_without_422
    return app


class ClientGone(Exception):
    """The client closed the connection before its answer was ready."""


async def unless_disconnected(request: Request, call) -> Any:
    """Await `call` unless the client disconnects first; then cancel it, which aborts its engine requests and
    frees their batch slots (a stream's response notices a disconnect itself; this covers the rest)."""
    work = asyncio.ensure_future(call)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watch = asyncio.ensure_future(disconnected())
    try:
        done, _ = await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:  # this handler itself was cancelled
        done = set()
        raise
    finally:
        for task in (watch, work):
            if task not in done:
                task.cancel()
        await asyncio.gather(*(t for t in (watch, work) if t not in done), return_exceptions=True)
    if work in done:
        return work.result()
    raise ClientGone


def respond(result):
    if isinstance(result, dict):
        return result
    return StreamingResponse(result, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def error_response(e: APIError, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers={**e.headers, **(headers or {})})


def _is_json(content_type: str) -> bool:
    kind = content_type.split(";")[0].strip().lower()
    return kind == "application/json" or (kind.startswith("application/") and kind.endswith("+json"))


async def _send_error(send, e: APIError, extra: list[tuple[bytes, bytes]] = ()) -> None:
    body = json.dumps(e.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *extra]
    await send({"type": "http.response.start", "status": e.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _header(scope, name: bytes) -> bytes | None:
    return next((value for key, value in scope.get("headers", ()) if key.lower() == name), None)


class APIKeyMiddleware:
    """'Authorization: Bearer KEY' (the scheme in any case), compared in constant time."""

    def __init__(self, app, api_key: str | None, open_paths: tuple[str, ...]) -> None:
        self.app, self.open_paths = app, open_paths
        self.digest = hashlib.sha256(api_key.encode()).digest() if api_key else None

    def allowed(self, scope) -> bool:
        if self.digest is None or scope["method"] in ("GET", "HEAD") and scope["path"] in self.open_paths:
            return True
        scheme, _, token = (_header(scope, b"authorization") or b"").strip().partition(b" ")
        # Hashing first makes the comparison's time independent of the key's length as well as its bytes.
        return scheme.lower() == b"bearer" and hmac.compare_digest(hashlib.sha256(token.strip()).digest(),
                                                                   self.digest)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or self.allowed(scope):
            return await self.app(scope, receive, send)
        await _send_error(send, APIError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'",
                                         code="invalid_api_key"), [(b"www-authenticate", b"Bearer")])


class HostMiddleware:
    """Only the allowed Host headers (names, without the port), against DNS rebinding."""

    def __init__(self, app, allowed: list[str]) -> None:
        self.app = app
        self.allowed = {name.strip("[]").lower() for name in allowed}

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        host = (_header(scope, b"host") or b"").decode("latin-1").strip().lower()
        name = host[1:host.find("]")] if host.startswith("[") else host.rpartition(":")[0] or host
        if name.rstrip(".") in self.allowed:
            return await self.app(scope, receive, send)
        await _send_error(send, APIError(400, f"the Host header {host!r} is not allowed here; start the server with "
                                              "--allowed-host NAME to accept it", code="invalid_host"))


class CountingMiddleware:
    """Counts every answer by its route's template (never the raw path) and status."""

    def __init__(self, app, app_routes, count) -> None:
        self.app, self.routes, self.count = app, app_routes, count

    def endpoint(self, scope) -> str:
        for route in self.routes:
            match, _ = route.matches(scope)
            if match != Match.NONE:
                return getattr(route, "path", UNMATCHED)
        return UNMATCHED

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500

        async def send_and_note(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            self.count(self.endpoint(scope), status)


def model_name_for(path: Path | None) -> str:
    """The model id clients send: the model directory's name ("demo-model" for the shipped one)."""
    from glmkit.pretrained import DEMO_MODEL_DIR

    return Path(path or DEMO_MODEL_DIR).resolve().name
