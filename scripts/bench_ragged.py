"""What continuous batching's storage costs a decode step: rows that own their caches (ragged)
against one left-padded cache for the whole batch (static), on the same prompts.

    .venv/bin/python scripts/bench_ragged.py --rows 1,4,8,16 --length 1024 --method snapkv@5%

For each row count, the rows' prompts (distinct stretches of the haystack) are prefilled, then
``--steps`` decode steps are timed both ways; ms per step and per token, medians of the steps.
Static batching needs every row to share one method and budget (that is its limit); ragged rows
may differ, so a second ragged line mixes full, snapkv, pyramidkv and uncomp rows. JSON on stdout.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from uncomp_cli.engine.generation import GenerationSettings  # noqa: E402
from uncomp_cli.engine.ragged import RaggedBatch  # noqa: E402
from uncomp_cli.engine.steps import Batch, Row, left_pad, prompt_positions  # noqa: E402
from uncomp_cli.haystack import load_haystack  # noqa: E402
from uncomp_cli.models.loading import load_model  # noqa: E402
from uncomp_cli.policies.registry import make_policy, with_profile  # noqa: E402
from uncomp_cli.serve.prefill import start_feed  # noqa: E402

GREEDY = GenerationSettings(max_new_tokens=1 << 20)
MIX = ("full", "snapkv@5%", "pyramidkv@5%", "uncomp@5%")


def policy_of(spec: str, loaded):
    method, _, budget = spec.partition("@")
    return with_profile(make_policy(method, **({"budget": budget} if budget else {})), loaded)


def timed_steps(step, steps: int) -> list[float]:
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    return times


def static(loaded, policy, prompts: list[list[int]], steps: int) -> list[float]:
    ids, mask = left_pad(prompts, 0, loaded.device)
    with policy.attach(loaded.model, mask) as cache:
        batch = Batch(loaded.model, cache, [Row(GREEDY) for _ in prompts])
        batch.prefill(ids, mask, prompt_positions(mask))
        return timed_steps(batch.step, steps)


def ragged(loaded, policies: list, prompts: list[list[int]], steps: int) -> list[float]:
    batch = RaggedBatch(loaded.model)
    for policy, ids in zip(policies, prompts):
        feed = start_feed(loaded.model, policy, ids, chunk=512)
        while feed.advance() is None:
            pass
        batch.join(Row(GREEDY), feed.cache, feed.total, ids[-1])
    return timed_steps(batch.step, steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--rows", default="1,4,8,16")
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--method", default="snapkv@5%")
    parser.add_argument("--haystack", default=str(REPO.parent / "shared" / "data" / "haystack"))
    args = parser.parse_args()
    torch.manual_seed(0)
    loaded = load_model(args.model, device="cpu")
    text = loaded.tokenizer(load_haystack(args.haystack), add_special_tokens=False)["input_ids"]
    policy = policy_of(args.method, loaded)
    mixed = [policy_of(spec, loaded) for spec in MIX]
    for rows in [int(r) for r in args.rows.split(",")]:
        prompts = [text[i * args.length:(i + 1) * args.length] for i in range(rows)]
        result = {"rows": rows, "length": args.length, "method": args.method}
        for name, times in (("static", static(loaded, policy, prompts, args.steps)),
                            ("ragged", ragged(loaded, [policy] * rows, prompts, args.steps)),
                            ("ragged_mixed", ragged(loaded, [mixed[i % len(mixed)] for i in range(rows)], prompts,
                                                    args.steps))):
            median = statistics.median(times[2:])  # the first steps warm up
            result[f"{name}_ms_per_step"] = round(1000 * median, 2)
            result[f"{name}_ms_per_token"] = round(1000 * median / rows, 2)
        result["ragged_over_static"] = round(result["ragged_ms_per_step"] / result["static_ms_per_step"], 3)
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
