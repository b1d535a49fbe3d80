"""The memory-cap search: the largest batch whose peak memory fits a cap (throughput mode)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from uncomp_cli.errors import UncompError


@dataclass(frozen=True)
class Probe:
    """One batch size tried by the search: its measured peak (None: out of memory or skipped) and whether it fit."""

    batch_size: int
    peak_memory_bytes: int | None
    fits: bool


def search_max_batch(measure: Callable[[int], int | None], cap: int,
                     max_batch: int = 1024) -> tuple[int, list[Probe]]:
    """The largest batch size whose ``measure(batch)`` (peak bytes; None = could not run) is at most ``cap``.

    Doubles from 1 until a batch does not fit (or ``max_batch`` is reached), then bisects between
    the last that fit and the first that did not; assumes peak memory grows with the batch. Returns
    the batch size (0 if even 1 does not fit) and every probe in the order tried.
    """
    if max_batch < 1:
        raise UncompError(f"--max-batch must be at least 1, got {max_batch}")
    probes: list[Probe] = []

    def fits(batch: int) -> bool:
        peak = measure(batch)
        ok = peak is not None and peak <= cap
        probes.append(Probe(batch, peak, ok))
        return ok

    if not fits(1):
        return 0, probes
    low = 1
    while low < max_batch:
        candidate = min(2 * low, max_batch)
        if not fits(candidate):
            high = candidate
            break
        low = candidate
    else:
        return low, probes
    while high - low > 1:
        middle = (low + high) // 2
        if fits(middle):
            low = middle
        else:
            high = middle
    return low, probes


def predict_peak(seen: Sequence[tuple[int, int]], batch: int) -> int | None:
    """Extrapolate peak memory to ``batch`` from measured (batch, peak) pairs: linear through the two
    largest, or proportional to the one there is. Used only to skip runs that would exhaust the machine."""
    points = sorted(seen)
    if not points:
        return None
    if len(points) == 1 or points[-1][0] == points[-2][0]:
        b, peak = points[-1]
        return int(peak * batch / b)
    (b1, p1), (b2, p2) = points[-2], points[-1]
    slope = max((p2 - p1) / (b2 - b1), 0.0)
    return int(p2 + slope * (batch - b2))
