"""``uncomp calibrate``: measure a model's head entropies and save the profile."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from uncomp_cli.cli.calibration import run_calibration, with_calibration_options
from uncomp_cli.cli.common import handle_errors

if TYPE_CHECKING:
    from uncomp_cli.profile.file import Profile

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
@with_calibration_options
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
    json_output: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
    calibration: dict | None = None,
) -> None:
    """Measure the truncated matrix entropy of every attention head and save a calibration profile."""
    from uncomp_cli.errors import UncompError
    from uncomp_cli.profile.file import save_profile

    if out.is_dir():
        raise UncompError(f"--out {out} is a folder; give a file name such as {out / 'profile.safetensors'}")
    if not out.parent.is_dir():
        raise UncompError(f"--out {out}: folder {out.parent} does not exist")
    started = time.perf_counter()
    profile = run_calibration(model, calibration, more_data=data_args)
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
