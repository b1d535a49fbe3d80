"""``uncomp serve --replicas N``: the same OpenAI API over N engine replicas on Ray Serve.

Two deployments (the ``ray`` extra):

* :class:`Engine` — N replicas, each the single-process server of :mod:`uncomp_cli.serve.app`
  (its own model, continuous batching and KV limit). A request reaches the replica's FastAPI app
  as ASGI messages (:func:`call_asgi`), so every check, error, stream and metric is the one
  ``uncomp serve`` has; the response comes back as its ASGI messages.
* the front (one light replica, no model): OpenAI's routes, which forward each request's method,
  path, headers and body to an engine replica and stream its answer back. It computes the
  request's **document key** (:func:`document_key`: the first user message, or the prompt, up to
  its last paragraph break, as the servers split documents for reuse), which
  :class:`~uncomp_cli.serve.routing.DocumentAffinityRouter` uses to send every request about one
  document to the replica that holds it; requests without one go to the least loaded.

With ``--context-dir`` every replica writes the documents it prefills to that folder and reads
it on a miss (:mod:`uncomp_cli.serve.context_dir`), so a request routed elsewhere (the replica
was full, or restarted) loads the document instead of prefilling it again.

A replica that dies mid-request fails that request with a 503 (a stream: an error event, then
``[DONE]``); one that dies before answering anything is retried once on another replica. Ray
Serve starts a new replica in its place.
"""

# No "from __future__ import annotations": Ray Serve reads the routes' annotations as objects.

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from uncomp_cli.models.prompting import CONTEXT_SEPARATOR

log = logging.getLogger("uncomp.serve")

APP_NAME = "uncomp"
ENGINE_NAME = "UncompEngine"
#: Requests one engine replica takes before the router counts it full (then a request about a
#: document it holds goes to the least loaded other replica): its batch, and as many waiting.
ONGOING_PER_BATCH_ROW = 2
#: The largest body the front reads when ``--max-body`` is auto (the engine's limit depends on the
#: model's context, which the front does not load; each engine still applies its own).
FRONT_MAX_BODY = 64 << 20
#: Ray Serve's proxy timeouts for a cluster this process starts (seconds; the environment wins).
LOCAL_PROXY_TIMEOUTS = {"RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "60", "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S": "30"}
#: Response headers that come from the engine but are the front's to set.
_HOP_HEADERS = {"content-length", "transfer-encoding", "connection"}


@dataclass(frozen=True)
class ReplicaSpec:
    """What each engine replica needs to build its server: how to load the model (``loading``,
    a :class:`~uncomp_cli.cli.options.ModelOptions`), the server's settings (their
    ``kv_cache_limit`` is per replica), and the profile."""

    loading: object
    settings: object
    profile: str | None = None
    kv_cache_limit: str = "auto"


def document_key(body: bytes, min_chars: int) -> str | None:
    """The routing key of a request body: a hash of the text its server would keep as a document
    (the first user message of a chat, or a completion's prompt, up to its last paragraph break),
    or None (no such text of at least ``min_chars`` characters, or not JSON)."""
    try:
        request = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(request, dict):
        return None
    text = request.get("prompt")
    if isinstance(request.get("messages"), list):
        first = next((m for m in request["messages"] if isinstance(m, dict) and m.get("role") == "user"), None)
        text = None if first is None else first.get("content")
    if not isinstance(text, str) or CONTEXT_SEPARATOR not in text:
        return None
    document = text.rsplit(CONTEXT_SEPARATOR, 1)[0]
    if len(document) < min_chars or not document.strip():
        return None
    return hashlib.sha256(document.encode()).hexdigest()


async def call_asgi(app, method: str, path: str, query: bytes, headers: list[tuple[bytes, bytes]],
                    body: bytes) -> AsyncIterator[dict]:
    """Run one HTTP request through the ASGI ``app`` and yield the messages it sends
    (``http.response.start``, then ``http.response.body`` until one without ``more_body``).

    Closing the generator early (the client went away) tells the app the client disconnected, so
    it cancels the request as it would for a dropped connection."""
    sent = asyncio.Queue()
    gone = asyncio.Event()
    delivered = False

    async def receive() -> dict:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
             "scheme": "http", "path": path, "raw_path": path.encode(), "root_path": "", "query_string": query,
             "headers": headers, "client": ("127.0.0.1", 0), "server": ("uncomp-engine", 0)}
    task = asyncio.ensure_future(app(scope, receive, sent.put))
    try:
        while True:
            message = asyncio.ensure_future(sent.get())
            await asyncio.wait({message, task}, return_when=asyncio.FIRST_COMPLETED)
            if not message.done():
                message.cancel()
                task.result()  # the app ended without finishing its answer: its error
                while not sent.empty():
                    yield sent.get_nowait()
                return
            yield message.result()
            if message.result()["type"] == "http.response.body" and not message.result().get("more_body"):
                return
    finally:
        gone.set()
        if not task.done():
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError, Exception):
                await asyncio.wait_for(task, 30)


