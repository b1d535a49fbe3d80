"""Calibration as the commands run it (``calibrate``, ``inspect-heads --model``): shared help texts,
model loading and a progress bar on stderr around :func:`~uncomp_cli.profile.calibrate.calibrate`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

import typer

from uncomp_cli.cli.common import stderr_console
from uncomp_cli.cli.options import Device, Dtype, option, with_options
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


#: What to calibrate on and how: ``calibrate`` and ``inspect-heads --model`` take them, as one dict.
CALIBRATION_OPTIONS = [
    option("data", Annotated[list[str] | None, typer.Option("--data", "-d", metavar="PATH", help=DATA_HELP)]),
    option("samples", Annotated[int, typer.Option(help="Number of calibration windows.")], 8),
    option("seq_len", Annotated[int, typer.Option(help="Tokens per window.")], 2048),
    option("groups", Annotated[int | None, typer.Option(
        help="Head groups per layer, by KV head (default 2, or the number of KV heads if fewer).")]),
    option("stage_threshold", Annotated[float, typer.Option(help=STAGE_THRESHOLD_HELP)], DEFAULT_STAGE_THRESHOLD),
    option("rank_k", Annotated[int | None, typer.Option(
        help="Eigenvalues kept in the truncated entropy (default: head size / 4).")]),
    option("source", Annotated[str, typer.Option(help="States measured: query (as the paper) or key.")], "query"),
    option("kv_aggregation", Annotated[str, typer.Option(
        help="How query heads sharing a KV head combine: mean or max.")], "mean"),
    option("device", Device, "auto"),
    option("dtype", Dtype, "auto"),
]

with_calibration_options = with_options("calibration", CALIBRATION_OPTIONS)


def run_calibration(model: str | None, calibration: dict, more_data: list[str] | None = None) -> Profile:
    """Check the settings, read the data, load the model and calibrate with a progress bar on stderr.

    Cheap checks and data reading come before the model is loaded, so bad input fails fast; the
    calibration itself is :func:`~uncomp_cli.profile.calibrate.calibrate_loaded`.
    """
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from uncomp_cli.profile.calibrate import calibrate, calibration_windows, check_settings
    from uncomp_cli.profile.calibration_text import read_texts

    settings = dict(calibration)
    data = [*(settings.pop("data") or []), *(more_data or [])]
    device, dtype = settings.pop("device"), settings.pop("dtype")
    samples, seq_len = settings.pop("samples"), settings.pop("seq_len")
    measured = settings  # groups, stage_threshold, rank_k, source, kv_aggregation
    check_settings(samples=samples, seq_len=seq_len, **measured)
    text = read_texts(data) if data else None
    with stderr_console.status(f"loading {model or 'the default model'}…"):
        loaded = _load_model(model, device, dtype)
        windows = calibration_windows(loaded, text, samples=samples, seq_len=seq_len, **measured)

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
        layers = max(1, loaded.model.config.num_hidden_layers)
        task = progress.add_task("calibrate", total=samples * layers, sample=f"sample 1/{samples}")

        def advance(done: int, total: int) -> None:
            current = min(samples, done // layers + 1)
            progress.update(task, completed=done, total=total, sample=f"sample {current}/{samples}")

        return calibrate(loaded.model, windows, model_name=loaded.name, progress=advance, **measured)
