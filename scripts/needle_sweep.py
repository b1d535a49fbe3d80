#!/usr/bin/env python
"""Needle-in-a-haystack accuracy of several cache methods and budgets on one model, in one run.

Builds the prompts once (uncomp_cli.eval.needle), then for every method × budget generates greedily
and scores exact match and ROUGE-1 recall. Prints a JSON report on stdout (one row per method ×
budget, plus every prediction) and a progress line per prompt on stderr.

  python scripts/needle_sweep.py --haystack ../shared/data/haystack --lengths 2048,4096 \\
      --budgets 10%,5%,2% --methods full,snapkv,uncomp,uncomp-noprefill [--distractors 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--haystack", required=True)
    parser.add_argument("--lengths", default="2048")
    parser.add_argument("--depths", default="0,0.25,0.5,0.75,1")
    parser.add_argument("--budgets", default="10%,5%,2%")
    parser.add_argument("--methods", default="full,snapkv,uncomp,uncomp-noprefill")
    parser.add_argument("--distractors", type=int, default=0)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--window", type=int, default=None)
    parser.add_argument("--kernel", type=int, default=None)
    parser.add_argument("--profile", default=None)
    args = parser.parse_args()

    from uncomp_cli.eval import needle
    from uncomp_cli.generate import GenerationSettings, eos_token_ids, generate_ids
    from uncomp_cli.models import load_model
    from uncomp_cli.policies import make_policy
    from uncomp_cli.profile_store import profile_for

    loaded = load_model(args.model, device="cpu")
    haystack = needle.load_haystack(args.haystack)
    cases = needle.make_cases([int(x) for x in args.lengths.split(",")],
                              [float(x) for x in args.depths.split(",")], seed=args.seed, distractors=args.distractors)
    prompts = [needle.build_prompt_ids(loaded.tokenizer, haystack, case) for case in cases]
    selection = {k: v for k, v in (("window", args.window), ("kernel", args.kernel)) if v is not None}
    needs_profile = any(m.startswith("uncomp") for m in args.methods.split(","))
    profile = profile_for(loaded, args.profile) if needs_profile else None

    def policy(method: str, budget: str):
        if method == "full":
            return make_policy("full")
        if method.startswith("uncomp"):
            return make_policy("uncomp", profile=profile, budget=budget, prefill_compression=method == "uncomp",
                               uniform_heads=method == "uncomp-uniform", **selection)
        return make_policy(method, budget=budget, **selection)

    runs = [("full", "100%")] if "full" in args.methods.split(",") else []
    runs += [(m, b) for m in args.methods.split(",") if m != "full" for b in args.budgets.split(",")]
    rows, predictions = [], []
    settings = GenerationSettings(max_new_tokens=12)
    for method, budget in runs:
        scores, prefill, kv_ratio = [], [], []
        for case, ids in zip(cases, prompts):
            input_ids = torch.tensor([ids])
            out = generate_ids(loaded.model, input_ids, torch.ones_like(input_ids), settings, eos_token_ids(loaded),
                               policy(method, budget))
            text = loaded.tokenizer.decode(out.tokens[0], skip_special_tokens=True)
            score = needle.score(text, case)
            scores.append(score)
            prefill.append(out.prefill_seconds)
            kv_ratio.append(out.kv_cache_bytes / out.full_kv_cache_bytes)
            predictions.append({"method": method, "budget": budget, "length": case.length, "depth": case.depth,
                                "expected": case.value, "prediction": text, **score})
            print(f"{method} {budget} {case.length} {case.depth}: {text!r} {score}", file=sys.stderr, flush=True)
        rows.append({
            "method": method, "budget": budget, "prompts": len(cases),
            "exact_match": round(100 * sum(s["exact_match"] for s in scores) / len(scores), 1),
            "rouge1_recall": round(100 * sum(s["rouge1_recall"] for s in scores) / len(scores), 1),
            "kv_bytes_vs_full": round(sum(kv_ratio) / len(kv_ratio), 4),
            "prefill_seconds_mean": round(sum(prefill) / len(prefill), 2),
        })
    print(json.dumps({"machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
                      "model": loaded.name, "lengths": args.lengths, "depths": args.depths,
                      "distractors": args.distractors, "seed": args.seed, "selection": selection or "defaults",
                      "time": time.strftime("%Y-%m-%d %H:%M"), "results": rows, "predictions": predictions}, indent=1))


if __name__ == "__main__":
    main()