class Engine:
    """One engine replica: the single-process server's application, without its HTTP listener."""

    def __init__(self, spec: ReplicaSpec):
        from ray import serve

        from uncomp_cli.serve.app import create_app
        from uncomp_cli.serve.server import kv_cache_limit_bytes

        self.replica = serve.get_replica_context().replica_tag  # the id the router hashes
        loaded = spec.loading.load()
        spec.settings.kv_cache_limit = kv_cache_limit_bytes(spec.kv_cache_limit, loaded.device)
        self.app = create_app(loaded, spec.settings, spec.profile)
        self.scheduler = self.app.state.scheduler
        self.shutdown_timeout = spec.settings.shutdown_timeout
        self.scheduler.start()
        log.info("engine replica %s ready", self.replica)

    async def handle(self, method: str, path: str, query: bytes, headers: list[tuple[bytes, bytes]], body: bytes,
                     document: str | None = None) -> AsyncIterator[dict]:
        """The ASGI messages of the answer, the start message tagged with this replica's id;
        ``document`` is the router's key (unused here)."""
        async for message in call_asgi(self.app, method, path, query, headers, body):
            if message["type"] == "http.response.start":
                message = message | {"headers": [*message.get("headers", []),
                                                 (b"x-uncomp-replica", self.replica.encode())]}
            yield message

    def __del__(self) -> None:  # Ray Serve stops a replica: finish or fail what it holds
        scheduler = getattr(self, "scheduler", None)
        if scheduler is not None:
            scheduler.stop(self.shutdown_timeout)


def _replica_failed(exc: BaseException) -> bool:
    from ray.exceptions import RayActorError

    return isinstance(exc, RayActorError)


