"""What ``GET /metrics`` exposes, in Prometheus' text format (prometheus-client), one registry per server."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest

disable_created_metrics()  # no *_created series: they double the output and no dashboard reads them

#: Time-to-first-token buckets (seconds): long prompts on a CPU take tens of seconds.
TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320)


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("uncomp_requests", "Requests answered, by endpoint and outcome.",
                                ["endpoint", "outcome"], registry=r)
        self.prompt_tokens = Counter("uncomp_prompt_tokens", "Prompt tokens of finished requests.", registry=r)
        self.completion_tokens = Counter("uncomp_completion_tokens", "Tokens generated.", registry=r)
        self.queue_depth = Gauge("uncomp_queue_depth", "Requests waiting for the worker.", registry=r)
        self.running = Gauge("uncomp_running_requests", "Requests admitted: prefilling or decoding.", registry=r)
        self.kv_bytes = Gauge("uncomp_kv_cache_bytes",
                              "KV bytes the admitted requests' caches hold: their buffers, with the slack "
                              "decoding writes into.", registry=r)
        self.kv_reserved = Gauge("uncomp_kv_cache_reserved_bytes",
                                 "KV bytes the admitted requests may hold (prompt while a chunked prefill keeps "
                                 "it, then budget, max_tokens and decoding slack).",
                                 registry=r)
        self.context_bytes = Gauge("uncomp_context_store_bytes", "KV bytes of documents kept for reuse (whole).",
                                   registry=r)
        self.context_reuse = Counter("uncomp_context_reuse", "Documents found in the store (hit) or kept anew (miss).",
                                     ["result"], registry=r)
        self.dropped_rows = Counter("uncomp_cancelled_rows", "Rows the worker dropped because their client went away.",
                                    registry=r)
        self.worker_seconds = Counter("uncomp_worker_seconds",
                                      "Worker time by phase: prefill (prompt chunks) and decode (steps).", ["phase"],
                                      registry=r)
        self.ttft = Histogram("uncomp_time_to_first_token_seconds", "From arrival to the first generated token.",
                              buckets=TTFT_BUCKETS, registry=r)
        self.batch_size = Histogram("uncomp_batch_size", "Rows decoded together, per decode step.",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
