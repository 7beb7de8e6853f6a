"""The OpenAI-compatible HTTP API: ``create_app(model, settings)`` -> a FastAPI app.

Routes: ``POST /v1/chat/completions`` (see ``completions``), ``POST /v1/images/generations``,
``POST /v1/explain`` (Mini-Gemini models: the mining heat map, see ``minigem.serving.explain``),
``GET /v1/models[/{id}]``, ``GET /health``, the OpenAPI schema at ``/openapi.json`` and the
web UI at ``/``. The engine's worker starts and stops with the app (lifespan). ``/v1/*``
needs ``Authorization: Bearer KEY`` when the settings carry an API key.
"""

from __future__ import annotations

import hmac
import time
from contextlib import asynccontextmanager

from fastapi import APIRouter, Depends, FastAPI, Request
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from minigem.serving.chat import check_model
from minigem.serving.completions import chat_completions
from minigem.serving.engine import Engine
from minigem.serving.errors import APIError, install_handlers
from minigem.serving.explain import explain_endpoint
from minigem.serving.imagegen import ImageGenerator, parse_size, png_base64, unavailable
from minigem.serving.schemas import (
    ChatCompletion,
    ErrorResponse,
    ExplainResponse,
    Health,
    ImageData,
    ImageGenerationRequest,
    ImagesResponse,
    ModelCard,
    ModelList,
)
from minigem.serving.settings import ServeSettings

ERRORS = {s: {"model": ErrorResponse} for s in (400, 401, 404, 408, 413, 429)}


class BodyLimit:
    """Pure ASGI middleware: a request body over ``limit`` bytes is answered 413 unread."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_big = APIError(413, f"the request body is over the limit of {self.limit} bytes",
                           code="request_too_large")
        length = dict(scope.get("headers", [])).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            return await too_big.response()(scope, receive, send)
        chunks: list[bytes] = []
        size, more = 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away before sending its body
            size += len(message.get("body", b""))
            if size > self.limit:
                return await too_big.response()(scope, receive, send)
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()  # later calls wait for the disconnect

        await self.app(scope, replay, send)


def create_app(model, settings: ServeSettings | None = None,
               image_generator: ImageGenerator | None = None) -> FastAPI:
    settings = settings or ServeSettings()
    engine = Engine(model, max_batch=settings.max_batch, max_queue=settings.max_queue,
                    max_wait_steps=settings.max_wait_steps, gather_ms=settings.gather_ms)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        engine.start()
        yield
        await run_in_threadpool(engine.stop)

    app = FastAPI(title="minigem", version="1", lifespan=lifespan,
                  description="OpenAI-compatible API for a minigem vision-language model.")
    app.state.engine, app.state.settings, app.state.model = engine, settings, model
    app.state.image_generator = image_generator
    install_handlers(app)
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)

    async def authorize(request: Request) -> None:
        if settings.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise APIError(401, "missing API key: send it as 'Authorization: Bearer KEY'",
                           code="invalid_api_key")
        if not hmac.compare_digest(token.strip().encode(), settings.api_key.encode()):
            raise APIError(401, "incorrect API key", code="invalid_api_key")

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(authorize)], responses=ERRORS)

    @v1.get("/models", response_model=ModelList)
    async def list_models() -> ModelList:
        return ModelList(data=[ModelCard(id=settings.model_name, created=created)])

    @v1.get("/models/{model_id}", response_model=ModelCard)
    async def get_model(model_id: str) -> ModelCard:
        check_model(model_id, settings.model_name)
        return ModelCard(id=settings.model_name, created=created)

    v1.add_api_route("/explain", explain_endpoint, methods=["POST"], response_model=ExplainResponse)
    v1.add_api_route("/chat/completions", chat_completions, methods=["POST"],
                     response_model=ChatCompletion, response_model_exclude_none=True,
                     responses={200: {"content": {"text/event-stream": {}},
                                      "description": "a completion, or SSE chunks with stream: true"}})

    @v1.post("/images/generations", response_model=ImagesResponse)
    async def images_generations(body: ImageGenerationRequest) -> ImagesResponse:
        check_model(body.model, settings.model_name)
        if image_generator is None:
            raise unavailable("model")
        size = parse_size(body.size)
        images = await run_in_threadpool(image_generator.generate, body.prompt, body.n, size)
        return ImagesResponse(created=int(time.time()),
                              data=[ImageData(b64_json=png_base64(im)) for im in images])

    app.include_router(v1)

    from minigem.explain import has_mining

    mining = has_mining(model)

    @app.get("/health", response_model=Health)
    async def health() -> Health:
        return Health(model=settings.model_name, image_generation=image_generator is not None,
                      mining=mining,
                      auth_required=settings.api_key is not None, max_images=settings.max_images,
                      max_tokens_limit=settings.max_tokens_limit,
                      queued=engine.queued, running=engine.running)

    from minigem.serving.ui import ui_router

    app.include_router(ui_router())
    app.openapi = lambda: _openapi(app)
    return app


def _openapi(app: FastAPI) -> dict:
    """FastAPI's schema without its 422 answers: validation errors are 400 here (as OpenAI)."""
    if app.openapi_schema is None:
        from fastapi.openapi.utils import get_openapi

        schema = get_openapi(title=app.title, version=app.version, description=app.description,
                             routes=app.routes)
        for path in schema.get("paths", {}).values():
            for op in path.values():
                op.get("responses", {}).pop("422", None)
        for name in ("HTTPValidationError", "ValidationError"):
            schema.get("components", {}).get("schemas", {}).pop(name, None)
        app.openapi_schema = schema
    return app.openapi_schema
