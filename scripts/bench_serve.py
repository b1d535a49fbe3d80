"""Load benchmark for ``uncomp serve``: what a compressed cache buys a server, measured over HTTP.

    .venv/bin/python scripts/bench_serve.py load  --methods full,uncomp@5% --clients 32 --length 2048 \\
        --max-tokens 128 --kv-cache-limit 256MiB
    .venv/bin/python scripts/bench_serve.py reuse --method uncomp@5% --length 4096
    .venv/bin/python scripts/bench_serve.py soak  --method uncomp@5% --requests 500 --length 1024 --max-tokens 16
    .venv/bin/python scripts/bench_serve.py mixed --methods full,uncomp@5% --requests 40 --rate 0.1 --seed 0
    .venv/bin/python scripts/bench_serve.py mixed --url http://127.0.0.1:8001 --served-model-name bench \\
        --requests 40 --rate 0.1 --seed 0 --server-pid PID        # any OpenAI-compatible server (vLLM)

Each run starts ``uncomp serve`` as its own process on a free port (so the server's memory is its
own), talks to it with the ``openai`` client and stops it with SIGTERM (its exit status is part of
the result). Prompts are distinct stretches of the haystack essays (``--haystack``), cut to
``--length`` tokens with the model's tokenizer, followed by a question; answers are greedy.

* ``load``: every client sends one streamed chat request at once; per method: requests completed
  per minute, output tokens/s, time to first token (p50/p95, from the client), the most requests
  one batch held, the server's peak RSS (VmHWM), the worker's time in prefill and in decoding
  (from /metrics), and the requests lost or malformed. Reuse is off (``--reuse-min-tokens 0``):
  this measures batching.
* ``reuse``: one document, a first question, then a second question as a new chat turn: the time
  to first token of each (prefix reuse on, as by default).
* ``soak``: sequential requests (50 distinct documents of ``--length`` tokens, in turn; reuse off);
  the server's RSS after the warm-up requests (a tenth, at most 50) and at the end.
* ``mixed``: a realistic load that any OpenAI-compatible server can be given (``--url``; loopback
  only), or ``uncomp serve`` started per method as above (reuse off). ``--requests`` streamed chat
  requests arrive as a Poisson process (``--rate`` per second); each draws, from ``--seed``, a
  document length in ``--prompt-tokens`` (200:3500) and an answer length in ``--answer-tokens``
  (16:256), asked as ``max_tokens`` with a question that invites a long answer and no stop
  sequence. ``ignore_eos`` is sent only when the server takes it (``--ignore-eos auto`` asks it
  once; ``uncomp serve`` refuses unknown fields), so the lengths reached are reported beside the
  lengths asked. Reports TTFT and time per output token (p50/p95), output tokens/s over the run,
  requests completed and lost (HTTP errors, timeouts, malformed streams), the most requests held
  at once (the server's running-requests gauge sampled from /metrics, and in flight at the client),
  and the server's RSS (its peak, when its process is known). Bounded: at most ``--requests``,
  nothing sent after ``--time-limit`` seconds, a request given up at that limit.

Prints one JSON object per method on stdout; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import platform
import random
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import openai

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from uncomp_cli.haystack import load_haystack  # noqa: E402

QUESTION = "In one sentence, what is the passage above about?"


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def method_args(spec: str) -> list[str]:
    """``uncomp@5%`` -> ``--method uncomp --budget 5%``; ``full`` -> ``--method full``."""
    method, _, budget = spec.partition("@")
    return ["--method", method] + (["--budget", budget] if budget else [])


class Server:
    """``uncomp serve`` in a child process."""

    def __init__(self, args: argparse.Namespace, method: str, extra: list[str]):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        command = [str(Path(sys.executable).with_name("uncomp")), "serve", "--model", args.model, "--port",
                   str(self.port), "--served-model-name", "bench", *method_args(method), *extra]
        log("$ uncomp " + " ".join(command[1:]))
        self.process = subprocess.Popen(command, stderr=sys.stderr)
        self.url = f"http://127.0.0.1:{self.port}"
        while True:
            if self.process.poll() is not None:
                raise SystemExit(f"the server exited with {self.process.returncode}")
            try:
                if httpx.get(self.url + "/health").status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, timeout=3600)

    def status_kib(self, field: str) -> int:
        return proc_status_kib(self.process.pid, field)

    def metric(self, name: str, label: str = "") -> float:
        text = httpx.get(self.url + "/metrics").text
        return sum(float(line.split()[-1]) for line in text.splitlines()
                   if line.startswith(name) and label in line and line[len(name)] in " {")

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(120)


def documents(args: argparse.Namespace, count: int) -> list[str]:
    """``count`` distinct stretches of the haystack, ``args.length`` tokens each."""
    from uncomp_cli.models.loading import load_model

    tokenizer = load_model(args.model, device="cpu").tokenizer
    ids = tokenizer(load_haystack(args.haystack), add_special_tokens=False)["input_ids"]
    step = max(args.length // 2, 1)
    if len(ids) < step * (count - 1) + args.length:
        step = max((len(ids) - args.length) // max(count - 1, 1), 1)
    return [tokenizer.decode(ids[i * step:i * step + args.length]) for i in range(count)]


def stream_chat(client, messages: list[dict], max_tokens: int) -> dict:
    """One streamed greedy chat request: time to first text, tokens, and how it was served."""
    started = time.perf_counter()
    first = None
    text, usage, served = [], None, None
    stream = client.chat.completions.create(model="bench", messages=messages, max_tokens=max_tokens, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            first = first or time.perf_counter()
            text.append(chunk.choices[0].delta.content)
        if chunk.usage is not None:
            usage, served = chunk.usage, (chunk.model_extra or {}).get("uncomp")
    ended = time.perf_counter()
    if usage is None or served is None:
        raise ValueError("the stream ended without its usage chunk")
    return {"ttft": (first or ended) - started, "seconds": ended - started, "text": "".join(text),
            "completion_tokens": usage.completion_tokens, "prompt_tokens": usage.prompt_tokens,
            "batch_size": served["batch_size"]}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def run_load(args: argparse.Namespace) -> None:
    texts = documents(args, args.clients)
    for method in args.methods.split(","):
        server = Server(args, method, ["--kv-cache-limit", args.kv_cache_limit, "--max-batch", str(args.max_batch),
                                       "--max-queue", str(args.clients), "--reuse-min-tokens", "0"])
        stream_chat(server.client, [{"role": "user", "content": "Hello"}], 4)  # warm-up
        started = time.perf_counter()

        def ask(text: str, server: Server = server):
            try:
                return stream_chat(server.client, [{"role": "user", "content": text + "\n\n" + QUESTION}],
                                   args.max_tokens)
            except Exception as exc:  # counted as lost, with its reason
                return exc

        with ThreadPoolExecutor(args.clients) as pool:
            outcomes = list(pool.map(ask, texts))
        wall = time.perf_counter() - started
        done = [o for o in outcomes if isinstance(o, dict)]
        lost = [f"{type(o).__name__}: {o}" for o in outcomes if not isinstance(o, dict)]
        tokens = sum(o["completion_tokens"] for o in done)
        result = {
            "mode": "load", "method": method, "clients": args.clients, "length": args.length,
            "max_tokens": args.max_tokens, "kv_cache_limit": args.kv_cache_limit, "max_batch": args.max_batch,
            "completed": len(done), "lost": len(lost), "lost_reasons": lost[:3],
            "wall_seconds": round(wall, 2), "requests_per_minute": round(60 * len(done) / wall, 2),
            "output_tokens_per_second": round(tokens / wall, 3), "output_tokens": tokens,
            "mean_prompt_tokens": round(statistics.mean(o["prompt_tokens"] for o in done), 1) if done else None,
            "ttft_p50": round(percentile([o["ttft"] for o in done], 0.5), 2) if done else None,
            "ttft_p95": round(percentile([o["ttft"] for o in done], 0.95), 2) if done else None,
            "most_requests_in_a_batch": max((o["batch_size"] for o in done), default=0),
            "prefill_seconds": round(server.metric("uncomp_worker_seconds_total", 'phase="prefill"'), 2),
            "decode_seconds": round(server.metric("uncomp_worker_seconds_total", 'phase="decode"'), 2),
            "peak_rss_mib": round(server.status_kib("VmHWM") / 1024, 1),
        }
        result["exit_status"] = server.stop()
        print(json.dumps(result | machine()), flush=True)


def run_reuse(args: argparse.Namespace) -> None:
    text = documents(args, 1)[0]
    server = Server(args, args.method, [])
    stream_chat(server.client, [{"role": "user", "content": "Hello"}], 4)  # warm-up
    first_turn = [{"role": "user", "content": text + "\n\n" + QUESTION}]
    one = stream_chat(server.client, first_turn, args.max_tokens)
    second_turn = [*first_turn, {"role": "assistant", "content": one["text"]},
                   {"role": "user", "content": "Name one person or thing the passage mentions."}]
    two = stream_chat(server.client, second_turn, args.max_tokens)
    result = {"mode": "reuse", "method": args.method, "length": args.length,
              "first_ttft": round(one["ttft"], 3), "second_ttft": round(two["ttft"], 3),
              "second_over_first": round(two["ttft"] / one["ttft"], 4),
              "first_prompt_tokens": one["prompt_tokens"], "second_prompt_tokens": two["prompt_tokens"],
              "context_hits": server.metric("uncomp_context_reuse_total", 'result="hit"')}
    result["exit_status"] = server.stop()
    print(json.dumps(result | machine()), flush=True)


def run_soak(args: argparse.Namespace) -> None:
    texts = documents(args, 50)
    server = Server(args, args.method, ["--reuse-min-tokens", "0"])
    args.requests = args.requests or 500
    warm = min(50, args.requests // 10)
    lost = 0
    for i in range(args.requests):
        if i == warm:
            after_warmup = server.status_kib("VmRSS")
        try:
            stream_chat(server.client, [{"role": "user", "content": texts[i % len(texts)] + "\n\n" + QUESTION}],
                        args.max_tokens)
        except Exception:
            lost += 1
    end = server.status_kib("VmRSS")
    result = {"mode": "soak", "method": args.method, "requests": args.requests, "length": args.length,
              "max_tokens": args.max_tokens, "lost": lost, "rss_after_warmup_mib": round(after_warmup / 1024, 1),
              "rss_end_mib": round(end / 1024, 1), "rss_change": round(end / after_warmup - 1, 4),
              "peak_rss_mib": round(server.status_kib("VmHWM") / 1024, 1)}
    result["exit_status"] = server.stop()
    print(json.dumps(result | machine()), flush=True)


# --- mixed: Poisson arrivals, mixed lengths, any OpenAI-compatible server --------------------------------------------

LONG_ANSWER = ("Retell the passage above in full detail, part by part: explain each of its arguments, give its "
               "examples, and say what follows from each. Write several long paragraphs.")
#: Gauges of requests a server holds (admitted: prefilling or decoding), by server.
RUNNING_GAUGES = ("uncomp_running_requests", "uncomp_running_rows", "vllm:num_requests_running")


@dataclass(frozen=True)
class Planned:
    """One request of the workload: when it is sent and how long its document and answer are."""

    index: int
    arrival: float  # seconds after the first request
    prompt_tokens: int  # document tokens (the question and the chat template come on top)
    max_tokens: int


def plan_workload(count: int, rate: float, seed: int, prompt_range: tuple[int, int] = (200, 3500),
                  answer_range: tuple[int, int] = (16, 256)) -> list[Planned]:
    """``count`` requests arriving as a Poisson process of ``rate`` per second (the first at 0), with
    lengths drawn uniformly from the ranges (inclusive). The lengths do not depend on ``rate``."""
    lengths, gaps = random.Random(seed), random.Random(f"arrivals-{seed}")
    plan, arrival = [], 0.0
    for index in range(count):
        plan.append(Planned(index, arrival, lengths.randint(*prompt_range), lengths.randint(*answer_range)))
        arrival += gaps.expovariate(rate)
    return plan


def spans(total: int, lengths: list[int]) -> list[tuple[int, int]]:
    """Consecutive ``[start, end)`` stretches of a ``total``-token text, one per length: distinct
    while their sum fits in the text; past it they wrap round, shifted, so they still differ."""
    if max(lengths, default=0) > total:
        raise SystemExit(f"the haystack has {total} tokens, fewer than a prompt's {max(lengths)}")
    out, position = [], 0
    for length in lengths:
        start = position % (total - length + 1)
        out.append((start, start + length))
        position += length
    return out


def mixed_prompts(args: argparse.Namespace, plan: list[Planned]) -> list[str]:
    """Each planned request's user message: its stretch of the essays (cut with the model's
    tokenizer; no weights are loaded) and a question that invites a long answer."""
    from transformers import AutoTokenizer

    from uncomp_cli.models.loading import convert_gguf, resolve_model

    source = resolve_model(args.model)
    folder = convert_gguf(source) if source.kind in ("embedded", "gguf") else source.location
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = tokenizer(load_haystack(args.haystack), add_special_tokens=False)["input_ids"]
    return [tokenizer.decode(ids[start:end]) + "\n\n" + LONG_ANSWER
            for start, end in spans(len(ids), [p.prompt_tokens for p in plan])]


class MalformedStream(ValueError):
    """A stream that does not keep to OpenAI's format: bad JSON, no finish_reason, no ``[DONE]``."""


