"""``uncomp inspect-heads``: show a profile's head entropies, stages and groups."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from uncomp_cli.cli.calibration import run_calibration, with_calibration_options
from uncomp_cli.cli.common import handle_errors, stderr_console


@handle_errors
@with_calibration_options
def inspect_heads(
    profile_path: Annotated[
        Path | None, typer.Argument(metavar="[PROFILE]", help="A profile written by `uncomp calibrate`.")
    ] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print the report as JSON on stdout.")] = False,
    csv_output: Annotated[
        bool, typer.Option("--csv", help="Print one CSV row per (layer, query head) on stdout.")
    ] = False,
    plot: Annotated[
        Path | None,
        typer.Option(help="Also write a heatmap image (needs matplotlib: pip install 'uncomp[plot]')."),
    ] = None,
    top: Annotated[int, typer.Option(help="How many highest/lowest heads to list.")] = 5,
    compare: Annotated[
        Path | None,
        typer.Option(help="Another profile of the same model: print rank correlations of the two instead."),
    ] = None,
    model: Annotated[
        str | None,
        typer.Option("--model", "-m", help="Calibrate this model on the fly instead of reading a PROFILE."),
    ] = None,
    calibration: dict | None = None,
) -> None:
    """Report head entropies as a layers × heads heatmap with groups and stages (or JSON / CSV / PNG).

    Give a PROFILE, or --model/--data to compute the report on the fly without saving a profile
    (the calibration options apply to that).
    With --compare OTHER, print how well the two profiles' head entropies agree (Spearman).
    """
    from rich.console import Console

    from uncomp_cli.errors import UncompError
    from uncomp_cli.profile.file import load_profile
    from uncomp_cli.profile.report import (
        compare_profiles,
        comparison_lines,
        csv_text,
        plot_heatmap,
        render_report,
        report_dict,
    )

    if json_output and csv_output:
        raise UncompError("choose one of --json and --csv")
    if compare is not None and csv_output:
        raise UncompError("--compare prints a summary (text or --json), not CSV")
    if top < 0:
        raise UncompError(f"--top must be zero or more (got {top})")
    on_the_fly = model is not None or bool(calibration["data"])
    if profile_path is not None and on_the_fly:
        raise UncompError("give either a PROFILE or --model/--data to calibrate on the fly, not both")
    if profile_path is None and not on_the_fly:
        raise UncompError("give a PROFILE file, or --model and/or --data to calibrate on the fly")
    if plot is not None and not plot.parent.is_dir():
        raise UncompError(f"--plot {plot}: folder {plot.parent} does not exist")

    other = load_profile(compare) if compare is not None else None
    if profile_path is not None:
        profile = load_profile(profile_path)
    else:
        profile = run_calibration(model, calibration)

    if plot is not None:
        plot_heatmap(profile, plot)
        stderr_console.print(f"wrote {plot}")
    if other is not None:
        comparison = compare_profiles(profile, other)
        text = json.dumps(comparison, indent=2) if json_output else "\n".join(comparison_lines(comparison))
        typer.echo(text)
    elif json_output:
        typer.echo(json.dumps(report_dict(profile, top), indent=2))
    elif csv_output:
        typer.echo(csv_text(profile), nl=False)
    else:
        render_report(profile, Console(), top)
