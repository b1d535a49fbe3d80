"""Benchmark: calibration vs bare forward passes over the same tokens; time and peak memory.

    .venv/bin/python scripts/bench_calibrate.py [--model M] [--samples 8] [--seq-len 2048] [--rounds 2]

One process loads the model once, warms up, then alternates a bare pass over all windows (the
same ``model(input_ids, use_cache=False, logits_to_keep=1)`` call calibration makes, with stock
SDPA) and a full calibration, ``--rounds`` times each. Times (wall clock and process CPU) are the
fastest round of each (others may be using the CPU); the time spent inside the entropy
computation is also reported on its own. Memory: Linux resets the process's peak RSS (VmHWM)
before each phase via /proc/self/clear_refs, so each phase's peak is its own. Prints one JSON
object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import uncomp_cli.profile.calibrate as calibrate_module  # noqa: E402
from uncomp_cli.models.loading import load_model  # noqa: E402
from uncomp_cli.profile.calibrate import calibrate  # noqa: E402
from uncomp_cli.profile.calibration_text import builtin_texts, read_texts, token_windows  # noqa: E402
from uncomp_cli.profile.file import ModelShape  # noqa: E402

MIB = 1024 * 1024


def status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def phase(run) -> dict:
    """Run ``run()``; return wall and CPU seconds, RSS before, and the peak RSS during it (MiB)."""
    before = status_kib("VmRSS")
    reset_peak()
    started, cpu_started = time.perf_counter(), time.process_time()
    run()
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    return {
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "rss_before_mib": before / 1024,
        "peak_mib": status_kib("VmHWM") / 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--data", nargs="*", default=None, help="default: the built-in source")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    loaded = load_model(args.model, device="cpu", dtype="float32")
    model = loaded.model
    text = read_texts(args.data) if args.data else builtin_texts(args.samples * args.seq_len, loaded.tokenizer)
    windows = token_windows(text, loaded.tokenizer, args.samples, args.seq_len)
    shape = ModelShape.from_config(model.config)
    rss_loaded = status_kib("VmRSS") / 1024

    def bare() -> None:
        with torch.inference_mode():
            for window in windows.input_ids:
                model(input_ids=window[None], use_cache=False, logits_to_keep=1)

    # time spent inside the entropy computation itself: immune to other processes slowing the forward
    entropy_seconds = [0.0]
    measure_entropy = calibrate_module.normalized_truncated_entropy

    def timed_entropy(states: torch.Tensor, rank_k: int) -> torch.Tensor:
        started = time.perf_counter()
        try:
            return measure_entropy(states, rank_k)
        finally:
            entropy_seconds[0] += time.perf_counter() - started

    calibrate_module.normalized_truncated_entropy = timed_entropy
    profile = None

    def calibrated() -> None:
        nonlocal profile
        profile = calibrate(model, windows, model_name=loaded.name)

    with torch.inference_mode():  # warm-up: first-call allocations and kernel selection
        model(input_ids=windows.input_ids[:1, :128], use_cache=False, logits_to_keep=1)
    runs = {"bare": [], "calibrate": []}
    entropy_per_round = []
    for _ in range(args.rounds):
        runs["bare"].append(phase(bare))
        entropy_seconds[0] = 0.0
        runs["calibrate"].append(phase(calibrated))
        entropy_per_round.append(entropy_seconds[0])

    best = {name: min(r["seconds"] for r in rounds) for name, rounds in runs.items()}
    best_cpu = {name: min(r["cpu_seconds"] for r in rounds) for name, rounds in runs.items()}
    peak = {name: max(r["peak_mib"] for r in rounds) for name, rounds in runs.items()}
    parameters_mib = sum(p.numel() * p.element_size() for p in model.parameters()) / MIB
    layer_queries = shape.num_heads * args.seq_len * shape.head_dim
    print(
        json.dumps(
            {
                "model": loaded.name,
                "machine": {
                    "cpus": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(),
                    "processor": platform.processor() or platform.machine(),
                    "torch": torch.__version__,
                },
                "samples": args.samples,
                "seq_len": args.seq_len,
                "tokens": args.samples * args.seq_len,
                "data": windows.description,
                "rounds": args.rounds,
                "bare_seconds": round(best["bare"], 2),
                "calibrate_seconds": round(best["calibrate"], 2),
                "entropy_overhead": round(best["calibrate"] / best["bare"] - 1, 4),
                "bare_cpu_seconds": round(best_cpu["bare"], 2),
                "calibrate_cpu_seconds": round(best_cpu["calibrate"], 2),
                "entropy_overhead_cpu": round(best_cpu["calibrate"] / best_cpu["bare"] - 1, 4),
                "entropy_seconds_inside_calibration": round(min(entropy_per_round), 2),
                "entropy_share_of_bare": round(min(entropy_per_round) / best["bare"], 4),
                "all_rounds_seconds": {k: [round(r["seconds"], 2) for r in v] for k, v in runs.items()},
                "parameters_mib": round(parameters_mib, 1),
                "rss_after_load_mib": round(rss_loaded, 1),
                "bare_peak_rss_mib": round(peak["bare"], 1),
                "calibrate_peak_rss_mib": round(peak["calibrate"], 1),
                "calibrate_minus_bare_peak_mib": round(peak["calibrate"] - peak["bare"], 1),
                "one_layer_queries_mib": {
                    "float32": round(layer_queries * 4 / MIB, 2),
                    "float64_copy": round(layer_queries * 8 / MIB, 2),
                },
                "num_stages": profile.num_stages if profile else None,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