class RequestFailed(RuntimeError):
    """An HTTP error status, or an error event inside the stream."""


def read_stream(lines: Iterable[tuple[float, str]]) -> dict:
    """Read a chat-completion event stream given as ``(arrival time, line)`` pairs.

    Returns the times of the first and last chunks carrying text, the completion and prompt tokens
    (from the usage chunk; without one, the text chunks are counted), the finish reason, and
    ``batch_size`` from uncomp's ``uncomp`` field when the server sends it (else None)."""
    first = last = None
    chunks, finish, usage, batch_size, done = 0, None, None, None, False
    for at, line in lines:
        if not line.startswith("data:"):
            continue  # blank separators, comments, event names
        data = line[5:].strip()
        if data == "[DONE]":
            done = True
            break
        try:
            event = json.loads(data)
        except json.JSONDecodeError:
            raise MalformedStream(f"not JSON: {data[:80]!r}") from None
        if not isinstance(event, dict):
            raise MalformedStream(f"not an object: {data[:80]!r}")
        if "error" in event:
            raise RequestFailed(f"error event: {json.dumps(event['error'])[:200]}")
        for choice in event.get("choices") or []:
            if (choice.get("delta") or {}).get("content"):
                first, last, chunks = first or at, at, chunks + 1
            finish = choice.get("finish_reason") or finish
        usage = event.get("usage") or usage
        batch_size = (event.get("uncomp") or {}).get("batch_size", batch_size)
    if not done:
        raise MalformedStream("the stream ended without [DONE]")
    if finish is None:
        raise MalformedStream("no chunk carried a finish_reason")
    return {"first": first, "last": last, "finish_reason": finish, "batch_size": batch_size,
            "completion_tokens": usage["completion_tokens"] if usage else chunks,
            "prompt_tokens": usage["prompt_tokens"] if usage else None, "usage": usage is not None}


