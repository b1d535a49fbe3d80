"""What each cache method costs and saves, measured against the full cache in the same run.

:func:`run_bench` measures, for every method × prompt length × budget × batch size: time to first
token, prefill time, decode tokens/s over a fixed number of new tokens, the KV bytes held after
decoding and peak memory. Each number is the median over repeats, with its spread, and is also
given as a ratio to ``full`` measured in the same run: full runs first for every length × batch,
then the methods alternate within each repeat, so slow drift of a shared machine hits every
method alike. With a memory cap it instead finds, per method, the largest batch whose peak memory
stays under the cap (:func:`search_max_batch`) and that batch's decode throughput.

How it measures (docs/cli.md says the same for users):

* Time: :func:`~uncomp_cli.engine.generation.generate_ids`, the loop ``uncomp generate`` runs, with EOS
  ignored so that every method decodes the same number of tokens. The device is synchronised
  before each clock read. TTFT runs from the call (before the policy builds its cache) until the
  first new token id is on the host; prefill is the prompt's forward pass with any selection, plus
  picking the first token; decode tokens/s is batch × (new tokens − 1) / decode seconds.
* Memory: on CUDA ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` (weights,
  cache and activations; not the caching allocator's reserved slack). On CPU the process's peak
  resident set size (``VmHWM``), reset before each run by writing 5 to ``/proc/self/clear_refs``
  after the garbage collector and ``malloc_trim`` have returned freed memory; so each run's peak
  is its own, not the process-lifetime high-water mark that ``ru_maxrss`` reports. It includes
  the weights, the libraries and the interpreter, as a user's process would.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import math
import os
import platform
import re
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch

from uncomp_cli.errors import UncompError
from uncomp_cli.models.loading import LoadedModel

log = logging.getLogger(__name__)

TIME_MEASURE = ("generate_ids with EOS ignored; device synchronised before each clock read; TTFT from the call to "
                "the first token on the host; decode tokens/s = batch x (new tokens - 1) / decode seconds")

# -- parsing what users type ----------------------------------------------------------------------

_LENGTH = re.compile(r"^(\d+(?:\.\d+)?)([kK]?)$")
_MEMORY = re.compile(r"^(\d+(?:\.\d+)?)\s*([A-Za-z]+)$")
_MEMORY_UNITS = {
    "b": 1,
    "k": 2**10, "kib": 2**10, "kb": 10**3,
    "m": 2**20, "mib": 2**20, "mb": 10**6,
    "g": 2**30, "gib": 2**30, "gb": 10**9,
    "t": 2**40, "tib": 2**40, "tb": 10**12,
}


def split_list(text: str, what: str) -> list[str]:
    """``"a, b"`` -> ``["a", "b"]``; an empty list or item is a user error naming ``what``."""
    items = [item.strip() for item in str(text).split(",")]
    if not any(items) or not all(items):
        raise UncompError(f"{what} must be a comma-separated list without empty items, got {text!r}")
    return items


def parse_length(text: str) -> int:
    """Tokens: ``4096``, ``4k`` (k = 1024) or ``1.5k``."""
    match = _LENGTH.match(str(text).strip())
    value = float(match[1]) * (1024 if match[2] else 1) if match else 0.0
    if not match or value < 1 or value != int(value):
        raise UncompError(f"invalid length {text!r}: use a whole number of tokens such as 4096 or 4k (k = 1024)")
    return int(value)


def parse_lengths(text: str) -> list[int]:
    return [parse_length(item) for item in split_list(text, "--lengths")]


def parse_batch_sizes(text: str) -> list[int]:
    sizes = []
    for item in split_list(text, "--batch-sizes"):
        if not re.fullmatch(r"-?\d+", item) or int(item) < 1:
            raise UncompError(f"batch sizes must be whole numbers of at least 1, got {item!r}")
        sizes.append(int(item))
    return sizes


def parse_memory(text: str) -> int:
    """Bytes from ``8GiB``, ``512MiB`` or ``8G`` (K/M/G/T and KiB/MiB/GiB/TiB are powers of 1024; kB/MB/GB/TB of
    1000). A bare number is refused: bytes are rarely meant."""
    match = _MEMORY.match(str(text).strip())
    unit = match[2].lower() if match else ""
    if not match or unit not in _MEMORY_UNITS:
        raise UncompError(f"invalid memory size {text!r}: use a number with a unit, such as 8GiB, 512MiB or 8G")
    value = int(float(match[1]) * _MEMORY_UNITS[unit])
    if value < 1:
        raise UncompError(f"memory size {text!r} must be more than 0")
    return value


@dataclass(frozen=True)
class Case:
    """One method at one budget (``None`` for full): a row of the table at each length × batch size."""

    method: str
    budget: str | None = None

    @property
    def label(self) -> str:
        return self.method if self.budget is None else f"{self.method} {self.budget}"


def parse_methods(text: str | Sequence[str]) -> list[tuple[str, str | None]]:
    """``full,snapkv,snapkv@100%`` -> ``[(method, own budget or None)]``; ``name@B`` runs only at budget B."""
    items = split_list(text, "--methods") if isinstance(text, str) else list(text)
    parsed = []
    for item in items:
        method, _, budget = item.partition("@")
        if _ and not budget.strip():
            raise UncompError(f"method {item!r} names no budget after '@'")
        parsed.append((method.strip(), budget.strip() or None))
    return parsed


# -- statistics -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Summary:
    """Repeated measurements of one number: the median and the spread, (max − min) / median."""

    median: float
    spread: float
    low: float
    high: float
    count: int


def summarize(samples: Sequence[float]) -> Summary:
    """Median and relative range of ``samples`` (spread 0 for one sample or a zero median)."""
    values = [float(v) for v in samples]
    if not values:
        raise ValueError("summarize needs at least one sample")
    median = statistics.median(values)
    low, high = min(values), max(values)
    spread = (high - low) / abs(median) if median else 0.0
    return Summary(median=median, spread=spread, low=low, high=high, count=len(values))


def ratio(value: float | None, reference: float | None) -> float | None:
    """``value / reference``, or None when either is missing or the reference is 0."""
    if value is None or reference is None or reference == 0:
        return None
    return value / reference


# -- memory ---------------------------------------------------------------------------------------


def _proc_status_bytes(key: str) -> int | None:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Linux: make the process's peak RSS (VmHWM) its current RSS. False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        return False
    return _proc_status_bytes("VmHWM") is not None


_LIBC: ctypes.CDLL | None | bool = False


def _malloc_trim() -> None:
    """Hand freed heap pages back to the OS (glibc), so the next run's RSS starts from what is in use."""
    global _LIBC
    if _LIBC is False:
        name = ctypes.util.find_library("c")
        try:
            _LIBC = ctypes.CDLL(name) if name else None
        except OSError:
            _LIBC = None
    if _LIBC is not None and hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)


