"""The one thread that owns the model: it takes waiting jobs, prefills them together and decodes.

Batching: when the worker is free it takes the oldest waiting job and, behind it, the waiting jobs
that ask for the same cache method and settings, up to ``max_batch`` rows and while the KV bytes
the batch will hold fit under the server's limit (admission by bytes: at one limit a 5 % budget
admits many times the rows of the full cache). The batch is left-padded and prefilled at
once, as ``uncomp generate --input`` does; rows leave the batch between decode steps as they
finish or as their client goes away (``Cache.batch_select_indices``), so a finished row stops
costing memory and time. Each row samples with its own generator, so a seeded request gets the
same tokens alone or in any batch.

A job whose prompt opens with a reusable context (:mod:`uncomp_cli.serve.prompts`) runs alone: the
context is compressed once (or found in the :class:`~uncomp_cli.serve.store.ContextStore`), the
rest of its prompt is fed on the compressed cache, and the cache returns to the compressed
context afterwards.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from uncomp_cli.contexts.compress import compress_ids
from uncomp_cli.engine.cache import cache_nbytes
from uncomp_cli.engine.generation import TextStream, eos_token_ids, full_kv_cache_bytes
from uncomp_cli.engine.steps import Batch, GenerationSettings, Row, left_pad, prompt_positions
from uncomp_cli.models.loading import LoadedModel
from uncomp_cli.policies.base import CachePolicy
from uncomp_cli.policies.registry import with_profile
from uncomp_cli.serve.metrics import ServerMetrics
from uncomp_cli.serve.prompts import Prompt
from uncomp_cli.serve.protocol import ApiError, server_error
from uncomp_cli.serve.store import ContextStore

log = logging.getLogger(__name__)


@dataclass
class Job:
    """One request inside the server. ``sink`` receives its events (from the worker thread):
    ``("text", str)``, ``("done", finish_reason, completion_tokens, served)``, ``("error", ApiError)``."""

    prompt: Prompt
    sampling: GenerationSettings
    stops: list[str]
    policy: CachePolicy
    policy_key: str
    kv_tokens: int  # prompt tokens its cache keeps per KV head (its method's budget, or all)
    served: dict = field(default_factory=dict)  # how it is served, as the client asked: method, options
    sink: Callable[[tuple], None] = lambda event: None
    arrived: float = field(default_factory=time.perf_counter)
    cancelled: threading.Event = field(default_factory=threading.Event)
    finished: bool = False

    def send(self, *event) -> None:
        if event[0] in ("done", "error"):
            self.finished = True
        try:
            self.sink(event)
        except RuntimeError:  # the client's event loop is gone (shutdown): nobody is listening
            pass


class RowText:
    """A row's text as tokens arrive: detokenised incrementally, cut at the first stop sequence;
    the last characters are held back while they could still be the start of one."""

    def __init__(self, tokenizer, stops: list[str]):
        self.stream = TextStream(tokenizer)
        self.stops = stops
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.text = ""
        self.sent = 0
        self.tokens = 0
        self.stopped = False

    def push(self, token: int) -> str:
        self.tokens += 1
        self.text += self.stream.push(token)
        return self._release(final=False)

    def close(self) -> str:
        """The text still held back, once the row has ended."""
        self.text += self.stream.flush()
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        cuts = [i for i in (self.text.find(s, self.sent) for s in self.stops) if i >= 0]
        if cuts:
            self.text, self.stopped, final = self.text[:min(cuts)], True, True
        end = len(self.text) if final else max(self.sent, len(self.text) - self.hold)
        delta, self.sent = self.text[self.sent:end], end
        return delta


class Scheduler:
    """The waiting queue, admission by KV bytes, and the worker thread."""

    def __init__(self, loaded: LoadedModel, metrics: ServerMetrics, max_batch: int, max_queue: int,
                 kv_cache_limit: int, context_cache_bytes: int, context_scorer: str, profile: str | None = None):
        self.loaded = loaded
        self.token_bytes = full_kv_cache_bytes(loaded.model.config, 1, 1, loaded.model.dtype)
        self.metrics = metrics
        self.max_batch, self.max_queue, self.kv_cache_limit = max_batch, max_queue, kv_cache_limit
        self.context_scorer = context_scorer
        self.profile = profile
        self.store = ContextStore(context_cache_bytes)
        self.eos = set(eos_token_ids(loaded))
        pad = loaded.tokenizer.pad_token_id if loaded.tokenizer is not None else None
        self.pad_id = pad if pad is not None else (sorted(self.eos) or [0])[0]
        self._profile = None  # the model's UNComp profile, once a request needs it
        self._queue: collections.deque[Job] = collections.deque()
        self._running: list[Job] = []
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="uncomp-worker", daemon=True)

    # -- the HTTP side ---------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def submit(self, job: Job) -> None:
        with self._cond:
            if self._stopping:
                raise ApiError("the server is shutting down", status=503, type="server_error", code="shutting_down")
            waiting = sum(not j.cancelled.is_set() for j in self._queue)
            if waiting >= self.max_queue:
                raise ApiError(f"{waiting} requests are waiting, the most this server queues (--max-queue); "
                               "retry later", status=429, type="rate_limit_error", code="queue_full")
            self._queue.append(job)
            self.metrics.queue_depth.set(len(self._queue))
            self._cond.notify()

    def stop(self, timeout: float = 30.0) -> None:
        """Take no more jobs, fail the waiting ones, cancel the running ones and wait for the worker."""
        with self._cond:
            self._stopping = True
            waiting, self._queue = list(self._queue), collections.deque()
            for job in self._running:
                job.cancelled.set()
            self._cond.notify_all()
        for job in waiting:
            job.send("error", ApiError("the server is shutting down", status=503, type="server_error",
                                       code="shutting_down"))
        if self._thread.is_alive():
            self._thread.join(timeout)
        for job in self._running:
            if not job.finished:
                job.send("error", ApiError("the server shut down before the answer was finished", status=503,
                                           type="server_error", code="shutting_down"))

    @property
    def stopping(self) -> bool:
        return self._stopping

    # -- the worker thread -----------------------------------------------------------------------

    def _loop(self) -> None:
        while (batch := self._next_batch()) is not None:
            try:
                policy = self._resolved(batch[0])
                if batch[0].prompt.context_ids is not None:
                    self._serve_context(batch[0], policy)
                else:
                    self._serve_batch(batch, policy)
            except ApiError as exc:
                self._fail(batch, exc)
            except Exception as exc:  # one batch's failure is not the server's
                log.exception("a batch failed")
                self._fail(batch, server_error(f"the batch failed: {type(exc).__name__}: {exc}"))
            finally:
                with self._cond:
                    self._running = []
                self.metrics.running.set(0)
                self.metrics.kv_bytes.set(0)
                self.metrics.kv_reserved.set(0)

    def _next_batch(self) -> list[Job] | None:
        with self._cond:
            while True:
                while self._queue and self._queue[0].cancelled.is_set():
                    self._queue.popleft()
                if self._queue or self._stopping:
                    break
                self._cond.wait()
            if self._stopping:
                return None
            head = self._queue.popleft()
            batch = [head]
            if head.prompt.context_ids is None:
                for job in list(self._queue):
                    if len(batch) == self.max_batch:
                        break
                    if job.policy_key != head.policy_key or job.prompt.context_ids is not None \
                            or job.cancelled.is_set():
                        continue
                    if self._batch_bytes([*batch, job]) > self.kv_cache_limit:
                        break  # first come, first served: no later, smaller job jumps the queue
                    batch.append(job)
                    self._queue.remove(job)
            self._running = batch
            self.metrics.queue_depth.set(len(self._queue))
        self.metrics.running.set(len(batch))
        self.metrics.batch_size.observe(len(batch))
        self.metrics.kv_reserved.set(self._batch_bytes(batch))
        return batch

    def _batch_bytes(self, jobs: list[Job]) -> int:
        """A left-padded batch holds every row at the longest prompt's kept tokens and the longest
        answer, and a grouped cache the slack decoding writes into (one batch: one policy)."""
        longest = max(job.kv_tokens for job in jobs) + max(job.sampling.max_new_tokens for job in jobs)
        return len(jobs) * self.token_bytes * jobs[0].policy.held_tokens(longest)

    def _resolved(self, job: Job) -> CachePolicy:
        """The job's policy with the model's profile, loaded once (in this thread: calibrating a
        missing profile runs the model)."""
        if not job.policy.needs_profile:
            return job.policy
        if self._profile is None:
            self._profile = with_profile(job.policy, self.loaded, self.profile).profile
        return job.policy.given(profile=self._profile)

    def _fail(self, jobs: list[Job], error: ApiError) -> None:
        for job in jobs:
            if not job.finished:
                job.send("error", error)

    def _serve_batch(self, jobs: list[Job], policy: CachePolicy) -> None:
        input_ids, mask = left_pad([job.prompt.ids for job in jobs], self.pad_id, self.loaded.device)
        served = {"batch_size": len(jobs), "context_reused": None}
        with torch.inference_mode(), policy.attach(self.loaded.model, mask) as cache:
            self._run_rows(cache, input_ids, mask, prompt_positions(mask), jobs, served)

    def _serve_context(self, job: Job, policy: CachePolicy) -> None:
        key = (job.policy_key, self.context_scorer, job.prompt.context_hash())
        context = self.store.get(key)
        reused = context is not None
        self.metrics.context_reuse.labels("hit" if reused else "miss").inc()
        if context is None:
            with self._timed("compress"):
                context = compress_ids(self.loaded, job.prompt.context_ids, policy, self.context_scorer)
            self.store.put(key, context)
            self.metrics.context_bytes.set(self.store.bytes)
        rest = job.prompt.rest_ids
        total = context.context_tokens + len(rest)
        device = self.loaded.device
        input_ids = torch.tensor([rest], device=device)
        mask = torch.ones(1, total, dtype=torch.long, device=device)
        positions = torch.arange(context.context_tokens, total, device=device)[None]
        served = {"batch_size": 1, "context_reused": reused,
                  "context_tokens": context.context_tokens, "context_kv_cache_bytes": context.kv_cache_bytes()}
        try:
            with torch.inference_mode(), policy.resume(self.loaded.model, context.cache) as cache:
                self._run_rows(cache, input_ids, mask, positions, [job], served)
        finally:
            context.restore()

    @contextlib.contextmanager
    def _timed(self, phase: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            if self.loaded.device.type == "cuda":
                torch.cuda.synchronize(self.loaded.device)
            self.metrics.worker_seconds.labels(phase).inc(time.perf_counter() - started)

    def _run_rows(self, cache, input_ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
                  jobs: list[Job], served: dict) -> None:
        """Feed the prompts, then decode until every row has ended; rows leave as they end (the
        engine's step API: :class:`~uncomp_cli.engine.steps.Batch`)."""
        device = self.loaded.device
        batch = Batch(self.loaded.model, cache, [Row.sampling(job.sampling, device) for job in jobs])
        texts = [RowText(self.loaded.tokenizer, job.stops) for job in jobs]
        with self._timed("prefill"):
            tokens = batch.prefill(input_ids, mask, positions)
        served |= {"kv_cache_bytes": cache_nbytes(cache) // len(jobs)}
        while True:
            self.metrics.kv_bytes.set(cache_nbytes(cache, reserved=True))
            ended = [i for i, (job, text, token) in enumerate(zip(jobs, texts, tokens.tolist()))
                     if self._emit(job, text, token, served)]
            if len(ended) == len(jobs):
                return
            if ended:
                batch.remove(ended)
                jobs = [job for i, job in enumerate(jobs) if i not in ended]
                texts = [text for i, text in enumerate(texts) if i not in ended]
                with self._cond:
                    self._running = list(jobs)
                self.metrics.running.set(len(jobs))
            with self._timed("decode"):
                tokens = batch.step()

    def _emit(self, job: Job, text: RowText, token: int, served: dict) -> bool:
        """Send a row's new token to its client; True when the row has ended (or its client left)."""
        if text.tokens == 0:
            self.metrics.ttft.observe(time.perf_counter() - job.arrived)
        if job.cancelled.is_set():
            job.finished = True
            self.metrics.dropped_rows.inc()
            return True
        ended = "stop" if token in self.eos else None
        delta = "" if ended else text.push(token)
        if text.stopped:
            ended = "stop"
        elif ended is None and text.tokens >= job.sampling.max_new_tokens:
            ended = "length"
        delta += text.close() if ended else ""
        if delta:
            job.send("text", delta)
        if ended:
            self.metrics.completion_tokens.inc(text.tokens)
            self.metrics.prompt_tokens.inc(len(job.prompt.ids))
            job.send("done", ended, text.tokens, job.served | served)
        return ended is not None