def chat_body(model: str, text: str, max_tokens: int, ignore_eos: bool) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    return body | ({"ignore_eos": True} if ignore_eos else {})


def send(client: httpx.Client, url: str, body: dict, deadline: float) -> dict:
    """One streamed request; its outcome from :func:`read_stream` with the time it was sent."""
    sent = time.perf_counter()
    with client.stream("POST", url + "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            raise RequestFailed(f"HTTP {response.status_code}: {response.read().decode(errors='replace')[:200]}")

        def timed() -> Iterator[tuple[float, str]]:
            for line in response.iter_lines():
                now = time.perf_counter()
                if now > deadline:
                    raise TimeoutError("the run's time limit")
                yield now, line

        return read_stream(timed()) | {"sent": sent}


def lost_kind(exc: BaseException) -> str:
    """How a lost request is counted: timeout, malformed (stream) or error (HTTP, connection)."""
    if isinstance(exc, (TimeoutError, httpx.TimeoutException)):
        return "timeout"
    return "malformed" if isinstance(exc, MalformedStream) else "error"


def takes_ignore_eos(client: httpx.Client, url: str, model: str) -> bool:
    """Whether the server takes ``ignore_eos`` (a 400 means it refuses the field)."""
    body = chat_body(model, "Hello", 2, ignore_eos=True) | {"stream": False}
    body.pop("stream_options")
    return client.post(url + "/v1/chat/completions", json=body).status_code == 200


class InFlight:
    """Requests sent and not yet answered, at the client; the most at once."""

    def __init__(self) -> None:
        self.now = self.most = 0
        self._lock = threading.Lock()

    def __enter__(self) -> None:
        with self._lock:
            self.now += 1
            self.most = max(self.most, self.now)

    def __exit__(self, *exc) -> None:
        with self._lock:
            self.now -= 1


def running_requests(metrics_text: str) -> tuple[str, float] | None:
    """The first of :data:`RUNNING_GAUGES` that a Prometheus text exposes, summed over its labels."""
    for name in RUNNING_GAUGES:
        values = [float(line.split()[-1]) for line in metrics_text.splitlines()
                  if line.startswith(name) and line[len(name):len(name) + 1] in (" ", "{")]
        if values:
            return name, sum(values)
    return None


def worker_seconds(metrics_text: str) -> dict | None:
    """uncomp's worker time by phase (``uncomp_worker_seconds_total{phase=...}``), when the server has it."""
    phases = {}
    for line in metrics_text.splitlines():
        if line.startswith("uncomp_worker_seconds_total{") and 'phase="' in line:
            phase = line.split('phase="', 1)[1].split('"', 1)[0]
            phases[phase] = round(phases.get(phase, 0.0) + float(line.split()[-1]), 2)
    return phases or None


def tree_rss_kib(pid: int) -> int:
    """Resident memory of a process and all its descendants (vLLM runs its engine in a child)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    total, todo = 0, [pid]
    while todo:
        current = todo.pop()
        todo.extend(children.get(current, []))
        try:
            total += proc_status_kib(current, "VmRSS")
        except (OSError, KeyError):
            pass  # gone, or a kernel thread
    return total


def proc_status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


class Sampler(threading.Thread):
    """Every ``every`` seconds while the run goes: the server's running-requests gauge (when its
    /metrics has one) and the RSS of its process tree (when its pid is known); keeps the most."""

    def __init__(self, url: str, pid: int | None, every: float = 0.5):
        super().__init__(daemon=True)
        self.url, self.pid, self.every = url, pid, every
        self.gauge, self.most_running, self.most_rss_kib = None, None, None
        self._done = threading.Event()

    def run(self) -> None:
        with httpx.Client(timeout=5) as client:
            while not self._done.is_set():
                self.sample(client)
                self._done.wait(self.every)

    def sample(self, client: httpx.Client) -> None:
        try:
            found = running_requests(client.get(self.url + "/metrics").text)
        except httpx.HTTPError:
            found = None
        if found:
            self.gauge, value = found
            self.most_running = max(self.most_running or 0, value)
        if self.pid:
            self.most_rss_kib = max(self.most_rss_kib or 0, tree_rss_kib(self.pid))

    def stop(self) -> None:
        self._done.set()
        self.join()


def run_workload(url: str, model: str, plan: list[Planned], prompts: list[str], ignore_eos: bool,
                 time_limit: float, request_timeout: float) -> tuple[list, float, int]:
    """Send each request at its arrival time, each on its own thread; nothing is sent after
    ``time_limit`` seconds and a request still streaming then is given up. Returns each sent
    request's outcome (a dict, or the exception that lost it), the wall time and the most in flight."""
    in_flight = InFlight()
    timeout = httpx.Timeout(request_timeout, connect=10)
    with httpx.Client(timeout=timeout, limits=httpx.Limits(max_connections=len(plan) + 1)) as client, \
            ThreadPoolExecutor(max(len(plan), 1)) as pool:
        started = time.perf_counter()
        deadline = started + time_limit

        def one(planned: Planned, text: str):
            with in_flight:
                try:
                    return send(client, url, chat_body(model, text, planned.max_tokens, ignore_eos), deadline)
                except Exception as exc:  # counted as lost, with its reason
                    return exc

        futures = []
        for planned, text in zip(plan, prompts):
            if planned.arrival > time_limit:
                break
            time.sleep(max(0.0, started + planned.arrival - time.perf_counter()))
            futures.append(pool.submit(one, planned, text))
            log(f"sent {planned.index + 1}/{len(plan)} at {planned.arrival:.1f} s: "
                f"{planned.prompt_tokens} + {planned.max_tokens} tokens")
        outcomes = [future.result() for future in futures]
    return outcomes, time.perf_counter() - started, in_flight.most