class PeakMemory:
    """Peak memory of one run, measured the same way for the table and for the memory-cap search."""

    def __init__(self, device: torch.device):
        self.device = device
        self.available = device.type == "cuda" or _reset_peak_rss()

    @property
    def description(self) -> str:
        if self.device.type == "cuda":
            return "torch.cuda.max_memory_allocated after reset_peak_memory_stats (weights + cache + activations)"
        if self.available:
            return ("process peak RSS (VmHWM), reset before each run via /proc/self/clear_refs after gc and "
                    "malloc_trim; includes weights, libraries and the interpreter")
        return "unavailable: per-run peak RSS needs Linux /proc/self/clear_refs"

    def start(self) -> int | None:
        """Reset the peak; returns the memory in use now (bytes)."""
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return int(torch.cuda.memory_allocated(self.device))
        if not self.available:
            return None
        _malloc_trim()
        _reset_peak_rss()
        return _proc_status_bytes("VmRSS")

    def peak(self) -> int | None:
        """The highest memory in use since :meth:`start` (bytes)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return int(torch.cuda.max_memory_allocated(self.device))
        return _proc_status_bytes("VmHWM") if self.available else None

    def capacity(self) -> int | None:
        """All the memory a run could use: the GPU's total memory, or what this process holds plus what the
        machine still has available. None where unknown."""
        if self.device.type == "cuda":
            return int(torch.cuda.get_device_properties(self.device).total_memory)
        from uncomp_cli.models.random_presets import available_memory_bytes

        return available_memory_bytes(self.device) + (_proc_status_bytes("VmRSS") or 0)


# -- one run --------------------------------------------------------------------------------------


@dataclass
class RunSample:
    """What one generation cost. Times in seconds, memory in bytes."""

    ttft_seconds: float
    prefill_seconds: float
    decode_seconds: float
    decode_tokens_per_second: float
    kv_cache_bytes: int
    full_kv_cache_bytes: int
    peak_memory_bytes: int | None
    run_memory_bytes: int | None  # peak minus what was in use when the run started
    stats: dict = field(default_factory=dict)


def run_once(model: torch.nn.Module, input_ids: torch.Tensor, policy, new_tokens: int,
             meter: PeakMemory) -> RunSample:
    """Prefill ``input_ids`` [B, S] (no padding) and decode exactly ``new_tokens`` tokens per row."""
    from uncomp_cli.engine.generation import GenerationSettings, generate_ids

    first: list[float] = []

    def on_tokens(tokens: torch.Tensor) -> None:
        if not first:
            tokens.tolist()  # waits for the device: the first token is on the host
            first.append(time.perf_counter())

    at_start = meter.start()
    started = time.perf_counter()
    out = generate_ids(model, input_ids, torch.ones_like(input_ids), GenerationSettings(max_new_tokens=new_tokens),
                       eos_ids=[], policy=policy, on_tokens=on_tokens)
    peak = meter.peak()
    steps = input_ids.shape[0] * (new_tokens - 1)
    return RunSample(
        ttft_seconds=first[0] - started,
        prefill_seconds=out.prefill_seconds,
        decode_seconds=out.decode_seconds,
        decode_tokens_per_second=steps / out.decode_seconds if out.decode_seconds > 0 else 0.0,
        kv_cache_bytes=out.kv_cache_bytes,
        full_kv_cache_bytes=out.full_kv_cache_bytes,
        peak_memory_bytes=peak,
        run_memory_bytes=None if peak is None or at_start is None else max(peak - at_start, 0),
        stats=out.stats,
    )


# -- prompts --------------------------------------------------------------------------------------


def random_prompt_ids(batch: int, length: int, vocab_size: int, seed: int = 0) -> torch.Tensor:
    """[batch, length] token ids drawn uniformly from the vocabulary; row r is the same in every batch size."""
    rows = []
    for row in range(batch):
        generator = torch.Generator().manual_seed((seed * 1_000_003 + length * 1_009 + row) % 2**63)
        rows.append(torch.randint(0, vocab_size, (length,), generator=generator))
    return torch.stack(rows)


def haystack_prompt_ids(tokens: Sequence[int], batch: int, length: int, seed: int = 0) -> torch.Tensor:
    """[batch, length]: row r is ``length`` consecutive tokens of the tokenised text from a seeded offset,
    wrapping around at the end (so any length is exact)."""
    if not tokens:
        raise UncompError("the haystack has no tokens")
    source = torch.as_tensor(list(tokens), dtype=torch.long)
    repeats = math.ceil((length + len(source)) / len(source))
    looped = source.repeat(repeats)
    generator = torch.Generator().manual_seed(seed)
    offsets = torch.randint(0, len(source), (batch,), generator=generator).tolist()
    return torch.stack([looped[offset:offset + length] for offset in offsets])


# -- the memory-cap search ------------------------------------------------------------------------


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


# -- settings and results -------------------------------------------------------------------------


@dataclass
class BenchSettings:
    """What to measure. ``methods`` entries may carry their own budget (``"snapkv@100%"``); ``full`` is
    always measured, first. ``memory_cap`` (bytes) switches to the throughput search."""

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
    prefill_keep: str | None = None  # profile methods: equal layer spans instead of the profile's stages

    def cases(self) -> list[Case]:
        """full first, then every method at every budget (or its own), without duplicates."""
        cases = [Case("full")]
        for method, own_budget in parse_methods(self.methods):
            for budget in [None] if method == "full" else [own_budget] if own_budget else list(self.budgets):
                case = Case(method, budget)
                if case not in cases:
                    cases.append(case)
        return cases

    def validate(self) -> None:
        """Every problem a user can fix, before a model is loaded (context lengths are checked later)."""
        from uncomp_cli.defaults import DEFAULT_WINDOW
        from uncomp_cli.policies.registry import PROFILE_METHODS, check_method_options
        from uncomp_cli.engine.selection import resolve_budget

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
        if self.memory_cap is not None and self.memory_cap < 1:
            raise UncompError(f"--memory-cap must be positive, got {self.memory_cap}")
        if self.max_batch < 1:
            raise UncompError(f"--max-batch must be at least 1, got {self.max_batch}")
        cases = self.cases()
        for case in cases:
            check_method_options(case.method, prefill_keep=self.prefill_keep,
                                 **({} if case.budget is None else {"budget": case.budget}))
            for length in self.lengths if case.budget is not None else []:
                try:
                    resolve_budget(case.budget, length, DEFAULT_WINDOW)
                except UncompError as exc:
                    raise UncompError(f"{case.label} at {length} tokens: {exc}") from None
        if self.profile is not None and not any(case.method in PROFILE_METHODS for case in cases):
            raise UncompError(f"--profile is for the methods {', '.join(sorted(PROFILE_METHODS))}, none of which "
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


def summarize_runs(case: Case, length: int, batch: int, new_tokens: int, samples: Sequence[RunSample]) -> BenchRow:
    """Median and spread of each measured number over repeated runs of one configuration."""
    ttft = summarize([s.ttft_seconds for s in samples])
    prefill = summarize([s.prefill_seconds for s in samples])
    decode = summarize([s.decode_tokens_per_second for s in samples])
    peaks = [s.peak_memory_bytes for s in samples if s.peak_memory_bytes is not None]
    peak = summarize(peaks) if peaks else None
    runs = [s.run_memory_bytes for s in samples if s.run_memory_bytes is not None]
    stats = samples[-1].stats
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
        kv_cache_bytes=int(statistics.median(s.kv_cache_bytes for s in samples)),
        full_kv_cache_bytes=samples[-1].full_kv_cache_bytes,
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

    def to_dict(self) -> dict:
        data = dict(self.meta)
        if self.meta.get("memory_cap_bytes") is None:
            data["rows"] = [asdict(row) for row in self.rows]
        else:
            data["throughput"] = [row.to_dict() for row in self.throughput]
        return data


# -- running --------------------------------------------------------------------------------------


ProgressCallback = Callable[[int, int, str], None]


def check_lengths(config, settings: BenchSettings) -> None:
    """Every prompt length plus the new tokens must fit the model's context."""
    from uncomp_cli.models.prompting import context_length

    context = context_length(config)
    for length in settings.lengths:
        if length + settings.new_tokens > context:
            raise UncompError(f"a {length}-token prompt plus {settings.new_tokens} new tokens exceeds the model's "
                              f"context of {context} tokens")


