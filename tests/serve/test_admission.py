"""Admission by KV bytes and the queue limit, on a scheduler whose worker is not started (so what
it would take next can be asked for directly)."""

from __future__ import annotations

import pytest
from serving import MODEL

from uncomp_cli.serve.metrics import ServerMetrics
from uncomp_cli.serve.protocol import ApiError, ChatRequest
from uncomp_cli.serve.server import RequestPlanner, ServeSettings
from uncomp_cli.serve.worker import Scheduler

PROMPT = "hello world, the quick brown fox " * 12


def plan(planner: RequestPlanner, uncomp: dict | None = None, max_tokens: int = 16):
    request = ChatRequest.model_validate({"model": MODEL, "messages": [{"role": "user", "content": PROMPT}],
                                          "max_tokens": max_tokens, "uncomp": uncomp})
    return planner.plan(request, "chat")


def scheduler_for(loaded, settings: ServeSettings) -> tuple[RequestPlanner, Scheduler]:
    planner = RequestPlanner(loaded, settings)
    return planner, Scheduler(loaded, ServerMetrics(), settings.max_batch, settings.max_queue,
                              settings.kv_cache_limit, settings.context_cache_bytes)


def admitted(scheduler: Scheduler) -> list:
    """The jobs the worker would start prefilling now (it is not started: this is its first step)."""
    with scheduler._cond:
        scheduler._admit()
    return [active.job for active in scheduler._prefilling]


def test_a_compressed_cache_admits_as_many_more_rows_as_its_bytes_allow(tiny_loaded):
    settings = ServeSettings(method="full", max_batch=64, reuse_min_tokens=0, served_model_name=MODEL)
    planner, _ = scheduler_for(tiny_loaded, settings)
    full_row = planner.token_bytes * (plan(planner).kv_tokens + 16)  # the full cache: no slack
    settings.kv_cache_limit = 2 * full_row  # two full-cache rows
    planner, scheduler = scheduler_for(tiny_loaded, settings)
    for _ in range(6):
        scheduler.submit(plan(planner))
    assert len(admitted(scheduler)) == 2  # the full cache: two rows fit
    small = {"method": "snapkv", "budget": "10%", "window": 4, "kernel": 3}
    planner, scheduler = scheduler_for(tiny_loaded, settings)
    for _ in range(40):
        scheduler.submit(plan(planner, small))
    row = plan(planner, small)
    fits = settings.kv_cache_limit // (planner.token_bytes * row.policy.held_tokens(row.kv_tokens + 16))
    assert len(admitted(scheduler)) == min(fits, 40) > 2
    assert scheduler._reserved <= settings.kv_cache_limit


def test_requests_of_any_settings_are_admitted_together_in_arrival_order(tiny_loaded):
    settings = ServeSettings(method="full", reuse_min_tokens=0, served_model_name=MODEL)
    planner, scheduler = scheduler_for(tiny_loaded, settings)
    jobs = [plan(planner), plan(planner, {"method": "snapkv", "budget": "50%"}), plan(planner)]
    for job in jobs:
        scheduler.submit(job)
    assert admitted(scheduler) == jobs


def test_a_request_that_does_not_fit_holds_the_queue_until_bytes_are_released(tiny_loaded):
    settings = ServeSettings(method="full", max_batch=64, reuse_min_tokens=0, served_model_name=MODEL)
    planner, _ = scheduler_for(tiny_loaded, settings)
    settings.kv_cache_limit = planner.token_bytes * (plan(planner).kv_tokens + 16)  # one full row
    planner, scheduler = scheduler_for(tiny_loaded, settings)
    first, second = plan(planner), plan(planner, {"method": "snapkv", "budget": "10%", "window": 4, "kernel": 3})
    scheduler.submit(first)
    scheduler.submit(second)
    assert admitted(scheduler) == [first]  # the small one does not jump the queue
    scheduler._release(scheduler._prefilling.popleft())
    assert admitted(scheduler) == [second] and scheduler._reserved > 0


def test_beyond_max_queue_a_request_is_refused_with_429(tiny_loaded):
    settings = ServeSettings(method="full", max_queue=2, reuse_min_tokens=0, served_model_name=MODEL)
    planner, scheduler = scheduler_for(tiny_loaded, settings)
    scheduler.submit(plan(planner))
    scheduler.submit(plan(planner))
    with pytest.raises(ApiError) as caught:
        scheduler.submit(plan(planner))
    assert caught.value.status == 429 and caught.value.type == "rate_limit_error"


def test_a_cancelled_request_waiting_in_the_queue_is_never_run(tiny_loaded):
    settings = ServeSettings(method="full", max_batch=1, reuse_min_tokens=0, served_model_name=MODEL)
    planner, scheduler = scheduler_for(tiny_loaded, settings)
    gone, kept = plan(planner), plan(planner)
    scheduler.submit(gone)
    scheduler.submit(kept)
    gone.cancelled.set()
    assert admitted(scheduler) == [kept]


def test_stopping_fails_the_waiting_requests_with_503(tiny_loaded):
    settings = ServeSettings(method="full", reuse_min_tokens=0, served_model_name=MODEL)
    planner, scheduler = scheduler_for(tiny_loaded, settings)
    events = []
    job = plan(planner)
    job.sink = events.append
    scheduler.submit(job)
    scheduler.stop()
    assert events[0][0] == "error" and events[0][1].status == 503
    with pytest.raises(ApiError, match="shutting down"):
        scheduler.submit(plan(planner))