def ttft(outcome: dict) -> float:
    """Time to first token: from sending to the first chunk carrying text (the end, without one)."""
    return (outcome["first"] or outcome["last"] or outcome["sent"]) - outcome["sent"]


def tpot(outcome: dict) -> float | None:
    """Time per output token after the first: (last token's time - first's) / (tokens - 1)."""
    tokens = outcome["completion_tokens"]
    if tokens < 2 or outcome["first"] is None:
        return None
    return (outcome["last"] - outcome["first"]) / (tokens - 1)


def quantiles(values: list[float], name: str, digits: int = 3) -> dict:
    """``{name}_p50`` and ``{name}_p95`` (None without values)."""
    return {f"{name}_p{round(q * 100)}": round(percentile(values, q), digits) if values else None
            for q in (0.5, 0.95)}


def answer_lengths(plan: list[Planned], outcomes: list) -> dict:
    """The answer lengths asked and reached, over the completed requests."""
    done = [(p, o) for p, o in zip(plan, outcomes) if isinstance(o, dict)]
    asked = sum(p.max_tokens for p, _ in done)
    got = sum(o["completion_tokens"] for _, o in done)
    return {"answer_tokens_asked": asked, "output_tokens": got,
            "reached_max_tokens": sum(o["completion_tokens"] >= p.max_tokens for p, o in done),
            "finish_reasons": dict(Counter(o["finish_reason"] for _, o in done)),
            "output_over_asked": round(got / asked, 3) if asked else None}


