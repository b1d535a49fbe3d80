"""The benchmark report as rich tables: values, ratios to full, and the largest timing spread."""

from __future__ import annotations

import os

from uncomp_cli.bench.results import BenchReport


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:,.1f}"


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


def render_report(report: BenchReport, console) -> None:
    """Rich tables of ``report`` on ``console``: values, ratios to full, and the largest timing spread."""
    from rich.table import Table

    meta = report.meta
    title = (f"{meta['model']} · {meta['device']} {meta['dtype']} · {meta['new_tokens']} new tokens · "
             f"medians of {meta['repeats']}")
    if report.reuse:
        scorer = next((row.context_scorer for row in report.reuse if row.context_scorer), None)
        bits = next((row.kv_bits for row in report.reuse if row.kv_bits), None)
        table = Table(title=f"{meta['model']} · {meta['device']} {meta['dtype']} · context reuse"
                            f"{f' · scored by {scorer}' if scorer else ''}{f' · {bits}-bit contexts' if bits else ''}"
                            f" · medians of {meta['repeats']}",
                      title_justify="left")
        for name in ("method", "budget", "length", "compress s", "make ×", "KV MiB", "file MiB", "TTFT reuse s",
                     "TTFT full s", "TTFT ×"):
            table.add_column(name, justify="left" if name in ("method", "budget") else "right")
        for row in report.reuse:
            table.add_row(row.method, row.budget or "-", str(row.length), f"{row.compress_seconds:.2f}",
                          _x(row.make_context_over_prefill), _mib(row.kv_cache_bytes), _mib(row.file_bytes),
                          f"{row.ttft_reuse_seconds:.3f}",
                          f"{row.ttft_full_seconds:.3f}", _x(row.ttft_vs_full))
    elif meta.get("memory_cap_bytes") is None:
        table = Table(title=title, title_justify="left")
        for name in ("method", "budget", "length", "batch", "TTFT s", "prefill s", "decode tok/s", "KV MiB",
                     "peak MiB", "prefill ×", "decode ×", "KV ×", "peak ×", "spread"):
            table.add_column(name, justify="left" if name in ("method", "budget") else "right")
        for row in report.rows:
            spread = max(row.ttft_spread, row.prefill_spread, row.decode_spread)
            table.add_row(row.method, row.budget or "-", str(row.length), str(row.batch_size),
                          f"{row.ttft_seconds:.3f}", f"{row.prefill_seconds:.3f}",
                          f"{row.decode_tokens_per_second:.1f}",
                          _mib(row.kv_cache_bytes), _mib(row.peak_memory_bytes), _x(row.prefill_vs_full),
                          _x(row.decode_vs_full), _x(row.kv_cache_vs_full), _x(row.peak_memory_vs_full), _pct(spread))
    else:
        table = Table(title=f"{title} · memory cap {_mib(meta['memory_cap_bytes'])} MiB", title_justify="left")
        for name in ("method", "budget", "length", "max batch", "decode tok/s", "peak MiB", "batch ×",
                     "throughput ×", "probes"):
            table.add_column(name, justify="left" if name in ("method", "budget", "probes") else "right")
        for row in report.throughput:
            measured = row.measured
            table.add_row(row.method, row.budget or "-", str(row.length), str(row.max_batch_size),
                          "-" if measured is None else f"{measured.decode_tokens_per_second:.1f}",
                          _mib(None if measured is None else measured.peak_memory_bytes), _x(row.max_batch_vs_full),
                          _x(row.throughput_vs_full),
                          " ".join(f"{p.batch_size}{'✓' if p.fits else '✗'}" for p in row.probes))
    console.print(table)
    console.print(f"memory: {meta['memory_measure']}", style="dim")
    load = [meta.get("load_average_before"), meta.get("load_average_after")]
    if None not in load:
        console.print(f"load average (1 min) before/after: {load[0]} / {load[1]} on {os.cpu_count()} CPUs, "
                      f"{meta['threads']} torch threads", style="dim")
    if meta.get("profile"):
        console.print(f"profile: {meta['profile']}", style="dim")
