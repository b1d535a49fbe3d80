#!/usr/bin/env python
"""Prefill time, decode latency and KV bytes of compressed caches vs the full cache, in one run.

For each prompt length: full cache, SnapKV and UNComp (with and without hidden-state pruning) at
one budget, plus the grouped cache with a budget that keeps every token (its prefill minus the
compressed one's is the cost of scoring + selection). Runs alternate between methods, repeats
take medians, and every number is also given as a ratio to the full cache of the same run.

  python scripts/bench_compressed.py --haystack ../shared/data/haystack --lengths 4096,8000 --budget 5%
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--haystack", required=True)
    parser.add_argument("--lengths", default="4096")
    parser.add_argument("--budget", default="5%")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    from uncomp_cli.eval import needle
    from uncomp_cli.generate import GenerationSettings, generate_ids
    from uncomp_cli.models import load_model
    from uncomp_cli.policies import make_policy
    from uncomp_cli.profile_store import profile_for

    loaded = load_model(args.model, device="cpu")
    profile = profile_for(loaded)
    haystack = needle.load_haystack(args.haystack)
    methods = {
        "full": lambda: make_policy("full"),
        "grouped-keep-all": lambda: make_policy("snapkv", budget="100%"),
        "snapkv": lambda: make_policy("snapkv", budget=args.budget),
        "uncomp": lambda: make_policy("uncomp", profile=profile, budget=args.budget),
        "uncomp-noprefill": lambda: make_policy("uncomp", profile=profile, budget=args.budget,
                                                prefill_compression=False),
    }
    report = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
                         f"{torch.get_num_threads()} threads", "model": loaded.name, "budget": args.budget,
              "new_tokens": args.new_tokens, "repeats": args.repeats, "lengths": {}}
    settings = GenerationSettings(max_new_tokens=args.new_tokens)
    for length in (int(x) for x in args.lengths.split(",")):
        case = needle.make_cases([length], [0.5], seed=1)[0]
        ids = torch.tensor([needle.build_prompt_ids(loaded.tokenizer, haystack, case)])
        samples: dict[str, list] = {name: [] for name in methods}
        for _ in range(args.repeats):
            for name, make in methods.items():
                out = generate_ids(loaded.model, ids, torch.ones_like(ids), settings, eos_ids=[], policy=make())
                samples[name].append((out.prefill_seconds, out.decode_seconds / (args.new_tokens - 1),
                                      out.kv_cache_bytes, out.full_kv_cache_bytes))
                print(f"{length} {name}: prefill {out.prefill_seconds:.2f}s", file=sys.stderr, flush=True)
        rows = {}
        for name, runs in samples.items():
            rows[name] = {"prefill_seconds": round(statistics.median(r[0] for r in runs), 3),
                          "decode_seconds_per_token": round(statistics.median(r[1] for r in runs), 4),
                          "prefill_spread": round(max(r[0] for r in runs) - min(r[0] for r in runs), 3),
                          "kv_bytes": runs[0][2], "kv_bytes_vs_full": round(runs[0][2] / runs[0][3], 4)}
        full = rows["full"]
        for row in rows.values():
            row["prefill_vs_full"] = round(row["prefill_seconds"] / full["prefill_seconds"], 3)
            row["decode_latency_vs_full"] = round(row["decode_seconds_per_token"] / full["decode_seconds_per_token"], 3)
        selection = rows["snapkv"]["prefill_seconds"] - rows["grouped-keep-all"]["prefill_seconds"]
        report["lengths"][str(ids.shape[1])] = {
            "methods": rows,
            "selection_overhead_vs_full_prefill": round(selection / full["prefill_seconds"], 3),
        }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