def lost_requests(plan: list[Planned], outcomes: list) -> dict:
    lost = [o for o in outcomes if not isinstance(o, dict)]
    return {"lost": len(lost), "lost_by_kind": dict(Counter(lost_kind(o) for o in lost)),
            "lost_reasons": [f"{type(o).__name__}: {o}"[:200] for o in lost[:3]],
            "not_sent": len(plan) - len(outcomes)}


def summarise(plan: list[Planned], outcomes: list, wall: float) -> dict:
    """The measures of one run over the sent requests' outcomes."""
    done = [o for o in outcomes if isinstance(o, dict)]
    tokens = sum(o["completion_tokens"] for o in done)
    prompts = [o["prompt_tokens"] for o in done if o["prompt_tokens"] is not None]
    return {
        "requests": len(plan), "completed": len(done), **lost_requests(plan, outcomes),
        "wall_seconds": round(wall, 2), "output_tokens_per_second": round(tokens / wall, 3) if wall else None,
        "requests_per_minute": round(60 * len(done) / wall, 2) if wall else None,
        **quantiles([ttft(o) for o in done], "ttft"),
        **quantiles([t for t in map(tpot, done) if t is not None], "tpot", 4),
        **answer_lengths(plan, outcomes),
        "mean_prompt_tokens": round(statistics.mean(prompts), 1) if prompts else None,
        "usage_reported": all(o["usage"] for o in done),
    }