def build_app(spec: ReplicaSpec, replicas: int, device_type: str = "cpu"):
    """The Ray Serve application: the front over ``replicas`` engine replicas."""
    from ray import serve
    from ray.serve.config import RequestRouterConfig

    from uncomp_cli import __version__
    from uncomp_cli.serve.app import read_body
    from uncomp_cli.serve.protocol import ApiError

    settings = spec.settings
    engine_options = {"num_cpus": 0} | ({"num_gpus": 1} if device_type == "cuda" else {})
    engine = serve.deployment(
        Engine, name=ENGINE_NAME, num_replicas=replicas, ray_actor_options=engine_options,
        max_ongoing_requests=ONGOING_PER_BATCH_ROW * settings.max_batch,
        graceful_shutdown_timeout_s=settings.shutdown_timeout + 5,
        request_router_config=RequestRouterConfig(
            request_router_class="uncomp_cli.serve.routing.DocumentAffinityRouter"))
    front_api = FastAPI(title="uncomp", version=__version__, docs_url=None, redoc_url=None)
    min_chars = settings.reuse_min_tokens  # a token has at least one character: never misses a document
    failed = ApiError("the replica serving this request failed; send it again", status=503, code="replica_failed")

    @serve.deployment(name="UncompFront", ray_actor_options={"num_cpus": 0}, max_ongoing_requests=10_000)
    @serve.ingress(front_api)
    class Front:
        def __init__(self, engine_handle):
            self.engine = engine_handle

        @front_api.api_route("/{path:path}", methods=["GET", "POST"])
        async def forward(self, request: Request, path: str):
            try:  # the engine checks its own, exact limit; the front holds nothing larger than this
                body = await read_body(request, settings.max_body or FRONT_MAX_BODY)
            except ApiError as exc:
                return JSONResponse(exc.body(), status_code=exc.status)
            key = document_key(body, min_chars) if request.method == "POST" and settings.reuse_min_tokens else None
            headers = [(k, v) for k, v in request.headers.raw if k.lower() != b"host"]
            args = (request.method, "/" + path, request.url.query.encode(), headers, body)
            for attempt in (1, 2):  # a replica that dies before answering: once more, elsewhere
                stream = self.engine.options(stream=True).handle.remote(*args, document=key)
                try:
                    start = await stream.__anext__()
                except StopAsyncIteration:
                    return JSONResponse(failed.body(), status_code=503)
                except Exception as exc:
                    if _replica_failed(exc) and attempt == 1:
                        log.warning("a replica failed before answering; retrying once")
                        continue
                    if _replica_failed(exc):
                        return JSONResponse(failed.body(), status_code=503)
                    raise
                break
            response_headers = {k.decode(): v.decode() for k, v in start.get("headers", [])
                                if k.decode().lower() not in _HOP_HEADERS}
            streaming = response_headers.get("content-type", "").startswith("text/event-stream")

            async def body_parts() -> AsyncIterator[bytes]:
                try:
                    async for message in stream:
                        if message.get("body"):
                            yield message["body"]
                except Exception as exc:
                    if not _replica_failed(exc):
                        raise
                    log.warning("a replica failed mid-answer")
                    if streaming:
                        yield f"data: {json.dumps(failed.body())}\n\ndata: [DONE]\n\n".encode()
                finally:
                    stream.cancel()

            return StreamingResponse(body_parts(), status_code=start["status"], headers=response_headers)

    return Front.bind(engine.bind(spec))


def run_replicas(spec: ReplicaSpec, replicas: int, host: str, port: int, ray_address: str | None,
                 device_type: str = "cpu") -> None:
    """Start (or join, with ``ray_address``) a Ray cluster, serve until SIGTERM or Ctrl-C, then take
    the application down (and the cluster, when this process started it). Ray's messages about its
    workers go to stderr with the other logs (Ray writes them to stdout)."""
    with contextlib.redirect_stdout(sys.stderr):
        _run_replicas(spec, replicas, host, port, ray_address, device_type)


def _run_replicas(spec: ReplicaSpec, replicas: int, host: str, port: int, ray_address: str | None,
                  device_type: str) -> None:
    import ray
    from ray import serve

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if ray_address:
        ray.init(address=ray_address, log_to_driver=False)
    else:
        # A busy machine starts the HTTP proxy slowly: Ray Serve's 5-second ready check would kill it.
        for name, seconds in LOCAL_PROXY_TIMEOUTS.items():
            os.environ.setdefault(name, seconds)
        ray.init(include_dashboard=False, log_to_driver=False)
    stop = threading.Event()
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(build_app(spec, replicas, device_type), name=APP_NAME, route_prefix="/", blocking=False)
        # after ray.init, whose own handlers would exit non-zero: stop here, then exit 0
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        signal.signal(signal.SIGINT, lambda *_: stop.set())
        while not stop.wait(0.5):
            pass
    finally:
        if ray_address:
            serve.delete(APP_NAME)
        else:
            serve.shutdown()
        ray.shutdown()
