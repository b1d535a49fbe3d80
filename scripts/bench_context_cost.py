"""What making a compressed context costs, against a full prefill of the same text (issue 22).

For each length and method: a full-cache prefill of the context, then making the compressed
context (`compress_ids`: prefill, re-reading with `--context-scorer reconstruct` or the score
gate's predictions with `--context-scorer gate` (trained before any timing), selection),
alternately, ``--repeats`` times after one warm-up prefill; prints one JSON line per method and
length with the medians, their ratio (``make_context_over_prefill``, as ``uncomp bench
--context-reuse`` reports it), how the making splits into the re-reading and the rest, and the
load average. ``--ops``: also the top operators of one making (torch profiler; slows it down).

  .venv/bin/python scripts/bench_context_cost.py --haystack ../shared/data/haystack --lengths 4k,8k \
      --methods snapkv,uncomp --budget 10%

Runs against whatever ``uncomp_cli`` is on the path, so an older tree (``git archive``) can be
measured with the same script: ``PYTHONPATH=/tmp/before .venv/bin/python scripts/...``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

import uncomp_cli.contexts.compress as compress
from uncomp_cli.bench.measure import PromptSource
from uncomp_cli.bench.results import BenchSettings
from uncomp_cli.bench.runner import resolve_profile, with_profiles
from uncomp_cli.models.loading import load_model
from uncomp_cli.policies.full import FullCachePolicy
from uncomp_cli.units import parse_length


def timed_rereading() -> list[float]:
    """Wrap the re-reading (this tree's or an older one's) to record its seconds."""
    spent: list[float] = []
    name = "reread" if hasattr(compress, "reread") else "_reread"
    original = getattr(compress, name)

    def wrapper(*args, **kwargs):
        started = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            spent.append(time.perf_counter() - started)

    setattr(compress, name, wrapper)
    return spent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--haystack", default=None)
    parser.add_argument("--lengths", default="4k,8k")
    parser.add_argument("--methods", default="snapkv,uncomp")
    parser.add_argument("--budget", default="10%")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--reread-chunk", type=int, default=None, help="context tokens per re-reading chunk")
    parser.add_argument("--forward-chunk", type=int, default=None, help="re-reading tokens per forward pass")
    parser.add_argument("--bfloat16", action="store_true", help="bfloat16 products in the recording (CPU)")
    parser.add_argument("--context-scorer", default="reconstruct", choices=compress.CONTEXT_SCORERS)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda")
    parser.add_argument("--dtype", default="auto", help="auto, float32, bfloat16, float16")
    parser.add_argument("--ops", action="store_true", help="print the top operators of one making")
    args = parser.parse_args()

    if args.reread_chunk is not None or args.forward_chunk is not None:
        from uncomp_cli.contexts import reread as reread_module  # not in older trees

        reread_module.REREAD_CHUNK = args.reread_chunk or reread_module.REREAD_CHUNK
        reread_module.RECONSTRUCT_CHUNK = args.forward_chunk or reread_module.RECONSTRUCT_CHUNK
    if args.bfloat16:
        from uncomp_cli.engine import recording

        recording.BFLOAT16_PRODUCTS = True
    loaded = load_model(args.model, device=args.device, dtype=args.dtype)
    lengths = [parse_length(x) for x in args.lengths.split(",")]
    settings = BenchSettings(methods=args.methods.split(","), lengths=lengths, budgets=[args.budget],
                             haystack=args.haystack, reuse=True)
    cases = settings.cases()[1:]  # not full: it is the reference
    policies = settings.policies()[1:]
    profile, _ = resolve_profile(loaded, settings, policies)
    policies = with_profiles(policies, profile)
    prompts = PromptSource(loaded, settings.seed, settings.haystack)
    if args.context_scorer == "gate":
        from uncomp_cli.contexts.gate import gate_for

        gate_for(loaded)  # trained once and cached: not part of any context's cost
    spent = timed_rereading()
    for length in settings.lengths:
        context = prompts.ids(1, length)[0].tolist()
        compress.compress_ids(loaded, context, FullCachePolicy())  # warm-up
        for case, policy in zip(cases, policies):
            prefills, makings, rereads = [], [], []
            for _ in range(args.repeats):
                started = time.perf_counter()
                compress.compress_ids(loaded, context, FullCachePolicy())
                prefills.append(time.perf_counter() - started)
                spent.clear()
                started = time.perf_counter()
                compress.compress_ids(loaded, context, policy, args.context_scorer)
                makings.append(time.perf_counter() - started)
                rereads.append(sum(spent))
            prefill, making, rereading = (statistics.median(x) for x in (prefills, makings, rereads))
            print(json.dumps({
                "method": case.method, "budget": case.budget, "context_scorer": args.context_scorer, "length": length,
                "threads": torch.get_num_threads(), "device": str(loaded.device), "dtype": str(loaded.dtype),
                "prefill_full_seconds": round(prefill, 3), "compress_seconds": round(making, 3),
                "reread_seconds": round(rereading, 3), "make_context_over_prefill": round(making / prefill, 3),
                "reread_over_prefill": round(rereading / prefill, 3), "load_average": round(os.getloadavg()[0], 2),
            }), flush=True)
            if args.ops:
                from torch.profiler import profile as torch_profile

                with torch_profile() as prof:
                    compress.compress_ids(loaded, context, policy, args.context_scorer)
                print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15), flush=True)


if __name__ == "__main__":
    main()
