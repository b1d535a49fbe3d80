"""The one thread that owns the model: iteration-level scheduling (continuous batching).

Every iteration the worker (1) admits waiting requests, oldest first, while the KV bytes they may
hold fit under the server's limit (admission by bytes: at one limit a 5 % budget admits many times
the rows of the full cache) and the rows fit ``max_batch``; (2) feeds one prompt chunk of the
oldest request still prefilling (:mod:`uncomp_cli.serve.prefill`: each request gets its own cache,
from its own method's plan); (3) runs one decode step over every row that has its prompt in —
rows of any methods, budgets and lengths together (:class:`~uncomp_cli.engine.ragged.RaggedBatch`).
A row leaves at the step it ends (end of sequence, stop string, ``max_tokens``, its client gone);
a request joins at the step after its prefill. So a short request waits for at most one chunk and
one step, not for a long answer, and a long prompt's prefill lets running streams go on between
its chunks. Cancellation is checked before every chunk and every step. Each row samples with its
own generator: a seeded request gets the same tokens alone or among others.
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

from uncomp_cli.engine.cache import cache_nbytes
from uncomp_cli.engine.generation import TextStream, eos_token_ids, full_kv_cache_bytes
from uncomp_cli.engine.ragged import RaggedBatch
from uncomp_cli.engine.steps import GenerationSettings, Row, pick_tokens
from uncomp_cli.models.loading import LoadedModel
from uncomp_cli.policies.base import CachePolicy
from uncomp_cli.policies.registry import with_profile
from uncomp_cli.serve.logprobs import token_logprobs
from uncomp_cli.serve.metrics import ServerMetrics
from uncomp_cli.serve.prefill import PrefixStore, PromptFeed, start_feed
from uncomp_cli.serve.prompts import Prompt
from uncomp_cli.serve.protocol import ApiError, server_error, shutting_down

log = logging.getLogger(__name__)

#: Prompt tokens fed per forward pass between decode steps (chunked prefill).
DEFAULT_PREFILL_CHUNK = 512

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
    logprobs: int | None = None  # log probabilities asked for: None, or how many alternatives per token
    ignore_eos: bool = False  # the end-of-sequence token is text like any other (vLLM's extension)
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
                 kv_cache_limit: int, context_cache_bytes: int, profile: str | None = None,
                 prefill_chunk: int = DEFAULT_PREFILL_CHUNK, context_dir=None):
        self.loaded = loaded
        self.token_bytes = full_kv_cache_bytes(loaded.model.config, 1, 1, loaded.model.dtype)
        self.metrics = metrics
        self.max_batch, self.max_queue, self.kv_cache_limit = max_batch, max_queue, kv_cache_limit
        self.prefill_chunk = prefill_chunk
        self.profile = profile
        self.store = PrefixStore(context_cache_bytes, context_dir)  # context_dir: a ContextDirectory, or None
        self.eos = set(eos_token_ids(loaded))
        self._profile = None  # the model's UNComp profile, once a request needs it
        self._queue: collections.deque[Job] = collections.deque()
        self._prefilling: collections.deque[Active] = collections.deque()
        self._decoding: list[Active] = []
        self._batch = RaggedBatch(loaded.model)
        self._reserved = 0  # KV bytes the admitted requests may hold
        self._cond = threading.Condition()
        self._stopping = False  # no new requests; the worker ends once the rows are gone
        self._thread = threading.Thread(target=self._loop, name="uncomp-worker", daemon=True)

    # -- the HTTP side ---------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def submit(self, job: Job) -> None:
        with self._cond:
            if self._stopping:
                raise shutting_down()
            waiting = sum(not j.cancelled.is_set() for j in self._queue)
            if waiting >= self.max_queue:
                raise ApiError(f"{waiting} requests are waiting, the most this server queues (--max-queue); "
                               "retry later", status=429, type="rate_limit_error", code="queue_full")
            self._queue.append(job)
            self.metrics.queue_depth.set(len(self._queue))
            self._cond.notify()

    def begin_drain(self) -> None:
        """Take no more requests and fail the waiting ones with 503; running requests go on."""
        with self._cond:
            self._stopping = True
            waiting, self._queue = list(self._queue), collections.deque()
            self.metrics.queue_depth.set(0)
            self._cond.notify_all()
        for job in waiting:
            job.send("error", shutting_down())

    def stop(self, timeout: float = 30.0) -> None:
        """Drain: no new requests, waiting ones fail, running ones get ``timeout`` seconds to finish;
        the rest are then told the server shut down (503) and their rows dropped."""
        self.begin_drain()
        if self._thread.is_alive():
            self._thread.join(timeout)
        with self._cond:
            running = [a.job for a in (*self._prefilling, *self._decoding)]
        for job in running:
            if not job.finished:  # told first: the worker drops a cancelled row without a word
                job.send("error", shutting_down("the server shut down before the answer was finished"))
            job.cancelled.set()
        with self._cond:
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(5.0)
        self.store.close()

    @property
    def stopping(self) -> bool:
        return self._stopping

    # -- the worker thread -----------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cond:
                self._admit()
                if not self._prefilling and not self._decoding:
                    if self._stopping:
                        return
                    self._cond.wait()
                    continue
            if self._prefilling:
                self._prefill_step(self._prefilling[0])
            if self._decoding:
                self._decode_step()
            self._report()

    def _admit(self) -> None:
        """Move waiting jobs into prefill, oldest first, while their KV bytes fit (under the lock)."""
        while self._queue and self._queue[0].cancelled.is_set():
            self._queue.popleft()
        while self._queue and len(self._prefilling) + len(self._decoding) < self.max_batch:
            job = self._queue[0]
            need = self._reservation(job)
            if self._reserved and self._reserved + need > self.kv_cache_limit:
                break  # first come, first served: no later, smaller job jumps the queue
            self._queue.popleft()
            self._reserved += need
            self._prefilling.append(Active(job, RowText(self.loaded.tokenizer, job.stops), need))
        self.metrics.queue_depth.set(len(self._queue))

    def _reservation(self, job: Job) -> int:
        """What a request's cache may hold: its prompt while a chunked prefill keeps every token,
        then its kept tokens, answer and decoding slack (``CachePolicy.held_tokens``)."""
        final = self.token_bytes * job.policy.held_tokens(job.kv_tokens + job.sampling.max_new_tokens)
        prompt = len(job.prompt.ids)
        during = self.token_bytes * prompt if prompt > self.prefill_chunk else 0
        return max(final, during)

    def _prefill_step(self, active: Active) -> None:
        """One chunk of the oldest prefilling request; when its prompt is in, its first token."""
        job = active.job
        if job.cancelled.is_set():
            self._drop(active, prefilling=True)
            return
        try:
            with self._timed("prefill"):
                if active.feed is None:
                    policy = self._resolved(job)
                    active.feed = start_feed(self.loaded.model, policy, job.prompt.ids, self.prefill_chunk,
                                             job.prompt.context_ids, self.store)
                    active.started = time.perf_counter()
                    reused = active.feed.stats.get("context_reused")
                    if reused is not None:
                        self.metrics.context_reuse.labels("hit" if reused else "miss").inc()
                logits = active.feed.advance()
            self.metrics.context_bytes.set(self.store.bytes)
        except Exception as exc:  # one request's failure is not the server's
            error = exc if isinstance(exc, ApiError) else server_error(f"{type(exc).__name__}: {exc}")
            if not isinstance(exc, ApiError):
                log.exception("a prefill failed")
            self._drop(active, prefilling=True, error=error)
            return
        if logits is None:
            return
        feed = active.feed
        row = Row.sampling(job.sampling, logits.device)
        token = int(pick_tokens(logits, job.sampling, row.generator)[0])
        with self._cond:
            self._prefilling.popleft()
            self._reserved += self._reservation_after(active)
        active.served = {"kv_cache_bytes": cache_nbytes(feed.cache), "prefill_seconds":
                         round(time.perf_counter() - active.started, 4)} | feed.stats
        if job.logprobs is not None:
            self._send_logprobs(active, logits[0], token)
        if self._emit(active, token):
            self._release(active)
            return
        self._batch.join(row, feed.cache, feed.total, token)
        self._decoding.append(active)

    def _reservation_after(self, active: Active) -> int:
        """Lower a request's reservation to what it holds once its prompt is in (a delta)."""
        job = active.job
        final = self.token_bytes * job.policy.held_tokens(job.kv_tokens + job.sampling.max_new_tokens)
        delta, active.reserved = final - active.reserved, final
        return delta

    def _decode_step(self) -> None:
        """One token for every row that has its prompt in; rows that end leave."""
        cancelled = [i for i, a in enumerate(self._decoding) if a.job.cancelled.is_set()]
        if cancelled:
            self._leave(cancelled, dropped=True)
        if not self._decoding:
            return
        try:
            with self._timed("decode"):
                tokens = self._batch.step().tolist()
        except Exception as exc:
            log.exception("a decode step failed")
            error = server_error(f"the batch failed: {type(exc).__name__}: {exc}")
            for active in self._decoding:
                active.job.send("error", error)
            self._leave(list(range(len(self._decoding))))
            return
        for i, active in enumerate(self._decoding):
            active.rows_together = max(active.rows_together, len(self._decoding))
            if active.job.logprobs is not None:
                self._send_logprobs(active, self._batch.logits[i], tokens[i])
        self.metrics.batch_size.observe(len(self._decoding))
        self._leave([i for i, (active, token) in enumerate(zip(self._decoding, tokens)) if self._emit(active, token)])

    def _leave(self, indices: list[int], dropped: bool = False) -> None:
        """The rows at ``indices`` of the decoding batch leave it (their cache is freed)."""
        self._batch.remove(indices)
        gone = set(indices)
        for i in sorted(gone):
            if dropped:
                self._decoding[i].job.finished = True
                self.metrics.dropped_rows.inc()
            self._release(self._decoding[i])
        self._decoding = [a for i, a in enumerate(self._decoding) if i not in gone]

    def _drop(self, active: Active, prefilling: bool, error: ApiError | None = None) -> None:
        """A request that leaves while prefilling (cancelled, or its prefill failed)."""
        with self._cond:
            self._prefilling.remove(active)
        if error is not None:
            active.job.send("error", error)
        else:
            active.job.finished = True
            self.metrics.dropped_rows.inc()
        self._release(active)

    def _release(self, active: Active) -> None:
        with self._cond:
            self._reserved -= active.reserved
            self._cond.notify_all()

    def _report(self) -> None:
        rows = len(self._decoding) + len(self._prefilling)
        self.metrics.running.set(rows)
        self.metrics.kv_reserved.set(self._reserved)
        held = sum(cache_nbytes(a.feed.cache, reserved=True) for a in (*self._decoding, *self._prefilling)
                   if a.feed is not None)
        self.metrics.kv_bytes.set(held)

    def _resolved(self, job: Job) -> CachePolicy:
        """The job's policy with the model's profile, loaded once (in this thread: calibrating a
        missing profile runs the model)."""
        if not job.policy.needs_profile:
            return job.policy
        if self._profile is None:
            self._profile = with_profile(job.policy, self.loaded, self.profile).profile
        return job.policy.given(profile=self._profile)

    @contextlib.contextmanager
    def _timed(self, phase: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            if self.loaded.device.type == "cuda":
                torch.cuda.synchronize(self.loaded.device)
            self.metrics.worker_seconds.labels(phase).inc(time.perf_counter() - started)

    def _eos(self, job: Job) -> set[int]:
        """The tokens that end ``job``'s answer: the model's end-of-sequence tokens, unless it ignores them."""
        return set() if job.ignore_eos else self.eos

    def _send_logprobs(self, active: Active, logits: torch.Tensor, token: int) -> None:
        """A row's log probabilities for its new token (none for the end-of-sequence token, which is
        not sent), ahead of the token's text."""
        if token not in self._eos(active.job):
            active.job.send("logprobs", [token_logprobs(logits, token, active.job.logprobs, self.loaded.tokenizer)])

    def _emit(self, active: Active, token: int) -> bool:
        """Send a row's new token to its client; True when the row has ended."""
        job, text = active.job, active.text
        if text.tokens == 0:
            self.metrics.ttft.observe(time.perf_counter() - job.arrived)
        ended = "stop" if token in self._eos(job) else None
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
            job.send("done", ended, text.tokens, job.served | active.served | {"batch_size": active.rows_together})
        return ended is not None


@dataclass
class Active:
    """An admitted request: its text so far, what it reserved, and its prefill."""

    job: Job
    text: RowText
    reserved: int
    feed: PromptFeed | None = None
    started: float = 0.0
    served: dict = field(default_factory=dict)
    rows_together: int = 1  # the most rows it decoded among
