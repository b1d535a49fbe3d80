"""Rendering a :class:`Profile` for people (rich heatmap) and pipelines (JSON, CSV, PNG).

Nothing here calibrates: everything is read from profiles (:func:`compare_profiles` correlates
two). The caller chooses the console (``uncomp inspect-heads`` prints its report on stdout,
because the report is its result).
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import torch
from rich.console import Console, Group
from rich.style import Style
from rich.table import Table
from rich.text import Text

from uncomp_cli.errors import UncompError
from uncomp_cli.profile.file import Profile

CSV_COLUMNS = (
    "layer",
    "head",
    "kv_head",
    "entropy",
    "entropy_std",
    "kv_head_entropy",
    "group",
    "budget_share",
    "stage",
    "keep_fraction",
)


@dataclass(frozen=True)
class HeadRow:
    """One query head of one layer, with everything the profile says about it."""

    layer: int
    head: int
    kv_head: int
    entropy: float
    entropy_std: float
    kv_head_entropy: float
    group: int
    budget_share: float
    stage: int
    keep_fraction: float

    def as_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in CSV_COLUMNS}


def head_rows(profile: Profile) -> list[HeadRow]:
    """Every (layer, query head), layer-major."""
    per_kv = profile.num_heads // profile.num_kv_heads
    share = profile.kv_head_share()
    keep = profile.layer_keep_fraction()
    rows = []
    for layer in range(profile.num_layers):
        for head in range(profile.num_heads):
            kv = head // per_kv
            rows.append(
                HeadRow(
                    layer=layer,
                    head=head,
                    kv_head=kv,
                    entropy=round(float(profile.head_entropy[layer, head]), 6),
                    entropy_std=round(float(profile.head_entropy_std[layer, head]), 6),
                    kv_head_entropy=round(float(profile.kv_head_entropy[layer, kv]), 6),
                    group=int(profile.kv_head_group[layer, kv]),
                    budget_share=round(float(share[layer, kv]), 6),
                    stage=int(profile.layer_stage[layer]),
                    keep_fraction=round(float(keep[layer]), 6),
                )
            )
    return rows


def stage_spans(profile: Profile) -> list[dict[str, Any]]:
    """``[{stage, first_layer, last_layer, keep_fraction}]`` in order."""
    spans = []
    for stage in range(profile.num_stages):
        layers = (profile.layer_stage == stage).nonzero().flatten().tolist()
        if layers:
            spans.append(
                {
                    "stage": stage,
                    "first_layer": layers[0],
                    "last_layer": layers[-1],
                    "keep_fraction": round(float(profile.stage_keep_fraction[stage]), 6),
                }
            )
    return spans


def extremes(profile: Profile, count: int = 5) -> tuple[list[HeadRow], list[HeadRow]]:
    """The ``count`` highest- and lowest-entropy query heads."""
    rows = sorted(head_rows(profile), key=lambda r: r.entropy)
    count = min(count, len(rows))
    return rows[::-1][:count], rows[:count]


def report_dict(profile: Profile, count: int = 5) -> dict[str, Any]:
    """Everything for ``--json``: the profile's metadata, stages, groups and every head."""
    highest, lowest = extremes(profile, count)
    return {
        "profile": profile.metadata(),
        "layer_entropy": [round(float(v), 6) for v in profile.layer_entropy],
        "stages": stage_spans(profile),
        "group_budget_share": [round(float(v), 6) for v in profile.group_budget_share],
        "kv_head_group": profile.kv_head_group.tolist(),
        "heads": [row.as_dict() for row in head_rows(profile)],
        "highest": [row.as_dict() for row in highest],
        "lowest": [row.as_dict() for row in lowest],
    }