def check_loopback(url: str) -> str:
    """The URL without a trailing slash, if its host is this machine; the benchmark loads only local servers."""
    host = urlsplit(url).hostname or ""
    try:
        local = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        local = False
    if not local:
        raise SystemExit(f"--url must be a loopback address (127.0.0.1, ::1, localhost), not {host!r}")
    return url.rstrip("/").removesuffix("/v1")


def mixed_target(args: argparse.Namespace, url: str, model: str, pid: int | None, plan: list[Planned],
                 prompts: list[str]) -> dict:
    """Warm the server up, run the workload against it and measure; the JSON of one target."""
    with httpx.Client(timeout=600) as client:
        send(client, url, chat_body(model, "Hello", 4, ignore_eos=False), time.perf_counter() + 600)  # warm-up
        ignore_eos = args.ignore_eos == "on" or (args.ignore_eos == "auto" and takes_ignore_eos(client, url, model))
    log(f"{url}: {len(plan)} requests at {args.rate}/s, ignore_eos {'sent' if ignore_eos else 'not sent'}")
    sampler = Sampler(url, pid, args.sample_every)
    load_before = os.getloadavg()[0]
    sampler.start()
    try:
        outcomes, wall, most_in_flight = run_workload(url, model, plan, prompts, ignore_eos, args.time_limit,
                                                      args.request_timeout)
    finally:
        sampler.stop()
    try:
        phases = worker_seconds(httpx.get(url + "/metrics", timeout=10).text)
    except httpx.HTTPError:
        phases = None
    done = [o for o in outcomes if isinstance(o, dict)]
    batch_sizes = [o["batch_size"] for o in done if o["batch_size"] is not None]
    return {
        "mode": "mixed", "url": url, "rate": args.rate, "seed": args.seed, "prompt_tokens_range": args.prompt_tokens,
        "answer_tokens_range": args.answer_tokens, "ignore_eos": ignore_eos, **summarise(plan, outcomes, wall),
        "most_requests_in_flight_client": most_in_flight,
        "most_requests_running_server": sampler.most_running, "running_gauge": sampler.gauge,
        "running_sampled_every_seconds": args.sample_every,
        "most_requests_decoded_together": max(batch_sizes) if batch_sizes else None,
        "worker_seconds": phases,
        "peak_rss_mib": round(proc_status_kib(pid, "VmHWM") / 1024, 1) if pid else None,
        "server_tree_rss_max_mib": round(sampler.most_rss_kib / 1024, 1) if sampler.most_rss_kib else None,
        "load_average_1min_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }


def length_range(text: str) -> tuple[int, int]:
    """``LOW:HIGH`` (or one number) -> ``(low, high)``."""
    low, _, high = text.partition(":")
    try:
        low, high = int(low), int(high or low)
    except ValueError:
        low = high = 0
    if not 1 <= low <= high:
        raise argparse.ArgumentTypeError(f"expected LOW:HIGH with 1 <= LOW <= HIGH, not {text!r}")
    return low, high


def run_mixed(args: argparse.Namespace) -> None:
    count = args.requests or 40
    plan = plan_workload(count, args.rate, args.seed, args.prompt_tokens, args.answer_tokens)
    prompts = mixed_prompts(args, plan)
    if args.url:
        result = mixed_target(args, check_loopback(args.url), args.served_model_name, args.server_pid, plan, prompts)
        print(json.dumps(result | {"server": "external"} | machine()), flush=True)
        return
    for method in args.methods.split(","):
        server = Server(args, method, ["--kv-cache-limit", args.kv_cache_limit, "--max-batch", str(args.max_batch),
                                       "--max-queue", str(count), "--reuse-min-tokens", "0"])
        try:
            result = mixed_target(args, server.url, "bench", server.process.pid, plan, prompts)
            result |= {"server": "uncomp serve", "method": method, "kv_cache_limit": args.kv_cache_limit,
                       "max_batch": args.max_batch}
        finally:
            status = server.stop()
        print(json.dumps(result | {"exit_status": status} | machine()), flush=True)


def machine() -> dict:
    return {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=["load", "reuse", "soak", "mixed"])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--methods", default="full,uncomp@5%", help="load, mixed: methods (method@budget) to compare")
    parser.add_argument("--method", default="uncomp@5%", help="reuse, soak: the method (method@budget)")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--length", type=int, default=2048, help="document tokens per prompt")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--kv-cache-limit", default="256MiB")
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--requests", type=int, help="soak: sequential requests (500); mixed: requests (40)")
    parser.add_argument("--haystack", default=str(REPO.parent / "shared" / "data" / "haystack"))
    mixed = parser.add_argument_group("mixed")
    mixed.add_argument("--url", help="an OpenAI-compatible server to load (loopback only) instead of uncomp serve")
    mixed.add_argument("--served-model-name", default="bench", help="the model id that server answers to")
    mixed.add_argument("--server-pid", type=int, help="that server's process: its RSS is reported")
    mixed.add_argument("--rate", type=float, default=0.1, help="mean arrivals per second (Poisson)")
    mixed.add_argument("--seed", type=int, default=0)
    mixed.add_argument("--prompt-tokens", type=length_range, default=(200, 3500), help="document tokens, LOW:HIGH, "
                       "uniform (200:3500)")
    mixed.add_argument("--answer-tokens", type=length_range, default=(16, 256), help="max_tokens, LOW:HIGH, "
                       "uniform (16:256)")
    mixed.add_argument("--ignore-eos", choices=["auto", "on", "off"], default="auto",
                       help="send ignore_eos (auto: if the server takes it)")
    mixed.add_argument("--time-limit", type=float, default=900, help="seconds: nothing sent nor awaited after it")
    mixed.add_argument("--request-timeout", type=float, default=300, help="seconds without a byte: lost")
    mixed.add_argument("--sample-every", type=float, default=0.5, help="seconds between /metrics and RSS samples")
    args = parser.parse_args()
    {"load": run_load, "reuse": run_reuse, "soak": run_soak, "mixed": run_mixed}[args.mode](args)


if __name__ == "__main__":
    main()
