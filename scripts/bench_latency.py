"""Two latencies a serving engine owes its users, measured over HTTP on ``uncomp serve``.

    .venv/bin/python scripts/bench_latency.py hol   --method uncomp@5% --long 2048 --long-tokens 160
    .venv/bin/python scripts/bench_latency.py reuse --methods full,uncomp@5% --length 4096

* ``hol`` (head-of-line blocking): a short request (a ~60-token question, 8 new tokens) alone on
  an idle server, then the same request sent while a long one (``--long`` prompt tokens,
  ``--long-tokens`` new tokens) is decoding; the ratio of the two completion times.
* ``reuse``: a ``--length``-token document with a first question, then a second question as a new
  chat turn about the same document: time to first token of each, per method, with prefix reuse on
  (the default) and, for comparison, the first question on a server with reuse off.

Uses ``scripts/bench_serve.py``'s server runner and streaming client; JSON on stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_serve import Server, documents, log, machine, stream_chat  # noqa: E402

SHORT = "In one short sentence: why do people write essays?"
FIRST, SECOND = "What is the main point of the text above?", "Name one person mentioned in the text."


def run_hol(args: argparse.Namespace) -> dict:
    long_text = documents(argparse.Namespace(**{**vars(args), "length": args.long}), 1)[0]
    server = Server(args, args.method, ["--kv-cache-limit", "1GiB"])
    try:
        client = server.client
        stream_chat(client, [{"role": "user", "content": SHORT}], 8)  # warm-up
        alone = [stream_chat(client, [{"role": "user", "content": SHORT}], 8)["seconds"] for _ in range(3)]
        result: dict = {}

        def long_request() -> None:
            result["long"] = stream_chat(client, [{"role": "user", "content": long_text + "\n\nContinue the text."}],
                                         args.long_tokens)

        thread = threading.Thread(target=long_request)
        thread.start()
        while not _decoding(server):
            time.sleep(0.2)
        time.sleep(1.0)  # well into its decoding
        contended = stream_chat(client, [{"role": "user", "content": SHORT}], 8)
        thread.join()
        still_decoding = result["long"]["seconds"] > contended["seconds"]
    finally:
        code = server.stop()
    best = min(alone)
    return {"mode": "hol", "method": args.method, "short_alone_seconds": round(best, 3),
            "short_while_long_decodes_seconds": round(contended["seconds"], 3),
            "ratio": round(contended["seconds"] / best, 2), "long_prompt_tokens": result["long"]["prompt_tokens"],
            "long_completion_tokens": result["long"]["completion_tokens"],
            "long_was_still_decoding": still_decoding, "sigterm_exit": code, **machine()}


def _decoding(server: Server) -> bool:
    """Whether the server has sent a first token (its TTFT histogram counted one beyond the warm-up)."""
    return server.metric("uncomp_time_to_first_token_seconds_count") >= 5


def run_reuse(args: argparse.Namespace) -> list[dict]:
    document = documents(args, 1)[0]
    first = [{"role": "user", "content": document + "\n\n" + FIRST}]
    rows = []
    for method in args.methods.split(","):
        for reuse in (True, False):
            server = Server(args, method, [] if reuse else ["--reuse-min-tokens", "0"])
            try:
                one = stream_chat(server.client, first, 16)
                row = {"mode": "reuse", "method": method, "reuse": reuse, "document_tokens": one["prompt_tokens"],
                       "first_ttft": round(one["ttft"], 3)}
                if reuse:
                    turn = first + [{"role": "assistant", "content": one["text"]},
                                    {"role": "user", "content": SECOND}]
                    two = stream_chat(server.client, turn, 16)
                    row |= {"second_ttft": round(two["ttft"], 3),
                            "second_over_first": round(two["ttft"] / one["ttft"], 4)}
            finally:
                row["sigterm_exit"] = server.stop()
            log(json.dumps(row))
            rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=["hol", "reuse"])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--method", default="uncomp@5%")
    parser.add_argument("--methods", default="full,uncomp@5%")
    parser.add_argument("--long", type=int, default=2048)
    parser.add_argument("--long-tokens", type=int, default=160)
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--haystack", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "haystack"))
    args = parser.parse_args()
    out = run_hol(args) if args.mode == "hol" else run_reuse(args)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
