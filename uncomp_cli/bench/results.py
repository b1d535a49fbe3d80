"""What a benchmark measures (settings, cases) and what it reports (rows, ratios to full)."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from uncomp_cli.bench.measure import RunSample, ratio, summarize
from uncomp_cli.bench.search import Probe
from uncomp_cli.errors import UncompError
from uncomp_cli.policies.grid import Cell, make_policies, plan_runs


@dataclass
class BenchSettings:
    """What to measure. ``methods`` entries may carry their own budget (``"snapkv@100%"``); ``full`` is
    always measured, first. ``memory_cap`` (bytes) switches to the throughput search.
    ``method_options``: options such as ``{"prefill_keep": "0.5"}``, each given to the methods that
    take it (and refused if none of the methods does)."""

    methods: Sequence[str] = ("full", "snapkv", "uncomp")
    lengths: Sequence[int] = (1024, 4096)
    budgets: Sequence[str] = ("5%",)
    batch_sizes: Sequence[int] = (1,)
    new_tokens: int = 32
    warmup: int = 1
    repeats: int = 3
    seed: int = 0
    haystack: str | None = None
    profile: str | None = None
    memory_cap: int | None = None
    max_batch: int = 1024
    reuse: bool = False  # context-reuse mode (bench.reuse) instead of the speed grid
    context_scorer: str | None = None  # reuse mode: how contexts are scored (None: the default scorer)
    kv_bits: int | None = None  # reuse mode: compressed contexts rounded to 8 bits (the full cache never)
    method_options: dict = field(default_factory=dict)

    def cases(self) -> list[Cell]:
        """full first, then every method at every budget (or its own), without duplicates."""
        return plan_runs(["full", *self.methods], self.budgets)

    def policies(self) -> list:
        """One policy per case, built by the registry as ``uncomp generate`` builds them (without a
        profile yet); a bad option or a budget a method cannot use fails here."""
        return make_policies(self.cases(), self.method_options)

    def validate(self) -> None:
        """Every problem a user can fix, before a model is loaded (context lengths are checked later)."""
        if self.new_tokens < 2:
            raise UncompError(f"--new-tokens must be at least 2 (one prefill token, then decoding), got "
                              f"{self.new_tokens}")
        if self.warmup < 0:
            raise UncompError(f"--warmup must be 0 or more, got {self.warmup}")
        if self.repeats < 1:
            raise UncompError(f"--repeats must be at least 1, got {self.repeats}")
        if not self.lengths or any(length < 1 for length in self.lengths):
            raise UncompError(f"prompt lengths must be at least 1 token, got {list(self.lengths)}")
        if not self.batch_sizes or any(batch < 1 for batch in self.batch_sizes):
            raise UncompError(f"batch sizes must be at least 1, got {list(self.batch_sizes)}")
        if self.reuse and (self.memory_cap is not None or list(self.batch_sizes) != [1]):
            raise UncompError("--context-reuse measures one prompt at a time: drop --memory-cap and --batch-sizes")
        if self.context_scorer is not None:
            if not self.reuse:
                raise UncompError("--context-scorer is for --context-reuse (the speed grid compresses prompts "
                                  "with their question)")
            from uncomp_cli.contexts.compress import check_context_scorer

            check_context_scorer(self.context_scorer)
        if self.kv_bits is not None:
            if not self.reuse:
                raise UncompError("--kv-bits is for --context-reuse")
            from uncomp_cli.engine.quantise import check_kv_bits

            check_kv_bits(self.kv_bits)
        if self.memory_cap is not None and self.memory_cap < 1:
            raise UncompError(f"--memory-cap must be positive, got {self.memory_cap}")
        if self.max_batch < 1:
            raise UncompError(f"--max-batch must be at least 1, got {self.max_batch}")
        policies = self.policies()
        if self.profile is not None and not any(policy.needs_profile for policy in policies):
            from uncomp_cli.policies.registry import profile_methods

            raise UncompError(f"--profile is for the methods {', '.join(profile_methods())}, none of which "
                              "is benchmarked")


@dataclass
class BenchRow:
    """One method × budget × length × batch size: medians over repeats, spreads, and ratios to full."""

    method: str
    budget: str | None
    length: int
    batch_size: int
    new_tokens: int
    repeats: int
    ttft_seconds: float
    ttft_spread: float
    prefill_seconds: float
    prefill_spread: float
    decode_tokens_per_second: float
    decode_spread: float
    kv_cache_bytes: int
    full_kv_cache_bytes: int
    peak_memory_bytes: int | None
    peak_memory_spread: float | None
    run_memory_bytes: int | None
    kv_budget_tokens: float | None = None
    ttft_vs_full: float | None = None
    prefill_vs_full: float | None = None
    decode_vs_full: float | None = None
    kv_cache_vs_full: float | None = None
    peak_memory_vs_full: float | None = None
    run_memory_vs_full: float | None = None

    def compare_to(self, full: BenchRow) -> None:
        """Fill the ``*_vs_full`` ratios (values / full's); full against itself gives exactly 1."""
        self.ttft_vs_full = ratio(self.ttft_seconds, full.ttft_seconds)
        self.prefill_vs_full = ratio(self.prefill_seconds, full.prefill_seconds)
        self.decode_vs_full = ratio(self.decode_tokens_per_second, full.decode_tokens_per_second)
        self.kv_cache_vs_full = ratio(self.kv_cache_bytes, full.kv_cache_bytes)
        self.peak_memory_vs_full = ratio(self.peak_memory_bytes, full.peak_memory_bytes)
        self.run_memory_vs_full = ratio(self.run_memory_bytes, full.run_memory_bytes)


def summarize_runs(case: Cell, length: int, batch: int, new_tokens: int, samples: Sequence[RunSample]) -> BenchRow:
    """Median and spread of each measured number over repeated runs of one configuration."""
    ttft = summarize([s.ttft_seconds for s in samples])
    prefill = summarize([s.loop.prefill_seconds for s in samples])
    decode = summarize([s.decode_tokens_per_second for s in samples])
    peaks = [s.peak_memory_bytes for s in samples if s.peak_memory_bytes is not None]
    peak = summarize(peaks) if peaks else None
    runs = [s.run_memory_bytes for s in samples if s.run_memory_bytes is not None]
    stats = samples[-1].loop.stats
    budget_tokens = stats.get("kv_budget_tokens_mean", stats.get("kv_budget_tokens"))
    return BenchRow(
        method=case.method,
        budget=case.budget,
        length=length,
        batch_size=batch,
        new_tokens=new_tokens,
        repeats=len(samples),
        ttft_seconds=ttft.median,
        ttft_spread=ttft.spread,
        prefill_seconds=prefill.median,
        prefill_spread=prefill.spread,
        decode_tokens_per_second=decode.median,
        decode_spread=decode.spread,
        kv_cache_bytes=int(statistics.median(s.loop.kv_cache_bytes for s in samples)),
        full_kv_cache_bytes=samples[-1].loop.full_kv_cache_bytes,
        peak_memory_bytes=None if peak is None else int(peak.median),
        peak_memory_spread=None if peak is None else peak.spread,
        run_memory_bytes=int(statistics.median(runs)) if runs else None,
        kv_budget_tokens=None if budget_tokens is None else float(budget_tokens),
    )


@dataclass
class ThroughputRow:
    """One method × budget × length under a memory cap: the largest batch that fits and its throughput."""

    method: str
    budget: str | None
    length: int
    memory_cap_bytes: int
    max_batch_size: int
    probes: list[Probe]
    measured: BenchRow | None = None  # at max_batch_size, with warm-up and repeats; None if nothing fits
    max_batch_vs_full: float | None = None
    throughput_vs_full: float | None = None

    @property
    def decode_tokens_per_second(self) -> float | None:
        return None if self.measured is None else self.measured.decode_tokens_per_second

    def to_dict(self) -> dict:
        data = asdict(self)
        data["decode_tokens_per_second"] = self.decode_tokens_per_second
        return data


@dataclass
class BenchReport:
    """Everything one run measured, with how and where (``meta``)."""

    meta: dict
    rows: list[BenchRow] = field(default_factory=list)
    throughput: list[ThroughputRow] = field(default_factory=list)
    reuse: list = field(default_factory=list)  # bench.reuse.ReuseRow

    def to_dict(self) -> dict:
        data = dict(self.meta)
        if self.reuse:
            data["reuse"] = [asdict(row) for row in self.reuse]
        elif self.meta.get("memory_cap_bytes") is None:
            data["rows"] = [asdict(row) for row in self.rows]
        else:
            data["throughput"] = [row.to_dict() for row in self.throughput]
        return data
