"""The HTTP application (FastAPI): OpenAI's endpoints over one :class:`~uncomp_cli.serve.worker.Scheduler`.

Handlers only check requests and relay the worker's events: a whole JSON response, or server-sent
events in OpenAI's chunk format ending in ``data: [DONE]``. A client that goes away cancels its
job, and the worker drops its row at the next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from uncomp_cli import __version__
from uncomp_cli.models.loading import LoadedModel
from uncomp_cli.serve.metrics import ServerMetrics
from uncomp_cli.serve.protocol import (
    ApiError,
    ChatRequest,
    CompletionRequest,
    chunk_body,
    completion_body,
    new_id,
    parse_request,
    usage,
)
from uncomp_cli.serve.server import RequestPlanner, ServeSettings
from uncomp_cli.serve.worker import Job, Scheduler

#: How often a waiting non-streamed request checks that its client is still there (seconds).
DISCONNECT_POLL = 0.5


def create_app(loaded: LoadedModel, settings: ServeSettings, profile: str | None = None) -> FastAPI:
    """An application serving ``loaded``; its worker starts and stops with the application."""
    settings.validate()
    metrics = ServerMetrics()
    planner = RequestPlanner(loaded, settings)
    scheduler = Scheduler(loaded, metrics, settings.max_batch, settings.max_queue, settings.kv_cache_limit,
                          settings.context_cache_bytes, settings.context_scorer, profile)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        scheduler.start()
        yield
        await asyncio.to_thread(scheduler.stop)

    app = FastAPI(title="uncomp", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.scheduler, app.state.planner, app.state.metrics = scheduler, planner, metrics

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        error = ApiError(str(exc.detail), status=exc.status_code, code="not_found" if exc.status_code == 404 else None)
        return JSONResponse(error.body(), status_code=exc.status_code)

    @app.get("/health")
    async def health() -> JSONResponse:
        if scheduler.stopping:
            return JSONResponse({"status": "stopping"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": planner.model_name, "object": "model", "created": int(time.time()),
                                            "owned_by": "uncomp", "max_model_len": planner.context_limit}]}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    async def complete(request: Request, kind: type, endpoint: str) -> Response:
        try:
            body = parse_request(kind, await request.body())
            job = planner.plan(body, endpoint)
        except ApiError:
            metrics.requests.labels(endpoint, "bad_request").inc()
            raise
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        job.sink = lambda event: loop.call_soon_threadsafe(events.put_nowait, event)
        try:
            scheduler.submit(job)
        except ApiError as exc:
            metrics.requests.labels(endpoint, "rejected").inc()
            raise exc
        chat = endpoint == "chat"
        request_id = new_id("chatcmpl" if chat else "cmpl")
        if body.stream:
            return StreamingResponse(_stream(job, events, chat, request_id, planner.model_name, body.include_usage(),
                                             metrics, endpoint),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        return await _whole(request, job, events, chat, request_id, planner.model_name, metrics, endpoint)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await complete(request, ChatRequest, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await complete(request, CompletionRequest, "completions")

    return app


async def _next_event(request: Request, job: Job, events: asyncio.Queue) -> tuple:
    """The job's next event; cancels the job if its client disconnects while waiting."""
    while True:
        try:
            return await asyncio.wait_for(events.get(), DISCONNECT_POLL)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                job.cancelled.set()
                raise asyncio.CancelledError from None


async def _whole(request: Request, job: Job, events: asyncio.Queue, chat: bool, request_id: str, model: str,
                 metrics: ServerMetrics, endpoint: str) -> Response:
    parts: list[str] = []
    try:
        while True:
            event = await _next_event(request, job, events)
            if event[0] == "text":
                parts.append(event[1])
            elif event[0] == "error":
                metrics.requests.labels(endpoint, "error").inc()
                return JSONResponse(event[1].body(), status_code=event[1].status)
            else:
                _, finish_reason, completion_tokens, served = event
                metrics.requests.labels(endpoint, "ok").inc()
                body = completion_body(chat, request_id, model, "".join(parts), finish_reason,
                                       usage(len(job.prompt.ids), completion_tokens), served)
                return JSONResponse(body)
    except asyncio.CancelledError:
        job.cancelled.set()
        metrics.requests.labels(endpoint, "cancelled").inc()
        raise


def _sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


async def _stream(job: Job, events: asyncio.Queue, chat: bool, request_id: str, model: str, include_usage: bool,
                  metrics: ServerMetrics, endpoint: str) -> AsyncIterator[str]:
    """Server-sent events; when the client goes away the generator is closed and the job cancelled."""
    finished = False
    try:
        if chat:
            yield _sse(chunk_body(chat, request_id, model, None, first=True))
        while True:
            event = await events.get()
            if event[0] == "text":
                yield _sse(chunk_body(chat, request_id, model, event[1]))
                continue
            finished = True
            if event[0] == "error":
                metrics.requests.labels(endpoint, "error").inc()
                yield _sse(event[1].body())
            else:
                _, finish_reason, completion_tokens, served = event
                metrics.requests.labels(endpoint, "ok").inc()
                counts = usage(len(job.prompt.ids), completion_tokens)
                yield _sse(chunk_body(chat, request_id, model, None, finish_reason, extra={"uncomp": served}))
                if include_usage:
                    last = chunk_body(chat, request_id, model, None, extra={"usage": counts, "uncomp": served})
                    last["choices"] = []
                    yield _sse(last)
            yield _sse("[DONE]")
            return
    finally:
        if not finished:
            job.cancelled.set()
            metrics.requests.labels(endpoint, "cancelled").inc()