def resolve_profile(loaded: LoadedModel, settings: BenchSettings, cases: Sequence[Case]):
    """The profile the profile methods use, and how it was obtained (for the report); (None, None) if none does.

    A given file; for a random model, :func:`~uncomp_cli.profile.reference.reference_profile` (its
    entropies mean nothing); otherwise the profile cached for the model, calibrated once if missing.
    """
    from uncomp_cli.policies.registry import PROFILE_METHODS
    from uncomp_cli.profile.store import profile_for

    if not any(case.method in PROFILE_METHODS for case in cases):
        return None, None
    if settings.profile is not None:
        return profile_for(loaded, settings.profile), f"file {settings.profile}"
    if loaded.source.kind == "random":
        from uncomp_cli.profile.reference import reference_profile

        profile = reference_profile(loaded.model.config, loaded.name)
        return profile, (f"reference structure for a random model: {profile.num_stages} prefill stages "
                         f"(official keep fractions), {profile.groups} KV-head groups; no calibration")
    return profile_for(loaded), "cached for the model (calibrated once on the built-in source if it was missing)"


def make_policies(loaded: LoadedModel, cases: Sequence[Case], profile, prefill_keep: str | None = None) -> list:
    """One policy per case, built as ``uncomp generate`` builds them (the registry), sharing one profile."""
    from uncomp_cli.policies.registry import PROFILE_METHODS, make_policy

    policies = []
    for case in cases:
        options = {} if case.budget is None else {"budget": case.budget}
        if case.method in PROFILE_METHODS:
            options["profile"] = profile
            options["prefill_keep"] = prefill_keep
        policies.append(make_policy(case.method, **options))
    return policies


