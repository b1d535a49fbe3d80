"""Load benchmark for ``uncomp serve``: what a compressed cache buys a server, measured over HTTP.

    .venv/bin/python scripts/bench_serve.py load  --methods full,uncomp@5% --clients 32 --length 2048 \\
        --max-tokens 128 --kv-cache-limit 256MiB
    .venv/bin/python scripts/bench_serve.py reuse --method uncomp@5% --length 4096
    .venv/bin/python scripts/bench_serve.py soak  --method uncomp@5% --requests 500 --length 1024 --max-tokens 16

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

Prints one JSON object per method on stdout; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

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
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
        raise KeyError(field)

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


def machine() -> dict:
    return {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=["load", "reuse", "soak"])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--methods", default="full,uncomp@5%", help="load: methods (method@budget) to compare")
    parser.add_argument("--method", default="uncomp@5%", help="reuse, soak: the method (method@budget)")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--length", type=int, default=2048, help="document tokens per prompt")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--kv-cache-limit", default="256MiB")
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--requests", type=int, default=500, help="soak: sequential requests")
    parser.add_argument("--haystack", default=str(REPO.parent / "shared" / "data" / "haystack"))
    args = parser.parse_args()
    {"load": run_load, "reuse": run_reuse, "soak": run_soak}[args.mode](args)


if __name__ == "__main__":
    main()
