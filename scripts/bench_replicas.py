"""Replicas and the shared context folder, measured against running servers (docs/results.md).

``affinity URL``: documents × questions, interleaved (every document's first question, then every
second question, …), against ``uncomp serve --replicas N``; reports which replica answered each
document and where each follow-up found its document (``context_from``: memory, directory, or a
new prefill).

``store URL_A URL_B``: a document's first question on A (which prefills it and writes it to the
shared ``--context-dir``), then a follow-up on B (which has never seen it) and one on A; reports
each one's time to first token (streamed) and B's as a share of the first.

  python scripts/bench_replicas.py affinity http://127.0.0.1:8000 --haystack ../shared/data/haystack
  python scripts/bench_replicas.py store http://127.0.0.1:8001 http://127.0.0.1:8002 --haystack ../shared/data/haystack
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter, defaultdict
from pathlib import Path

import httpx

QUESTIONS = ["Who is the author?", "What is the main point?", "Name one example the text gives.",
             "What does the text conclude?"]


def documents(haystack: str, count: int, chars: int) -> list[str]:
    text = " ".join(p.read_text() for p in sorted(Path(haystack).glob("*.txt")))
    return [text[i * chars:(i + 1) * chars] for i in range(count)]


def ask(url: str, document: str, question: str, model: str, max_tokens: int) -> dict:
    """One streamed chat request: time to first token, the replica, and the server's ``uncomp`` report."""
    body = {"model": model, "messages": [{"role": "user", "content": document + "\n\n" + question}],
            "max_tokens": max_tokens, "temperature": 0, "stream": True, "ignore_eos": True}
    started = time.perf_counter()
    first = None
    report = {}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=600) as response:
        response.raise_for_status()
        replica = response.headers.get("x-uncomp-replica")
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if first is None and any(c.get("delta", {}).get("content") for c in chunk.get("choices", [])):
                first = time.perf_counter() - started
            report = chunk.get("uncomp", report)
    return {"ttft_s": round(first or time.perf_counter() - started, 4), "replica": replica,
            "context_from": report.get("context_from") if report.get("context_reused") else "prefill",
            "context_tokens": report.get("context_tokens"), "prefill_seconds": report.get("prefill_seconds")}


def model_of(url: str) -> str:
    return httpx.get(url + "/v1/models").json()["data"][0]["id"]


def affinity(args) -> dict:
    docs = documents(args.haystack, args.documents, args.chars)
    model = model_of(args.url)
    replicas: dict[int, set] = defaultdict(set)
    follow_ups: Counter = Counter()
    for turn in range(args.questions):
        for d, document in enumerate(docs):
            answer = ask(args.url, document, QUESTIONS[turn % len(QUESTIONS)], model, args.max_tokens)
            replicas[d].add(answer["replica"])
            if turn:
                follow_ups[answer["context_from"]] += 1
    total = sum(follow_ups.values())
    return {"documents": len(docs), "questions_per_document": args.questions, "follow_ups": dict(follow_ups),
            "memory_hit_share": round(follow_ups["memory"] / total, 4) if total else None,
            "replicas_per_document": {d: sorted(r) for d, r in replicas.items()},
            "documents_per_replica": dict(Counter(next(iter(r)) for r in replicas.values() if len(r) == 1))}


def store(args) -> dict:
    document = documents(args.haystack, 1, args.chars)[0]
    model = model_of(args.url)
    first = ask(args.url, document, QUESTIONS[0], model, args.max_tokens)
    time.sleep(args.settle)  # the first server writes the document's file in the background
    other = ask(args.other_url, document, QUESTIONS[1], model, args.max_tokens)
    same = ask(args.url, document, QUESTIONS[2], model, args.max_tokens)
    return {"first": first, "follow_up_other_server": other, "follow_up_same_server": same,
            "other_over_first": round(other["ttft_s"] / first["ttft_s"], 4),
            "same_over_first": round(same["ttft_s"] / first["ttft_s"], 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    for name in ("affinity", "store"):
        mode = sub.add_parser(name)
        mode.add_argument("url")
        if name == "store":
            mode.add_argument("other_url")
            mode.add_argument("--settle", type=float, default=5.0, help="seconds between the first and the rest")
        mode.add_argument("--haystack", required=True)
        mode.add_argument("--documents", type=int, default=10)
        mode.add_argument("--questions", type=int, default=4)
        mode.add_argument("--chars", type=int, default=16000, help="characters per document (~4k tokens)")
        mode.add_argument("--max-tokens", type=int, default=8)
    args = parser.parse_args()
    print(json.dumps(affinity(args) if args.mode == "affinity" else store(args), indent=1))


if __name__ == "__main__":
    main()
