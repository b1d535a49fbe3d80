"""``uncomp calibrate``: measure a model's head entropies and save the profile."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from uncomp_cli.cli.common import handle_errors, stderr_console
from uncomp_cli.defaults import DEFAULT_STAGE_THRESHOLD

if TYPE_CHECKING:
    from uncomp_cli.profile.file import Profile

STAGE_THRESHOLD_HELP = (
    "ε: a layer whose mean head entropy (H_k / ln d) is more than this below the previous layer's starts a new stage."
)
DATA_HELP = (
    "Calibration text: files, folders, globs (quote them: 'essays/*.txt'), JSONL with a 'text' field, "
    "or - for stdin. Repeatable. Default: the built-in source (Python standard library docstrings)."
)


def _load_model(spec: str | None, device: str, dtype: str) -> Any:
    """The one place commands load a model (tests replace it)."""
    from uncomp_cli.models.loading import load_model

    return load_model(spec, device=device, dtype=dtype)


def run_calibration(
    *,
    model: str | None,
    data: list[str],
    samples: int,
    seq_len: int,
    groups: int | None,
    stage_threshold: float,
    rank_k: int | None,
    source: str,
    kv_aggregation: str,
    device: str,
    dtype: str,
) -> Profile:
    """Validate the options, read the data, load the model and calibrate with a progress bar on stderr.

    Cheap checks and data reading come before the model is loaded, so bad input fails fast.
    """
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from uncomp_cli.profile.calibrate import KV_AGGREGATIONS, calibrate, resolve_settings
    from uncomp_cli.profile.calibration_text import builtin_texts, check_window_settings, read_texts, token_windows
    from uncomp_cli.profile.entropy import ENTROPY_SOURCES
    from uncomp_cli.errors import UncompError
    from uncomp_cli.profile.file import ModelShape

    check_window_settings(samples, seq_len)
    if source not in ENTROPY_SOURCES:
        raise UncompError(f"--source must be one of {', '.join(ENTROPY_SOURCES)} (got {source!r})")
    if kv_aggregation not in KV_AGGREGATIONS:
        raise UncompError(f"--kv-aggregation must be one of {', '.join(KV_AGGREGATIONS)} (got {kv_aggregation!r})")
    if not stage_threshold >= 0:
        raise UncompError(f"--stage-threshold must be zero or positive (got {stage_threshold})")
    if rank_k is not None and rank_k < 1:
        raise UncompError(f"--rank-k must be at least 1 (got {rank_k})")
    if groups is not None and groups < 1:
        raise UncompError(f"--groups must be at least 1 (got {groups})")
    text = read_texts(data) if data else None

    with stderr_console.status(f"loading {model or 'the default model'}…"):
        loaded = _load_model(model, device, dtype)
        if text is None:
            text = builtin_texts(samples * seq_len, loaded.tokenizer)
        windows = token_windows(text, loaded.tokenizer, samples, seq_len)
    shape = ModelShape.from_config(loaded.model.config)
    resolve_settings(
        shape,
        groups=groups,
        rank_k=rank_k,
        source=source,
        kv_aggregation=kv_aggregation,
        stage_threshold=stage_threshold,
    )

    columns = (
        TextColumn("[bold]calibrating[/] {task.fields[sample]}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("layer passes"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=stderr_console, transient=False) as progress:
        layers = max(1, shape.num_layers)
        task = progress.add_task("calibrate", total=samples * layers, sample=f"sample 1/{samples}")

        def advance(done: int, total: int) -> None:
            current = min(samples, done // layers + 1)
            progress.update(task, completed=done, total=total, sample=f"sample {current}/{samples}")

        return calibrate(
            loaded.model,
            windows,
            model_name=loaded.name,
            groups=groups,
            stage_threshold=stage_threshold,
            rank_k=rank_k,
            source=source,
            kv_aggregation=kv_aggregation,
            progress=advance,
        )


def summary_lines(profile: Profile, out: Path | None, seconds: float) -> list[str]:
    """A few human lines describing a new profile."""
    from uncomp_cli.profile.report import stage_spans

    stages = ", ".join(
        f"{s['first_layer']}–{s['last_layer']} keep {s['keep_fraction']:.0%}" for s in stage_spans(profile)
    )
    shares = " / ".join(f"×{float(s):.2f}" for s in profile.group_budget_share)
    lines = [f"profile: {out}"] if out is not None else []
    return lines + [
        f"model: {profile.model} ({profile.num_layers} layers × {profile.num_heads} query heads / "
        f"{profile.num_kv_heads} KV heads, head size {profile.head_dim})",
        f"calibration: {profile.samples} × {profile.seq_len} tokens of {profile.calibration_data}",
        f"entropy: {profile.entropy_source} states, H_{profile.entropy_rank_k} / ln {profile.head_dim}, "
        f"layer mean {float(profile.layer_entropy.min()):.3f}…{float(profile.layer_entropy.max()):.3f}",
        f"stages (ε = {profile.stage_threshold:g}): {profile.num_stages} — layers {stages}",
        f"head groups: {profile.groups} per layer by KV head, budget shares {shares}",
        f"time: {seconds:.1f} s",
    ]


@handle_errors
def calibrate(
    out: Annotated[Path, typer.Option("--out", "-o", help="Where to write the profile (.safetensors).")],
    data_args: Annotated[
        list[str] | None,
        typer.Argument(metavar="DATA", help="More calibration data (same forms as --data)."),
    ] = None,
    model: Annotated[
        str | None,
        typer.Option("--model", "-m", help="Model: name, local folder or .gguf (default: embedded SmolLM2-135M)."),
    ] = None,
    data: Annotated[list[str] | None, typer.Option("--data", "-d", metavar="PATH", help=DATA_HELP)] = None,
    samples: Annotated[int, typer.Option(help="Number of calibration windows.")] = 8,
    seq_len: Annotated[int, typer.Option(help="Tokens per window.")] = 2048,
    groups: Annotated[
        int | None,
        typer.Option(help="Head groups per layer, by KV head (default 2, or the number of KV heads if fewer)."),
    ] = None,
    stage_threshold: Annotated[float, typer.Option(help=STAGE_THRESHOLD_HELP)] = DEFAULT_STAGE_THRESHOLD,
    rank_k: Annotated[
        int | None, typer.Option(help="Eigenvalues kept in the truncated entropy (default: head size / 4).")
    ] = None,
    source: Annotated[str, typer.Option(help="States measured: query (as the paper) or key.")] = "query",
    kv_aggregation: Annotated[
        str, typer.Option(help="How query heads sharing a KV head combine: mean or max.")
    ] = "mean",
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:1, mps.")] = "auto",
    dtype: Annotated[str, typer.Option(help="auto, float32, bfloat16, float16.")] = "auto",
    json_output: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """Measure the truncated matrix entropy of every attention head and save a calibration profile."""
    from uncomp_cli.errors import UncompError
    from uncomp_cli.profile.file import save_profile

    if out.is_dir():
        raise UncompError(f"--out {out} is a folder; give a file name such as {out / 'profile.safetensors'}")
    if not out.parent.is_dir():
        raise UncompError(f"--out {out}: folder {out.parent} does not exist")
    started = time.perf_counter()
    profile = run_calibration(
        model=model,
        data=[*(data or []), *(data_args or [])],
        samples=samples,
        seq_len=seq_len,
        groups=groups,
        stage_threshold=stage_threshold,
        rank_k=rank_k,
        source=source,
        kv_aggregation=kv_aggregation,
        device=device,
        dtype=dtype,
    )
    save_profile(profile, out)
    seconds = time.perf_counter() - started
    if json_output:
        meta = profile.metadata()
        meta.pop("model_config", None)
        typer.echo(
            json.dumps(
                {
                    "profile": str(out),
                    "seconds": round(seconds, 2),
                    "num_stages": profile.num_stages,
                    "metadata": meta,
                },
                indent=2,
            )
        )
    else:
        typer.echo("\n".join(summary_lines(profile, out, seconds)))
