"""Where a decode step's time goes, per method: the torch profiler's top operators.

    .venv/bin/python scripts/profile_decode.py [--length 4000] [--steps 24] [--methods full,uncomp@5%,snapkv@100%]

Prefills ``--length`` tokens of the haystack essays under each method, decodes 4 warm-up steps,
then profiles ``--steps`` more. Prints, per method, the mean time per token and the operators that
took the most of it (self CPU time per token). Written to decide what a faster decode path must
remove: copies of the cache (``aten::cat``), attention, or the model's own matrix products.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from uncomp_cli.engine.steps import forward_last, prompt_positions  # noqa: E402
from uncomp_cli.haystack import load_haystack  # noqa: E402
from uncomp_cli.models.loading import load_model  # noqa: E402
from uncomp_cli.policies.registry import make_policy, with_profile  # noqa: E402


def decode_steps(model, token, mask, position, cache, steps: int):
    """Feed ``token`` ``steps`` times at the next positions (what is decoded does not matter here)."""
    for _ in range(steps):
        mask = torch.cat([mask, torch.ones(1, 1, dtype=mask.dtype)], dim=-1)
        forward_last(model, token, mask, position, cache)
        position = position + 1
    return mask, position


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--length", type=int, default=4000)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--methods", default="full,uncomp@5%,snapkv@100%")
    parser.add_argument("--haystack", default=str(REPO.parent / "shared" / "data" / "haystack"))
    args = parser.parse_args()
    loaded = load_model(args.model, device="cpu")
    ids = loaded.tokenizer(load_haystack(args.haystack), add_special_tokens=False)["input_ids"][: args.length]
    prompt = torch.tensor([ids])
    for spec in args.methods.split(","):
        method, _, budget = spec.partition("@")
        policy = with_profile(make_policy(method, **({"budget": budget} if budget else {})), loaded)
        mask = torch.ones_like(prompt)
        with torch.inference_mode(), policy.attach(loaded.model, mask) as cache:
            token = forward_last(loaded.model, prompt, mask, prompt_positions(mask), cache).argmax(-1, keepdim=True)
            position = torch.tensor([[len(ids)]])
            mask, position = decode_steps(loaded.model, token, mask, position, cache, 4)  # warm-up
            with torch.profiler.profile() as profile:
                started = time.perf_counter()
                decode_steps(loaded.model, token, mask, position, cache, args.steps)
                per_token = (time.perf_counter() - started) / args.steps
        top = sorted(profile.key_averages(), key=lambda e: -e.self_cpu_time_total)[:6]
        print(json.dumps({"method": spec, "length": args.length, "ms_per_token": round(per_token * 1000, 1),
                          "top_ops_ms_per_token": {e.key: round(e.self_cpu_time_total / args.steps / 1000, 1)
                                                   for e in top}}), flush=True)


if __name__ == "__main__":
    main()
