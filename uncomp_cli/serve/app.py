"""The HTTP application (FastAPI): OpenAI's endpoints over one :class:`~uncomp_cli.serve.worker.Scheduler`.

Handlers only check requests and relay the worker's events: a whole JSON response, or server-sent
events in OpenAI's chunk format ending in ``data: [DONE]``. A client that goes away cancels its
job, and the worker drops its row at the next step. A body is read up to ``--max-body`` bytes, and
checked and tokenised in a thread, so a large one never holds up the event loop.

Stopping (:func:`run`, on SIGTERM or Ctrl-C): the server stops listening, waiting requests get a
503 at once, running ones get ``--shutdown-timeout`` seconds to finish and then a 503 (a stream: an
error event, then ``[DONE]``); every client still connected is answered before its connection closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from uncomp_cli import __version__
from uncomp_cli.models.loading import LoadedModel
from uncomp_cli.serve.context_dir import ContextDirectory
from uncomp_cli.serve.logprobs import CompletionLogprobs, chat_logprobs
from uncomp_cli.serve.metrics import ServerMetrics
from uncomp_cli.serve.protocol import (
    ApiError,
    ChatRequest,
    CompletionRequest,
    chunk_body,
    completion_body,
    new_id,
    parse_request,
    shutting_down,
    too_large,
    usage,
)
from uncomp_cli.serve.server import RequestPlanner, ServeSettings
from uncomp_cli.serve.worker import Job, Scheduler

#: How often a waiting non-streamed request checks that its client is still there (seconds).
DISCONNECT_POLL = 0.5

#: Seconds beyond ``--shutdown-timeout`` that uvicorn waits for the last answers to be written
#: (the worker's last step, then the 503s) before it cancels what is left.
DRAIN_GRACE = 10.0


def create_app(loaded: LoadedModel, settings: ServeSettings, profile: str | None = None) -> FastAPI:
    """An application serving ``loaded``; its worker starts and stops with the application.

    ``app.state.drain()`` stops taking requests and answers every one it holds (see the module's
    text); :func:`run` calls it as soon as the server begins to stop, and the application's shutdown
    calls it (again: once is enough) whatever server runs it."""
    settings.validate()
    metrics = ServerMetrics()
    planner = RequestPlanner(loaded, settings)
    directory = None
    if settings.context_dir is not None:
        directory = ContextDirectory(settings.context_dir, settings.context_dir_bytes, loaded.model, loaded.dtype,
                                     loaded.device)
    scheduler = Scheduler(loaded, metrics, settings.max_batch, settings.max_queue, settings.kv_cache_limit,
                          settings.context_cache_bytes, profile, settings.prefill_chunk, directory)
    inflight: dict[int, Job] = {}  # submitted jobs whose handler still waits for their events, by id()
    draining: list[asyncio.Future] = []

    async def _drain() -> None:
        # The scheduler fails the waiting jobs, lets the running ones finish for the timeout, then
        # cancels them; a job it did not answer is answered here, while its handler still listens.
        await asyncio.to_thread(scheduler.stop, settings.shutdown_timeout)
        error = shutting_down("the server shut down before the answer was finished")
        for job in list(inflight.values()):
            job.sink(("error", error))

    async def drain() -> None:
        if not draining:
            draining.append(asyncio.ensure_future(_drain()))
        await asyncio.shield(draining[0])

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        scheduler.start()
        yield
        await drain()

    app = FastAPI(title="uncomp", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.scheduler, app.state.planner, app.state.metrics = scheduler, planner, metrics
    app.state.drain = drain

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

    def prepare(kind: type, raw: bytes, endpoint: str) -> tuple:
        body = parse_request(kind, raw)
        return body, planner.plan(body, endpoint)

    async def complete(request: Request, kind: type, endpoint: str) -> Response:
        try:
            raw = await read_body(request, planner.max_body)
            body, job = await asyncio.to_thread(prepare, kind, raw, endpoint)  # tokenising is not the loop's work
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
        inflight[id(job)] = job
        chat = endpoint == "chat"
        request_id = new_id("chatcmpl" if chat else "cmpl")
        if body.stream:
            return StreamingResponse(_stream(job, events, chat, request_id, planner.model_name, body.include_usage(),
                                             metrics, endpoint, lambda job: inflight.pop(id(job), None)),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        try:
            return await _whole(request, job, events, chat, request_id, planner.model_name, metrics, endpoint)
        finally:
            inflight.pop(id(job), None)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await complete(request, ChatRequest, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await complete(request, CompletionRequest, "completions")

    return app


async def read_body(request: Request, limit: int) -> bytes:
    """The request's body, refused with 413 when over ``limit`` bytes: by its Content-Length before
    anything is read, or, sent in chunks, as soon as it passes the limit (the rest is never kept)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large(limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def run(app: FastAPI, host: str, port: int, shutdown_timeout: float) -> bool:
    """Serve ``app`` (from :func:`create_app`) until SIGTERM or Ctrl-C; False when it could not start.

    uvicorn alone would stop listening, wait for the connections to close for its graceful timeout,
    cancel the handlers still running (a stream is cut, a waiting request gets a bare 500), and only
    then shut the application down, so the worker's 503s reached nobody. Here the application
    drains as soon as the server begins to stop, and uvicorn waits ``DRAIN_GRACE`` seconds longer
    than the drain, so every handler writes its answer first.
    """
    import uvicorn

    class DrainingServer(uvicorn.Server):
        async def shutdown(self, sockets=None) -> None:
            drained = asyncio.ensure_future(app.state.drain())  # runs once the listening sockets are closed
            await super().shutdown(sockets)
            await drained

    config = uvicorn.Config(app, host=host, port=port, log_level="warning",
                            timeout_graceful_shutdown=shutdown_timeout + DRAIN_GRACE)
    server = DrainingServer(config)
    server.run()
    return server.started


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
    entries: list[dict] | None = None  # log probabilities, when the worker sends them (asked for)
    try:
        while True:
            event = await _next_event(request, job, events)
            if event[0] == "text":
                parts.append(event[1])
            elif event[0] == "logprobs":
                entries = [*(entries or []), *event[1]]
            elif event[0] == "error":
                metrics.requests.labels(endpoint, "error").inc()
                return JSONResponse(event[1].body(), status_code=event[1].status)
            else:
                _, finish_reason, completion_tokens, served = event
                metrics.requests.labels(endpoint, "ok").inc()
                body = completion_body(chat, request_id, model, "".join(parts), finish_reason,
                                       usage(len(job.prompt.ids), completion_tokens), served,
                                       _logprobs(chat, entries, CompletionLogprobs()))
                return JSONResponse(body)
    except asyncio.CancelledError:
        job.cancelled.set()
        metrics.requests.labels(endpoint, "cancelled").inc()
        raise


def _logprobs(chat: bool, entries: list[dict] | None, legacy: CompletionLogprobs) -> dict | None:
    """A choice's ``logprobs`` from the entries of its tokens (None: none were sent)."""
    if entries is None:
        return None
    return chat_logprobs(entries) if chat else legacy(entries)


def _sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


async def _stream(job: Job, events: asyncio.Queue, chat: bool, request_id: str, model: str, include_usage: bool,
                  metrics: ServerMetrics, endpoint: str, done: Callable[[Job], None]) -> AsyncIterator[str]:
    """Server-sent events; when the client goes away the generator is closed and the job cancelled.

    Log probabilities (``("logprobs", entries)`` events, sent before the text of their tokens) go
    on the next chunk sent: the one with that text, or the finishing one."""
    finished = False
    pending: list[dict] | None = None
    legacy = CompletionLogprobs()
    try:
        if chat:
            yield _sse(chunk_body(chat, request_id, model, None, first=True))
        while True:
            event = await events.get()
            if event[0] == "logprobs":
                pending = [*(pending or []), *event[1]]
                continue
            if event[0] == "text":
                yield _sse(chunk_body(chat, request_id, model, event[1], logprobs=_logprobs(chat, pending, legacy)))
                pending = None
                continue
            finished = True
            if event[0] == "error":
                metrics.requests.labels(endpoint, "error").inc()
                yield _sse(event[1].body())
            else:
                _, finish_reason, completion_tokens, served = event
                metrics.requests.labels(endpoint, "ok").inc()
                counts = usage(len(job.prompt.ids), completion_tokens)
                yield _sse(chunk_body(chat, request_id, model, None, finish_reason, extra={"uncomp": served},
                                      logprobs=_logprobs(chat, pending, legacy)))
                if include_usage:
                    last = chunk_body(chat, request_id, model, None, extra={"usage": counts, "uncomp": served})
                    last["choices"] = []
                    yield _sse(last)
            yield _sse("[DONE]")
            return
    finally:
        done(job)
        if not finished:
            job.cancelled.set()
            metrics.requests.labels(endpoint, "cancelled").inc()
