#!/usr/bin/env python
"""Loading and decode-speed measurements for `uncomp generate` on the embedded default model.

Measures, in one run on this machine:
  * first GGUF conversion time (into a fresh temporary cache) and load time from the cache, the
    latter in a fresh process so imports count;
  * greedy decode speed of uncomp's loop vs plain ``model.generate`` on the same prompt, the same
    number of new tokens, alternating runs, medians; ratio > 1 means uncomp is faster.
Prints one JSON object on stdout. Usage: python scripts/bench_generate.py [--tokens 64] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=64, help="new tokens per run")
    parser.add_argument("--prompt-tokens", type=int, default=1024, help="approximate prompt length")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    from uncomp_cli.engine.generation import GenerationSettings, generate_ids, prompt_positions  # noqa: F401
    from uncomp_cli.models.loading import load_model

    report: dict = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
                    "threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory() as cache:
        os.environ["UNCOMP_CACHE"] = cache
        started = time.perf_counter()
        loaded = load_model(None, device="cpu")
        report["first_conversion_seconds"] = round(time.perf_counter() - started, 2)
        probe = ("import time; t = time.perf_counter(); import torch, transformers; "
                 "from uncomp_cli.models.loading import load_model; i = time.perf_counter(); "
                 "load_model(None, device='cpu'); print(i - t, time.perf_counter() - i)")
        runs = [subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                               env=os.environ).stdout.split() for _ in range(3)]
        report["import_seconds_median"] = round(statistics.median(float(r[0]) for r in runs), 2)
        report["load_from_cache_seconds_median"] = round(statistics.median(float(r[1]) for r in runs), 2)

    model, tok = loaded.model, loaded.tokenizer
    sentence = "The quick brown fox jumps over the lazy dog while the river keeps flowing to the sea. "
    text = sentence * (args.prompt_tokens // len(tok(sentence)["input_ids"]))
    ids = tok.apply_chat_template([{"role": "user", "content": text + "\nContinue the story."}],
                                  add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if not isinstance(ids, list) else ids
    input_ids = torch.tensor([ids])
    mask = torch.ones_like(input_ids)
    settings = GenerationSettings(max_new_tokens=args.tokens)

    def ours() -> tuple[float, float]:
        out = generate_ids(model, input_ids, mask, settings, eos_ids=[])
        assert len(out.tokens[0]) == args.tokens
        return out.prefill_seconds + out.decode_seconds, (args.tokens - 1) / out.decode_seconds

    def reference(new: int) -> float:
        started = time.perf_counter()
        model.generate(input_ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                       do_sample=False, pad_token_id=tok.eos_token_id)
        return time.perf_counter() - started

    ours(), reference(args.tokens)  # warm-up
    our_total, our_tps, ref_total, ref_tps = [], [], [], []
    for _ in range(args.repeats):
        total, tps = ours()
        our_total.append(total)
        our_tps.append(tps)
        prefill_only = reference(1)
        full = reference(args.tokens)
        ref_total.append(full)
        ref_tps.append((args.tokens - 1) / max(full - prefill_only, 1e-9))
    report.update({
        "prompt_tokens": len(ids),
        "new_tokens": args.tokens,
        "uncomp_decode_tokens_per_second": round(statistics.median(our_tps), 2),
        "model_generate_decode_tokens_per_second": round(statistics.median(ref_tps), 2),
        "decode_speed_ratio": round(statistics.median(our_tps) / statistics.median(ref_tps), 3),
        "end_to_end_ratio": round(statistics.median(ref_total) / statistics.median(our_total), 3),
    })
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