class PromptSource:
    """Prompts of exact lengths: seeded random token ids, or slices of a tokenised haystack."""

    def __init__(self, loaded: LoadedModel, settings: BenchSettings):
        self.seed = settings.seed
        self.vocab_size = int(loaded.model.config.vocab_size)
        self.device = loaded.device
        self.tokens: list[int] | None = None
        self.description = f"random token ids (seed {settings.seed})"
        if settings.haystack is not None:
            from uncomp_cli.eval.needle import load_haystack

            if loaded.tokenizer is None:
                raise UncompError("--haystack needs a model with a tokenizer; random models take random token ids")
            text = load_haystack(settings.haystack)
            self.tokens = list(loaded.tokenizer(text, add_special_tokens=False)["input_ids"])
            self.description = f"haystack {settings.haystack} ({len(self.tokens)} tokens; seed {settings.seed})"

    def ids(self, batch: int, length: int) -> torch.Tensor:
        if self.tokens is None:
            ids = random_prompt_ids(batch, length, self.vocab_size, self.seed)
        else:
            ids = haystack_prompt_ids(self.tokens, batch, length, self.seed)
        return ids.to(self.device)


def _meta(loaded: LoadedModel, settings: BenchSettings, meter: PeakMemory, prompts: PromptSource,
          profile_note: str | None) -> dict:
    import transformers

    device = loaded.device
    return {
        "model": loaded.name,
        "random_weights": loaded.source.kind == "random",
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "dtype": str(loaded.dtype).removeprefix("torch."),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "prompts": prompts.description,
        "new_tokens": settings.new_tokens,
        "warmup": settings.warmup,
        "repeats": settings.repeats,
        "profile": profile_note,
        "prefill_keep": settings.prefill_keep,
        "memory_measure": meter.description,
        "time_measure": TIME_MEASURE,
        "memory_cap_bytes": settings.memory_cap,
        "load_average_before": _load_average(),  # other work on the machine skews every time
    }


