#!/usr/bin/env python
"""Cost of SnapKV-style scoring and selection against a full prefill, measured in one run.

End-to-end prefill times on a shared CPU swing by 15–30 % between repeats, more than the
selection costs, so ``uncomp bench`` cannot resolve it. This script times the selection work
itself on the model's real shapes — per layer: the last ``window`` queries' attention over all keys
(:func:`window_attention`), the pooled per-KV-head scores, top-k, and gathering the kept K/V —
× the number of layers, and divides by the median full prefill of the same prompt length.

  python scripts/bench_selection.py --length 4096 --budget 5% --repeats 5 [--pooling max]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from uncomp_cli.defaults import DEFAULT_POOLING
from uncomp_cli.engine.selection import POOLINGS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--budget", default="5%")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--pooling", choices=POOLINGS, default=DEFAULT_POOLING)
    args = parser.parse_args()

    from uncomp_cli.engine.selection import SnapKVScorer, resolve_budget, select_tokens, window_attention
    from uncomp_cli.models.loading import load_model

    loaded = load_model(args.model, device="cpu")
    config = loaded.model.config
    layers, heads, kv_heads = config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads
    dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    scorer = SnapKVScorer(pooling=args.pooling)
    budget = resolve_budget(args.budget, args.length, scorer.window)
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(1, heads, args.length, dim, generator=generator)
    keys = torch.randn(1, kv_heads, args.length, dim, generator=generator)
    values = torch.randn(1, kv_heads, args.length, dim, generator=generator)
    ids = torch.randint(0, config.vocab_size, (1, args.length), generator=generator)

    def select_once() -> None:
        probs = window_attention(query[:, :, -scorer.window:], keys, None, dim ** -0.5)
        scores = scorer.score(probs, None, kv_heads)
        index = select_tokens(scores, budget, scorer.window)[..., None].expand(-1, -1, -1, dim)
        keys.gather(2, index), values.gather(2, index)

    def prefill_once() -> None:
        with torch.inference_mode():
            loaded.model(input_ids=ids, use_cache=False, logits_to_keep=1)

    def timed(fn, count: int = 1) -> float:
        start = time.perf_counter()
        for _ in range(count):
            fn()
        return time.perf_counter() - start

    select_once(), prefill_once()  # warm-up
    selection, prefill = [], []
    for _ in range(args.repeats):  # alternate, so drifts in machine load hit both
        selection.append(timed(select_once, layers))
        prefill.append(timed(prefill_once))
    sel, pre = statistics.median(selection), statistics.median(prefill)
    print(json.dumps({
        "model": loaded.name, "length": args.length, "budget": args.budget, "budget_tokens": budget,
        "pooling": args.pooling,
        "layers": layers, "repeats": args.repeats, "threads": torch.get_num_threads(),
        "selection_seconds_all_layers": round(sel, 4), "full_prefill_seconds": round(pre, 3),
        "selection_share_of_prefill": round(sel / pre, 4),
        "selection_spread": round((max(selection) - min(selection)) / sel, 3),
        "prefill_spread": round((max(prefill) - min(prefill)) / pre, 3),
    }, indent=1))


if __name__ == "__main__":
    main()
