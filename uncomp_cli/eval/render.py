"""Evaluation results for people: a summary table, per-run heatmaps (rich) and a PNG (matplotlib).

Everything is read from :class:`~uncomp_cli.eval.runner.EvalResult` (the same rows the run wrote),
so a resumed grid renders exactly like a fresh one. The caller chooses the console.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console, Group
from rich.style import Style
from rich.table import Table
from rich.text import Text

from uncomp_cli.errors import UncompError
from uncomp_cli.eval.runner import EvalResult
from uncomp_cli.files import atomic_open


def headline(scores: dict) -> float:
    """The score a cell shows: ``score`` (every metric's headline) or else the first one."""
    if "score" in scores:
        return float(scores["score"])
    return float(next(iter(scores.values()))) if scores else math.nan


@dataclass(frozen=True)
class Grid:
    """Mean headline score per (row, column) of one run; ``None`` where no example fell."""

    title: str
    row_axis: str
    col_axis: str
    rows: list
    cols: list
    values: list[list[float | None]]


def _axis_value(row: dict, axis: str):
    if axis in ("length", "task"):
        return row[axis]
    return row["meta"].get(axis)


def _ordered(values) -> list:
    """Numbers ascending; anything else in first-seen order."""
    unique = list(dict.fromkeys(v for v in values if v is not None))
    if all(isinstance(v, (int, float)) for v in unique):
        return sorted(unique)
    return unique


def make_grid(title: str, predictions: Sequence[dict], row_axis: str, col_axis: str) -> Grid:
    rows = _ordered(_axis_value(p, row_axis) for p in predictions)
    cols = _ordered(_axis_value(p, col_axis) for p in predictions)
    sums = {(r, c): [0.0, 0] for r in rows for c in cols}
    for p in predictions:
        key = (_axis_value(p, row_axis), _axis_value(p, col_axis))
        if key in sums:
            sums[key][0] += headline(p["scores"])
            sums[key][1] += 1
    values = [[sums[r, c][0] / sums[r, c][1] if sums[r, c][1] else None for c in cols] for r in rows]
    return Grid(title, row_axis, col_axis, rows, cols, values)


def grids(result: EvalResult, row_axis: str, col_axis: str) -> list[Grid]:
    """One grid per run, in run order."""
    return [make_grid(r.run.name, r.predictions, row_axis, col_axis) for r in result.runs]


def _label(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _score_style(value: float) -> Style:
    """Red (0) → yellow → green (1): accuracy reads at a glance."""
    t = min(1.0, max(0.0, value))
    red = 230 if t < 0.5 else int(230 - 180 * (t - 0.5) / 0.5)
    green = int(70 + 140 * t / 0.5) if t < 0.5 else 210
    return Style(bgcolor=f"rgb({red},{green},70)", color="black")


def heatmap_table(grid: Grid) -> Table:
    """Rows × columns, each cell the mean score × 100 on a red→green scale."""
    table = Table(box=None, padding=(0, 1, 0, 0), show_edge=False, pad_edge=False)
    table.add_column(f"{grid.row_axis} \\ {grid.col_axis}", justify="right", no_wrap=True)
    for col in grid.cols:
        table.add_column(_label(col), justify="center", min_width=4)
    for row, values in zip(grid.rows, grid.values):
        cells: list = [_label(row)]
        for value in values:
            cells.append(Text("  · ") if value is None else Text(f"{100 * value:4.0f}", style=_score_style(value)))
        table.add_row(*cells)
    return table


def _score_keys(result: EvalResult) -> list[str]:
    keys: dict[str, None] = {}
    for r in result.runs:
        for key in r.metrics.get("overall", {}):
            if key != "examples":
                keys[key] = None
    return sorted(keys, key=lambda k: (k != "score", list(keys).index(k)))


def summary_table(result: EvalResult) -> Table:
    """One row per run: mean scores × 100, KV bytes against the full cache, mean prefill time.

    Runs read back from an earlier invocation are marked ``*``.
    """
    keys = _score_keys(result)
    table = Table(box=None, padding=(0, 2, 0, 0), show_edge=False, pad_edge=False)
    table.add_column("run", no_wrap=True)
    for key in keys:
        table.add_column(key, justify="right")
    table.add_column("KV/full", justify="right")
    table.add_column("prefill s", justify="right")
    for r in result.runs:
        m = r.metrics
        overall = m.get("overall", {})
        ratio = m.get("kv_bytes_vs_full")
        table.add_row(
            f"{r.run.name}{' *' if r.skipped else ''}",
            *(f"{100 * overall[k]:.1f}" if k in overall else "" for k in keys),
            "" if ratio is None else f"{100 * ratio:.1f}%",
            f"{m.get('prefill_seconds_mean', math.nan):.2f}",
        )
    return table


def task_grid(result: EvalResult) -> Grid:
    """Tasks × runs in one grid: mean score of each task in each run (LongBench's view)."""
    rows = _ordered(p["task"] for r in result.runs for p in r.predictions)
    values = []
    for task in rows:
        line = []
        for r in result.runs:
            scores = [headline(p["scores"]) for p in r.predictions if p["task"] == task]
            line.append(sum(scores) / len(scores) if scores else None)
        values.append(line)
    return Grid("score by task", "task", "run", rows, [r.run.name for r in result.runs], values)


def render_eval(result: EvalResult, console: Console, panels: Sequence[Grid] = ()) -> None:
    """Header, summary table and the heatmaps ``panels`` (from :func:`grids` or :func:`task_grid`)."""
    model = result.config["model"]
    header = Text.assemble((f"{result.config['suite']}", "bold"), f" on {model['name']} ({model['device']}, "
                           f"{model['dtype']}): {result.config['examples']} examples per run; scores × 100\n",
                           f"results: {result.folder}")
    parts: list = [header, Text(""), summary_table(result)]
    if any(r.skipped for r in result.runs):
        parts.append(Text("* finished by an earlier invocation, read back"))
    for grid in panels:  # titles above, not in, the tables: rich wraps a title to its table's width
        parts += [Text(""), Text(f"{grid.title}: score × 100", style="bold"), heatmap_table(grid)]
    console.print(Group(*parts))


def check_plot_path(path: str | Path) -> None:
    """Fail before any work when ``--plot`` cannot be written: no matplotlib, or no such folder."""
    try:
        from matplotlib.backend_bases import FigureCanvasBase
    except ImportError:
        raise UncompError("--plot needs matplotlib: pip install 'uncomp[plot]'") from None
    path = Path(path)
    if not path.parent.is_dir():
        raise UncompError(f"--plot {path}: folder {path.parent} does not exist")
    formats = FigureCanvasBase.get_supported_filetypes()
    if path.suffix.lstrip(".").lower() not in formats:
        raise UncompError(f"--plot {path}: name an image file ({', '.join('.' + f for f in sorted(formats))})")


def plot_grids(result: EvalResult, panels: Sequence[Grid], path: str | Path) -> Path:
    """Write the heatmaps side by side (PNG or any format matplotlib knows from the suffix)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise UncompError("--plot needs matplotlib: pip install 'uncomp[plot]'") from None
    path = Path(path)
    if not panels:
        raise UncompError("--plot: nothing to plot")
    columns = min(len(panels), 4)
    lines = math.ceil(len(panels) / columns)
    width = max(len(panels[0].cols), 1) * 0.7 + 2.2
    height = max(len(panels[0].rows), 1) * 0.5 + 2.0
    figure = Figure(figsize=(columns * width + 1.2, lines * height + 0.5), layout="constrained")
    FigureCanvasAgg(figure)
    image = None
    for index, grid in enumerate(panels):
        axes = figure.add_subplot(lines, columns, index + 1)
        data = [[math.nan if v is None else 100 * v for v in row] for row in grid.values]
        image = axes.imshow(data, aspect="auto", cmap="RdYlGn", vmin=0, vmax=100, interpolation="nearest")
        for i, row in enumerate(data):
            for j, value in enumerate(row):
                if not math.isnan(value):
                    axes.text(j, i, f"{value:.0f}", ha="center", va="center", fontsize=7)
        axes.set_xticks(range(len(grid.cols)), [_label(c) for c in grid.cols], fontsize=7)
        axes.set_yticks(range(len(grid.rows)), [_label(r) for r in grid.rows], fontsize=7)
        axes.set_xlabel(grid.col_axis)
        axes.set_ylabel(grid.row_axis)
        axes.set_title(grid.title, fontsize=9)
    if image is not None:
        figure.colorbar(image, ax=figure.axes, label="score × 100")
    figure.suptitle(f"{result.config['suite']} on {result.config['model']['name']}")
    try:
        with atomic_open(path, "wb") as handle:
            figure.savefig(handle, format=path.suffix.lstrip(".").lower() or "png", dpi=120)
    except (OSError, ValueError) as exc:
        raise UncompError(f"cannot write {path}: {exc}") from None
    return path