def _load_average() -> float | None:
    """The 1-minute load average (None where unknown): a busy machine makes timings meaningless."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def run_bench(loaded: LoadedModel, settings: BenchSettings | None = None,
              on_progress: ProgressCallback | None = None) -> BenchReport:
    """Measure every configuration of ``settings`` on ``loaded``; ``on_progress(done, total, what)`` after each run."""
    settings = settings or BenchSettings()
    settings.validate()
    check_lengths(loaded.model.config, settings)
    cases = settings.cases()
    meter = PeakMemory(loaded.device)
    if settings.memory_cap is not None:
        if not meter.available:
            raise UncompError(f"--memory-cap needs a per-run memory measure, and {meter.description}")
        capacity = meter.capacity()
        if capacity is not None and settings.memory_cap > capacity:
            raise UncompError(f"--memory-cap {settings.memory_cap / 2**30:.1f} GiB is more than this {loaded.device} "
                              f"can hold ({capacity / 2**30:.1f} GiB)")
    prompts = PromptSource(loaded, settings)
    profile, profile_note = resolve_profile(loaded, settings, cases)
    policies = make_policies(loaded, cases, profile, settings.prefill_keep)
    report = BenchReport(meta=_meta(loaded, settings, meter, prompts, profile_note))
    if settings.memory_cap is None:
        report.rows = _grid(loaded, settings, cases, policies, prompts, meter, on_progress)
    else:
        report.throughput = _throughput(loaded, settings, cases, policies, prompts, meter, on_progress)
    report.meta["load_average_after"] = _load_average()
    return report


def _out_of_memory(case: Case, length: int, batch: int) -> UncompError:
    return UncompError(f"out of memory running {case.label} on {length} tokens × batch {batch}; "
                       "lower --lengths or --batch-sizes")


def _grid(loaded, settings, cases, policies, prompts, meter, on_progress) -> list[BenchRow]:
    rows: list[BenchRow] = []
    per_cell = len(cases) * (settings.warmup + settings.repeats)
    total = len(settings.lengths) * len(settings.batch_sizes) * per_cell
    done = 0
    for length in settings.lengths:
        for batch in settings.batch_sizes:
            ids = prompts.ids(batch, length)
            samples: list[list[RunSample]] = [[] for _ in cases]
            for round_ in range(settings.warmup + settings.repeats):
                for index, (case, policy) in enumerate(zip(cases, policies)):
                    try:
                        sample = run_once(loaded.model, ids, policy, settings.new_tokens, meter)
                    except torch.cuda.OutOfMemoryError:
                        raise _out_of_memory(case, length, batch) from None
                    if round_ >= settings.warmup:
                        samples[index].append(sample)
                    done += 1
                    if on_progress is not None:
                        on_progress(done, total, f"{case.label} · {length} tokens × {batch}")
            cell = [summarize_runs(case, length, batch, settings.new_tokens, runs)
                    for case, runs in zip(cases, samples)]
            for row in cell:
                row.compare_to(cell[0])
            log.debug("%d tokens × %d: %s", length, batch,
                      ", ".join(f"{r.method} {r.prefill_seconds:.3f}s" for r in cell))
            rows.extend(cell)
    return rows


def _throughput(loaded, settings, cases, policies, prompts, meter, on_progress) -> list[ThroughputRow]:
    """Per length and case: warm up at batch 1, search the largest batch under the cap, then measure it."""
    cap = settings.memory_cap
    limit = meter.capacity()
    total = len(settings.lengths) * len(cases)
    results: list[ThroughputRow] = []
    done = 0
    for length in settings.lengths:
        cell: list[ThroughputRow] = []
        for case, policy in zip(cases, policies):
            seen: list[tuple[int, int]] = []

            def measure(batch: int, case=case, policy=policy, seen=seen, length=length) -> int | None:
                predicted = predict_peak(seen, batch)
                if limit is not None and predicted is not None and predicted > 0.95 * limit:
                    log.info("%s: skipping batch %d, predicted to need %.1f GiB of the %.1f GiB there is",
                             case.label, batch, predicted / 2**30, limit / 2**30)
                    return None
                try:
                    peak = run_once(loaded.model, prompts.ids(batch, length), policy, settings.new_tokens,
                                    meter).peak_memory_bytes
                except (torch.cuda.OutOfMemoryError, MemoryError):
                    gc.collect()
                    if loaded.device.type == "cuda":
                        torch.cuda.empty_cache()
                    return None
                seen.append((batch, peak))
                log.debug("%s: batch %d peaks at %d bytes", case.label, batch, peak)
                return peak

            for _ in range(settings.warmup):
                run_once(loaded.model, prompts.ids(1, length), policy, settings.new_tokens, meter)
            best, probes = search_max_batch(measure, cap, settings.max_batch)
            row = ThroughputRow(case.method, case.budget, length, cap, best, probes)
            if best:
                ids = prompts.ids(best, length)
                try:
                    runs = [run_once(loaded.model, ids, policy, settings.new_tokens, meter)
                            for _ in range(settings.repeats)]
                except torch.cuda.OutOfMemoryError:
                    raise _out_of_memory(case, length, best) from None
                row.measured = summarize_runs(case, length, best, settings.new_tokens, runs)
            cell.append(row)
            done += 1
            if on_progress is not None:
                on_progress(done, total, f"{case.label} · {length} tokens: batch {best}")
        full = cell[0]
        for row in cell:
            row.max_batch_vs_full = ratio(row.max_batch_size, full.max_batch_size)
            row.throughput_vs_full = ratio(row.decode_tokens_per_second, full.decode_tokens_per_second)
            if row.measured is not None and full.measured is not None:
                row.measured.compare_to(full.measured)
        results.extend(cell)
    return results


# -- rendering ------------------------------------------------------------------------------------


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
    if meta.get("memory_cap_bytes") is None:
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
