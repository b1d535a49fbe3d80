"""Run a list of :class:`Example` s for several cache methods and budgets on one loaded model.

One model load and one tokenisation serve a whole grid: suites build the examples, the runner only
generates (greedy), scores with ``METRICS[example.metric]`` and writes, per run, ``predictions.jsonl``
then ``metrics.json`` (both atomically) into a folder named by the settings. A run whose
``metrics.json`` exists is finished and skipped, so an interrupted grid resumes where it stopped
and adding a method or budget to the same settings runs only what is new.

Layout::

    <out>/<suite>-<model>-<hash of settings and examples>/
        config.json                    settings, model, machine, versions (written once)
        full/predictions.jsonl         one line per example: prediction, scores, costs
        full/metrics.json              means overall, per task, per length, per depth; costs
        snapkv-10pct/...
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from uncomp_cli.errors import UncompError
from uncomp_cli.eval.examples import Example
from uncomp_cli.files import atomic_write
from uncomp_cli.policies.grid import Cell, cell_policy, make_policies, plan_runs, slug
from uncomp_cli.policies.options import CATALOGUE

log = logging.getLogger(__name__)

DEFAULT_OUT = "uncomp-eval"
#: Selection options that always name a results folder (at their defaults unless given), so a run
#: with ``--window 32`` finds the results of one with the default window.
NAMED_SELECTION = ("window", "kernel", "pooling", "aggregate")
CONFIG = "config.json"
PREDICTIONS = "predictions.jsonl"
METRICS_FILE = "metrics.json"


@dataclass
class EvalSettings:
    """What to evaluate and where the results go. ``methods`` run in the order given (an entry may
    carry its own budget: ``"snapkv@100%"``); ``method_options`` such as ``{"window": 8}`` go each to
    the methods that take it. All but ``methods`` and ``budgets`` choose the results folder (each run is
    a subfolder of it, so a grid can grow); ``suite_settings`` is what the suite built its examples
    with (lengths, seed…), kept as ``settings`` in ``config.json``."""

    suite: str
    suite_settings: dict = field(default_factory=dict)
    methods: Sequence[str] = ("full", "snapkv", "uncomp")
    budgets: Sequence[str] = ("10%", "5%")
    method_options: dict = field(default_factory=dict)
    profile: str | Path | None = None
    batch_size: int = 1
    out: str | Path = DEFAULT_OUT
    query_agnostic: bool = False
    context_scorer: str | None = None
    kv_bits: int | None = None  # query-agnostic: compressed contexts rounded to 8 bits (the full cache is not)

    def runs(self) -> list[Cell]:
        """Every method × budget in the order given, ``full`` once (:func:`~uncomp_cli.policies.grid.plan_runs`)."""
        return plan_runs(self.methods, self.budgets)

    def validate(self) -> None:
        """Every problem a user can fix, before a model loads: a typo costs nothing. Stricter than
        :func:`run_eval`, which gives each run the options its method takes and ignores the others."""
        if self.batch_size < 1:
            raise UncompError(f"--batch-size must be at least 1, got {self.batch_size}")
        make_policies(self.runs(), self.method_options)


@dataclass
class RunResult:
    """A finished run: its metrics and per-example predictions (read back when it was skipped)."""

    run: Cell
    folder: Path
    metrics: dict
    predictions: list[dict]
    skipped: bool = False

    def to_dict(self) -> dict:
        return {"run": self.run.name, "method": self.run.method, "budget": self.run.budget,
                "folder": str(self.folder), "skipped": self.skipped, **self.metrics}


@dataclass
class EvalResult:
    folder: Path
    config: dict
    runs: list[RunResult] = field(default_factory=list)

    def to_dict(self) -> dict:
        """The ``--json`` summary: where the results are, the settings, and each run's metrics."""
        return {"folder": str(self.folder), "suite": self.config["suite"], "model": self.config["model"]["name"],
                "settings": self.config["settings"], "runs": [r.to_dict() for r in self.runs]}