def write_csv(profile: Profile, stream: IO[str]) -> None:
    """One row per (layer, query head) with the columns of :data:`CSV_COLUMNS`."""
    writer = csv.DictWriter(stream, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in head_rows(profile):
        writer.writerow(row.as_dict())


def csv_text(profile: Profile) -> str:
    buffer = io.StringIO()
    write_csv(profile, buffer)
    return buffer.getvalue()


# ------------------------------------------------------------------------------------ comparison
def _average_ranks(values: torch.Tensor) -> torch.Tensor:
    """Ranks 0…n−1 of a 1-D tensor, ties sharing their average rank. Returns float64."""
    order = values.argsort(stable=True)
    ranks = torch.empty(values.numel(), dtype=torch.float64)
    ranks[order] = torch.arange(values.numel(), dtype=torch.float64)
    _, inverse = torch.unique(values, return_inverse=True)
    sums = torch.zeros(int(inverse.max()) + 1, dtype=torch.float64).index_add_(0, inverse, ranks)
    return (sums / torch.bincount(inverse).double())[inverse]


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation of two equally long sequences (NaN when either is constant)."""
    ra, rb = _average_ranks(a.flatten().double()), _average_ranks(b.flatten().double())
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denominator = float(ra.norm() * rb.norm())
    return float((ra * rb).sum()) / denominator if denominator > 0 else math.nan


def compare_profiles(a: Profile, b: Profile) -> dict[str, Any]:
    """How far two profiles of the same model agree (e.g. calibrated on different text).

    spearman_heads: over all (layer, query head) entropies; spearman_heads_within_layer: the mean
    over layers of the correlation across one layer's heads; spearman_layers: over layer means;
    kv_group_agreement: share of (layer, KV head) put in the same group; same_stages: identical
    stage per layer.
    """
    if a.shape != b.shape:
        raise UncompError(f"the profiles are for different models: {_geometry(a)} vs {_geometry(b)}")
    within = [spearman(a.head_entropy[layer], b.head_entropy[layer]) for layer in range(a.num_layers)]
    within = [v for v in within if not math.isnan(v)]
    return {
        "a": {
            "model": a.model,
            "calibration_data": a.calibration_data,
            "samples": a.samples,
            "seq_len": a.seq_len,
        },
        "b": {
            "model": b.model,
            "calibration_data": b.calibration_data,
            "samples": b.samples,
            "seq_len": b.seq_len,
        },
        "spearman_heads": round(spearman(a.head_entropy, b.head_entropy), 4),
        "spearman_heads_within_layer": round(sum(within) / len(within), 4) if within else math.nan,
        "spearman_kv_heads": round(spearman(a.kv_head_entropy, b.kv_head_entropy), 4),
        "spearman_layers": round(spearman(a.layer_entropy, b.layer_entropy), 4),
        "kv_group_agreement": round(float((a.kv_head_group == b.kv_head_group).double().mean()), 4)
        if a.groups == b.groups
        else math.nan,
        "same_stages": bool(torch.equal(a.layer_stage, b.layer_stage)),
        "stages": [a.num_stages, b.num_stages],
    }


def _geometry(p: Profile) -> str:
    return f"{p.model} ({p.num_layers} layers × {p.num_heads} query heads / {p.num_kv_heads} KV heads)"


def comparison_lines(result: dict[str, Any]) -> list[str]:
    """Human lines for :func:`compare_profiles`."""
    return [
        f"A: {result['a']['model']}, {result['a']['samples']} × {result['a']['seq_len']} tokens of "
        f"{result['a']['calibration_data']}",
        f"B: {result['b']['model']}, {result['b']['samples']} × {result['b']['seq_len']} tokens of "
        f"{result['b']['calibration_data']}",
        f"Spearman over all heads: {result['spearman_heads']:.3f}",
        f"Spearman within a layer (mean over layers): {result['spearman_heads_within_layer']:.3f}",
        f"Spearman over KV heads: {result['spearman_kv_heads']:.3f}",
        f"Spearman over layer means: {result['spearman_layers']:.3f}",
        f"same KV-head group: {result['kv_group_agreement']:.1%}",
        f"stages: {result['stages'][0]} vs {result['stages'][1]}"
        f" ({'identical' if result['same_stages'] else 'different'} per layer)",
    ]


# ------------------------------------------------------------------------------------ rich report
def _heat(value: float, low: float, high: float) -> Style:
    """Blue (low) → white → red (high)."""
    t = 0.5 if high <= low else min(1.0, max(0.0, (value - low) / (high - low)))
    if t < 0.5:
        u = t / 0.5
        rgb = (int(40 + 215 * u), int(90 + 165 * u), 255)
    else:
        u = (t - 0.5) / 0.5
        rgb = (255, int(255 - 190 * u), int(255 - 215 * u))
    return Style(bgcolor=f"rgb({rgb[0]},{rgb[1]},{rgb[2]})", color="black")


def heatmap_table(profile: Profile) -> Table:
    """Layers × query heads, each cell the head's entropy × 100 on a blue→red scale.

    Query heads are laid out by KV head; after each KV head's block, ``g`` is its group.
    """
    low, high = float(profile.head_entropy.min()), float(profile.head_entropy.max())
    per_kv = profile.num_heads // profile.num_kv_heads
    table = Table(box=None, padding=(0, 1, 0, 0), show_edge=False, pad_edge=False)
    table.add_column("layer", justify="right")
    table.add_column("stg", justify="right")
    table.add_column("keep", justify="right")
    table.add_column("mean", justify="right")
    for kv in range(profile.num_kv_heads):
        for offset in range(per_kv):
            table.add_column(f"q{kv * per_kv + offset}", justify="center", min_width=2)
        table.add_column(f"g{kv}", justify="center", style="bold")
    keep = profile.layer_keep_fraction()
    for layer in range(profile.num_layers):
        cells: list[Any] = [
            str(layer),
            str(int(profile.layer_stage[layer])),
            f"{float(keep[layer]):.2f}",
            f"{float(profile.layer_entropy[layer]) * 100:.1f}",
        ]
        for kv in range(profile.num_kv_heads):
            for offset in range(per_kv):
                value = float(profile.head_entropy[layer, kv * per_kv + offset])
                cells.append(Text(f"{value * 100:2.0f}", style=_heat(value, low, high)))
            cells.append(str(int(profile.kv_head_group[layer, kv])))
        table.add_row(*cells, end_section=_stage_ends(profile, layer))
    return table


def _stage_ends(profile: Profile, layer: int) -> bool:
    return layer + 1 < profile.num_layers and int(profile.layer_stage[layer + 1]) != int(profile.layer_stage[layer])


def _extremes_table(title: str, rows: list[HeadRow]) -> Table:
    table = Table(title=title, title_justify="left", box=None, padding=(0, 2, 0, 0), show_edge=False)
    for name in ("layer", "head", "kv head", "group", "entropy", "± std"):
        table.add_column(name, justify="right")
    for row in rows:
        table.add_row(
            str(row.layer),
            str(row.head),
            str(row.kv_head),
            str(row.group),
            f"{row.entropy:.4f}",
            f"{row.entropy_std:.4f}",
        )
    return table


def render_report(profile: Profile, console: Console, count: int = 5) -> None:
    """Print the heatmap, the stages, the groups and the extreme heads to ``console``."""
    shares = " / ".join(f"×{float(s):.2f}" for s in profile.group_budget_share)
    stages = "  ".join(
        f"{s['stage']}: layers {s['first_layer']}–{s['last_layer']} keep {s['keep_fraction']:.0%}"
        for s in stage_spans(profile)
    )
    header = Text.assemble(
        (profile.model, "bold"),
        f": {profile.num_layers} layers × {profile.num_heads} query heads ({profile.num_kv_heads} KV heads), "
        f"head size {profile.head_dim}\n",
        f"entropy: {profile.entropy_source} states, H_{profile.entropy_rank_k} / ln {profile.head_dim} (cells ×100)\n",
        f"data: {profile.samples} × {profile.seq_len} tokens of {profile.calibration_data}\n",
        f"stages (ε = {profile.stage_threshold:g}): {stages}\n",
        f"groups: {profile.groups} per layer by KV head (g; 0 = lowest), budget shares {shares}",
    )
    highest, lowest = extremes(profile, count)
    console.print(
        Group(
            header,
            Text(""),
            heatmap_table(profile),
            Text(""),
            _extremes_table(f"highest-entropy heads (top {len(highest)})", highest),
            Text(""),
            _extremes_table(f"lowest-entropy heads (bottom {len(lowest)})", lowest),
        )
    )


# ------------------------------------------------------------------------------------ image
def plot_heatmap(profile: Profile, path: str | Path) -> Path:
    """Write a layers × heads heatmap (PNG or any format matplotlib knows from the suffix).

    Needs matplotlib (the ``plot`` extra); raises :class:`UncompError` with the install line if absent.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise UncompError("--plot needs matplotlib: pip install 'uncomp[plot]'") from None
    path = Path(path)
    if not path.parent.is_dir():
        raise UncompError(f"cannot write {path}: folder {path.parent} does not exist")
    per_kv = profile.num_heads // profile.num_kv_heads
    figure = Figure(figsize=(max(6.0, 0.45 * profile.num_heads + 3), max(4.5, 0.25 * profile.num_layers + 1.5)))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    image = axes.imshow(profile.head_entropy.numpy(), aspect="auto", cmap="coolwarm", interpolation="nearest")
    figure.colorbar(image, ax=axes, label=f"H_{profile.entropy_rank_k} / ln {profile.head_dim}")
    for layer in range(profile.num_layers):
        for head in range(profile.num_heads):
            axes.text(
                head,
                layer,
                str(int(profile.kv_head_group[layer, head // per_kv])),
                ha="center",
                va="center",
                fontsize=6,
                color="black",
            )
    for boundary in range(1, profile.num_heads // per_kv):
        axes.axvline(boundary * per_kv - 0.5, color="black", linewidth=1)
    for layer in range(profile.num_layers - 1):
        if _stage_ends(profile, layer):
            axes.axhline(layer + 0.5, color="black", linewidth=1.5, linestyle="--")
    axes.set_xlabel("query head (blocks: KV heads; digits: group)")
    axes.set_ylabel("layer (dashed: stage boundaries)")
    axes.set_title(f"{profile.model}: {profile.entropy_source} entropy per head")
    figure.tight_layout()
    try:
        figure.savefig(path, dpi=120)
    except (OSError, ValueError) as exc:
        path.unlink(missing_ok=True)
        raise UncompError(f"cannot write {path}: {exc}") from None
    return path
