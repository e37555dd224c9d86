"""HTTP routes only: parse, call `Serving`, return JSON or an event stream. Errors in OpenAI's shape."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse

from glmkit.engine import Engine, QueueFull
from glmkit.engine.async_engine import AsyncEngine
from glmkit.engine.protocol import EngineClient
from glmkit.families import family_of
from glmkit.models.glm import GLM
from glmkit.serve.openai import APIError, Serving
from glmkit.serve.protocol import ChatCompletionRequest, CompletionRequest, LegacyRequest
from glmkit.text.chat_format import ChatFormat
from glmkit.text.protocol import Tokenizer

PAGE = Path(__file__).parent / "static" / "index.html"


def create_app(model: GLM, tokenizer: Tokenizer, model_name: str, *, api_key: str | None = None,
               max_batch: int = 8, max_queue: int = 64, cors_origins: list[str] | None = None) -> FastAPI:
    """The app over a new batching engine for `model`."""
    engine = start_engine(model, max_batch, max_queue)
    return build_app(engine, tokenizer, family_of(model.config).chat_format, model_name,
                     model.config.max_sequence_length, api_key=api_key, cors_origins=cors_origins)


def start_engine(model: GLM, max_batch: int, max_queue: int) -> EngineClient:
    """The one place the server builds its concrete engine: continuous batching on a thread of its own."""
    return AsyncEngine(Engine(model, max_batch=max_batch, max_queue=max_queue))


def build_app(engine: EngineClient, tokenizer: Tokenizer, chat_format: ChatFormat, model_name: str, context: int, *,
              api_key: str | None = None, cors_origins: list[str] | None = None) -> FastAPI:
    """The routes over any engine client; `context` is the model's max_sequence_length."""
    serving = Serving(engine, tokenizer, chat_format, model_name, context)
    app = FastAPI(title="glmkit", description="OpenAI-compatible and ChatGLM APIs for GLM models")
    app.state.serving = serving
    if cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=cors_origins, allow_methods=["*"], allow_headers=["*"])

    @app.middleware("http")
    async def check_key_and_count(request: Request, call_next):
        open_paths = request.url.path in ("/health", "/metrics") or request.method in ("GET", "OPTIONS") and (
            request.url.path == "/" or request.url.path.startswith("/static"))
        if api_key and not open_paths and request.headers.get("authorization") != f"Bearer {api_key}":
            response = error_response(APIError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'",
                                               code="invalid_api_key"))
        else:
            response = await call_next(request)
        serving.metrics.count(request.url.path, response.status_code)
        return response

    @app.exception_handler(APIError)
    async def api_error(_: Request, e: APIError):
        return error_response(e)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, e: RequestValidationError):
        first = e.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        message = "the body is not valid JSON" if first.get("type") == "json_invalid" else f"{where}: {first['msg']}"
        return error_response(APIError(400, message, param=where or None))

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return PAGE.read_text(encoding="utf-8")

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "owned_by": "glmkit"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest):
        return respond(await guarded(serving.chat_completion(body)))

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        return respond(await guarded(serving.completion(body)))

    @app.post("/")
    async def legacy(body: LegacyRequest):
        return await guarded(serving.legacy(body))

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics():
        return prometheus_text(serving, engine)

    return app


async def guarded(call):
    """Refusals from the engine become HTTP errors: a full queue is 429, a prompt that cannot fit is 400."""
    try:
        return await call
    except QueueFull as e:
        raise APIError(429, f"the server is busy ({e}); retry shortly", code="rate_limit_exceeded") from e
    except ValueError as e:
        raise APIError(400, str(e)) from e


def respond(result):
    if isinstance(result, dict):
        return result
    return StreamingResponse(result, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


def prometheus_text(serving: Serving, engine: EngineClient) -> str:
    m = serving.metrics
    lines = ["# TYPE glmkit_requests_total counter"]
    lines += [f"glmkit_requests_total{{{labels}}} {n}" for labels, n in sorted(m.requests.items())]
    lines += [
        "# TYPE glmkit_prompt_tokens_total counter", f"glmkit_prompt_tokens_total {m.prompt_tokens}",
        "# TYPE glmkit_completion_tokens_total counter", f"glmkit_completion_tokens_total {m.completion_tokens}",
        "# TYPE glmkit_queue_depth gauge", f"glmkit_queue_depth {engine.queue_depth}",
        "# TYPE glmkit_running_requests gauge", f"glmkit_running_requests {engine.running}",
        "# TYPE glmkit_generation_seconds summary", f"glmkit_generation_seconds_sum {m.latency_sum:.6f}",
        f"glmkit_generation_seconds_count {m.latency_count}",
    ]
    return "\n".join(lines) + "\n"


def model_name_for(path: Path | None) -> str:
    """The model id clients send: the model directory's name ("demo-model" for the shipped one)."""
    from glmkit.pretrained import DEMO_MODEL_DIR

    return Path(path or DEMO_MODEL_DIR).resolve().name