# -- naming ---------------------------------------------------------------------------------------


def examples_digest(examples: Sequence[Example]) -> str:
    """A hash of everything in the examples that changes what the model sees or how it is scored."""
    digest = hashlib.sha256()
    for e in examples:
        record = [e.id, e.task, list(e.prompt_ids), list(e.answers), e.metric, e.max_new_tokens, e.length]
        digest.update(json.dumps(record, separators=(",", ":")).encode())
        digest.update(b"\n")
    return digest.hexdigest()


def results_folder(out: str | Path, suite: str, model_name: str, identity: dict) -> Path:
    """``<out>/<suite>-<model>-<10 hex digits>``; the digits hash ``identity`` (settings and examples)."""
    key = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:10]
    return Path(out) / f"{slug(suite)}-{slug(model_name)}-{key}"


def _machine(loaded) -> dict:
    import torch

    machine = {"platform": platform.platform(), "processor": platform.machine(), "cpus": os.cpu_count(),
               "torch_threads": torch.get_num_threads()}
    if loaded.device.type == "cuda":
        machine["gpu"] = torch.cuda.get_device_name(loaded.device)
    return machine


def _versions() -> dict:
    import torch
    import transformers

    from uncomp_cli import __version__

    return {"uncomp": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


# -- scoring and aggregation ----------------------------------------------------------------------


def _metric_functions(examples: Sequence[Example]) -> dict[str, Callable[[str, Example], dict]]:
    from uncomp_cli.eval.metrics import METRICS

    unknown = sorted({e.metric for e in examples} - set(METRICS))
    if unknown:
        raise UncompError(f"unknown metric {', '.join(unknown)}; available: {', '.join(sorted(METRICS))}")
    return {name: METRICS[name] for name in {e.metric for e in examples}}


def _means(rows: Sequence[dict]) -> dict:
    """Mean of every score over the rows that have it, and how many rows there were."""
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for row in rows:
        for key, value in row["scores"].items():
            sums[key] = sums.get(key, 0.0) + float(value)
            counts[key] = counts.get(key, 0) + 1
    return {**{key: round(sums[key] / counts[key], 6) for key in sums}, "examples": len(rows)}


def _grouped(rows: Sequence[dict], key: Callable[[dict], object]) -> dict:
    groups: dict[str, list[dict]] = {}
    for row in rows:
        value = key(row)
        if value is not None:
            groups.setdefault(f"{value:g}" if isinstance(value, float) else str(value), []).append(row)
    return {name: _means(members) for name, members in groups.items()}


def aggregate(rows: Sequence[dict]) -> dict:
    """``metrics.json`` from prediction rows: score means overall / per task / length / depth, and costs."""
    ratios = [r["kv_cache_bytes"] / r["full_kv_cache_bytes"] for r in rows if r["full_kv_cache_bytes"]]
    metrics = {
        "examples": len(rows),
        "overall": _means(rows),
        "by_task": _grouped(rows, lambda r: r["task"]),
        "by_length": _grouped(rows, lambda r: r["length"]),
    }
    if any("depth" in r["meta"] for r in rows):
        metrics["by_depth"] = _grouped(rows, lambda r: r["meta"].get("depth"))
    n = max(len(rows), 1)
    metrics |= {
        "kv_bytes_vs_full": round(sum(ratios) / len(ratios), 6) if ratios else None,
        "kv_cache_bytes_mean": round(sum(r["kv_cache_bytes"] for r in rows) / n),
        "full_kv_cache_bytes_mean": round(sum(r["full_kv_cache_bytes"] for r in rows) / n),
        "prompt_tokens_mean": round(sum(r["prompt_tokens"] for r in rows) / n, 1),
        "prefill_seconds_mean": round(sum(r["prefill_seconds"] for r in rows) / n, 4),
        "decode_seconds_mean": round(sum(r["decode_seconds"] for r in rows) / n, 4),
    }
    return metrics


# -- running --------------------------------------------------------------------------------------


def check_context(loaded, examples: Sequence[Example]) -> None:
    """Every prompt plus its answer must fit the model's context; say which does not."""
    from uncomp_cli.models.prompting import context_length

    limit = context_length(loaded.model.config)
    for e in examples:
        if len(e.prompt_ids) + e.max_new_tokens > limit:
            raise UncompError(f"example {e.id} needs {len(e.prompt_ids)} + {e.max_new_tokens} tokens; "
                              f"{loaded.name} has a context of {limit}")


def _load_finished(folder: Path) -> tuple[dict, list[dict]] | None:
    metrics_path = folder / METRICS_FILE
    if not metrics_path.is_file():
        return None
    try:
        metrics = json.loads(metrics_path.read_text(encoding="utf-8"))
        predictions_path = folder / PREDICTIONS
        lines = predictions_path.read_text(encoding="utf-8").splitlines() if predictions_path.is_file() else []
        return metrics, [json.loads(line) for line in lines if line.strip()]
    except (OSError, ValueError) as exc:
        raise UncompError(f"cannot read the finished run in {folder} ({exc}); delete the folder to rerun it") from None


def _batches(examples: Sequence[Example], batch_size: int) -> list[list[Example]]:
    """Neighbours in prompt length share a batch, so little is spent on padding."""
    ordered = sorted(examples, key=lambda e: len(e.prompt_ids)) if batch_size > 1 else list(examples)
    return [ordered[i:i + batch_size] for i in range(0, len(ordered), batch_size)]


def _row(example: Example, prediction: str, tokens: list[int], scorers, batch_size: int, prefill_seconds: float,
         decode_seconds: float, kv_cache_bytes: int, full_kv_cache_bytes: int) -> dict:
    scores = scorers[example.metric](prediction, example)
    return {
        "id": example.id,
        "task": example.task,
        "length": example.length,
        "prompt_tokens": len(example.prompt_ids),
        "new_tokens": len(tokens),
        "prediction": prediction,
        "answers": list(example.answers),
        "scores": {k: float(v) for k, v in scores.items()},
        "meta": example.meta,
        "batch_size": batch_size,
        "prefill_seconds": round(prefill_seconds, 4),
        "decode_seconds": round(decode_seconds, 4),
        "kv_cache_bytes": kv_cache_bytes,
        "full_kv_cache_bytes": full_kv_cache_bytes,
    }


def _generate_rows(loaded, policy, batch: Sequence[Example], scorers, eos: list[int], pad_id: int) -> list[dict]:
    from uncomp_cli.engine.generation import GenerationSettings, generate_ids, left_pad

    input_ids, mask = left_pad([list(e.prompt_ids) for e in batch], pad_id, loaded.device)
    settings = GenerationSettings(max_new_tokens=max(e.max_new_tokens for e in batch))
    out = generate_ids(loaded.model, input_ids, mask, settings, eos, policy)
    rows = []
    for example, tokens in zip(batch, out.tokens):
        tokens = tokens[: example.max_new_tokens]
        prediction = loaded.tokenizer.decode(tokens, skip_special_tokens=True)
        # Costs are the batch's: time is shared by its rows, bytes are split evenly.
        rows.append(_row(example, prediction, tokens, scorers, len(batch), out.prefill_seconds, out.decode_seconds,
                         out.kv_cache_bytes // len(batch), out.full_kv_cache_bytes // len(batch)))
    return rows


def _context_rows(loaded, policy, examples: Sequence[Example], scorers, context_scorer: str,
                  on_row: Callable[[int], None] | None = None, readings=None, kv_bits: int | None = None) -> list[dict]:
    """Query-agnostic: compress each distinct context (the examples' leading ``context_tokens``)
    once, before any question, then answer each of its examples on it. Prefill time is the
    context's (shared by its questions) plus the question's; bytes are those held after answering.
    ``readings``: re-readings shared with the grid's other runs (see :func:`run_eval`). The
    re-reading's repeat prompt ends the user turn as ``uncomp compress`` and the server do (the
    template's tail), so a grid measures what they keep. ``kv_bits``: compressed caches rounded to
    that many bits (the full cache, the reference, never)."""
    from uncomp_cli.contexts.compress import ask_ids, compress_ids
    from uncomp_cli.engine.generation import GenerationSettings
    from uncomp_cli.models.prompting import template_tail

    by_context: dict[tuple[int, ...], list[Example]] = {}
    for example in examples:
        if example.context_tokens is None:
            raise UncompError(f"{example.task}: its prompts have no context/question split for --query-agnostic")
        by_context.setdefault(example.prompt_ids[: example.context_tokens], []).append(example)
    rows = []
    for context_ids, asked in by_context.items():
        context = compress_ids(loaded, list(context_ids), policy, context_scorer, template_tail(loaded.tokenizer),
                               readings=readings, kv_bits=None if policy.name == "full" else kv_bits)
        for example in asked:
            result = ask_ids(loaded, context, list(example.prompt_ids[example.context_tokens:]),
                             GenerationSettings(max_new_tokens=example.max_new_tokens))
            rows.append(_row(example, result.text, result.token_ids, scorers, 1,
                             context.prefill_seconds + result.prefill_seconds, result.decode_seconds,
                             result.kv_cache_bytes, result.full_kv_cache_bytes) | {"context_shared_by": len(asked)})
            if on_row is not None:
                on_row(len(rows))
    return rows


def run_eval(
    loaded,
    examples: Sequence[Example],
    settings: EvalSettings,
    progress: Callable[[Cell, int, int], None] | None = None,
) -> EvalResult:
    """Generate and score ``examples`` for every run of ``settings`` on ``loaded``; write and return the results.

    The results folder is named by the model, dtype, device type, a digest of the examples and the
    settings other than methods and budgets (each run is a subfolder), with the method options over
    the defaults of :data:`NAMED_SELECTION`. Each run's method gets the options it takes and ignores
    the others, and only the profile methods get ``profile``, so a grid resumed with fewer methods
    keeps its folder. ``progress(run, done, total)`` is called when a run starts and after each batch.
    Finished runs are read back, not rerun. ``query_agnostic``: each context is compressed before its
    questions (:func:`_context_rows`; ``context_scorer`` as for
    :func:`~uncomp_cli.contexts.compress.compress_ids`); both name the folder. A context's
    re-reading is kept (up to half the memory available; the first ones when more do not fit) for the
    grid's other runs whose prefill leaves the same cache: every method and budget without
    hidden-state pruning shares one, so the grid pays it once per context instead of once per run.
    """
    from uncomp_cli.engine.generation import eos_token_ids
    from uncomp_cli.policies.registry import with_profile

    suite, batch_size, profile = settings.suite, settings.batch_size, settings.profile
    query_agnostic, context_scorer = settings.query_agnostic, settings.context_scorer
    if not examples:
        raise UncompError("no examples to evaluate")
    if batch_size < 1:
        raise UncompError(f"--batch-size must be at least 1, got {batch_size}")
    ids = [e.id for e in examples]
    if len(set(ids)) != len(ids):
        raise UncompError(f"{suite}: example ids are not unique")
    runs = settings.runs()
    selection = dict(settings.method_options)
    named = {name: CATALOGUE[name].default for name in NAMED_SELECTION} | selection
    scorers = _metric_functions(examples)
    check_context(loaded, examples)

    model_info = {"name": loaded.name, "kind": loaded.source.kind, "location": loaded.source.location,
                  "device": str(loaded.device), "dtype": str(loaded.dtype).removeprefix("torch.")}
    identity = {"suite": suite, "settings": settings.suite_settings,
                "model": [loaded.source.kind, loaded.source.location],
                "dtype": model_info["dtype"], "device": loaded.device.type, "selection": named,
                "profile": None if profile is None else str(Path(profile).resolve()), "batch_size": batch_size,
                "examples": examples_digest(examples)}
    if query_agnostic:  # only then: earlier folders keep their names
        from uncomp_cli.contexts.compress import selection_settings
        from uncomp_cli.defaults import DEFAULT_CONTEXT_SCORER

        context_scorer = context_scorer or DEFAULT_CONTEXT_SCORER
        identity |= {"query_agnostic": True, "context_scorer": context_scorer,
                     "context_selection": selection_settings()}
        if settings.kv_bits is not None:  # only then: earlier folders keep their names
            identity["kv_bits"] = settings.kv_bits
    folder = results_folder(settings.out, suite, loaded.name, identity)
    finished_runs: list[RunResult] = []
    pending: list[tuple[Cell, object]] = []
    for run in runs:
        finished = _load_finished(folder / run.name)
        if finished is not None:
            log.info("%s: finished earlier, skipped (%s)", run.name, folder / run.name / METRICS_FILE)
            finished_runs.append(RunResult(run, folder / run.name, finished[0], finished[1], skipped=True))
            continue
        # Every policy before any generation: a bad profile or budget fails before minutes of work.
        policy = cell_policy(run, selection)
        policy = with_profile(policy, loaded, profile if policy.needs_profile else None)
        pending.append((run, policy))

    config_path = folder / CONFIG
    if config_path.is_file():
        config = json.loads(config_path.read_text(encoding="utf-8"))
    else:
        config = {"suite": suite, "settings": settings.suite_settings, "model": model_info, "selection": selection,
                  "profile": identity["profile"], "batch_size": batch_size, "examples": len(examples),
                  "examples_digest": identity["examples"], "tasks": sorted({e.task for e in examples}),
                  "machine": _machine(loaded), "versions": _versions(),
                  "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        config |= {key: identity[key] for key in ("query_agnostic", "context_scorer", "context_selection", "kv_bits")
                   if key in identity}
        atomic_write(config_path, json.dumps(config, indent=2) + "\n")
    result = EvalResult(folder, config, finished_runs)

    eos = eos_token_ids(loaded)
    pad_id = loaded.tokenizer.pad_token_id
    if pad_id is None:
        pad_id = (eos or [0])[0]
    order = {e.id: i for i, e in enumerate(examples)}
    readings = None
    if query_agnostic:
        from uncomp_cli.contexts.compress import reading_store
        from uncomp_cli.memory import available_memory_bytes

        readings = reading_store(available_memory_bytes(loaded.device) // 2)
    for run, policy in pending:
        if progress is not None:
            progress(run, 0, len(examples))
        started = time.perf_counter()
        rows: list[dict] = []
        for batch in _batches(examples, len(examples) if query_agnostic else batch_size):
            if query_agnostic:  # one batch: the questions of a context must meet its one compression
                on_row = None if progress is None else functools.partial(progress, run, total=len(examples))
                rows += _context_rows(loaded, policy, batch, scorers, context_scorer, on_row, readings,
                                      settings.kv_bits)
            else:
                rows += _generate_rows(loaded, policy, batch, scorers, eos, pad_id)
            if progress is not None:
                progress(run, len(rows), len(examples))
        rows.sort(key=lambda r: order[r["id"]])
        metrics = {"run": run.name, "method": run.method, "budget": run.budget, "policy": policy.describe(),
                   **aggregate(rows), "wall_seconds": round(time.perf_counter() - started, 2)}
        run_dir = folder / run.name
        atomic_write(run_dir / PREDICTIONS, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        atomic_write(run_dir / METRICS_FILE, json.dumps(metrics, indent=2) + "\n")  # last: marks the run done
        result.runs.append(RunResult(run, run_dir, metrics, rows))
    by_name = {r.run.name: r for r in result.runs}
    result.runs = [by_name[run.name] for run in runs]
    return result
