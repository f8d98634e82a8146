"""PNG plots of a run from run_dir/metrics.jsonl (matplotlib's Agg canvas; no pyplot global state).

* loss.png: train "loss" (and "loss/<task>") and eval "eval/<task>/logloss" vs step;
* auc.png: windowed "train_auc/<task>" and "eval/<task>/auc" (and "eval/<task>/uauc") vs step;
* throughput.png: "samples_per_s" (and "samples_per_s_per_rank") and "mfu" vs step;
* moe_activation.png: heatmap (layers x tokens) of the last logged "moe/active_LT".

Shapes: L RankMixer layers, T tokens. A plot whose keys never appear is skipped. When a step
appears twice (rows of an attempt that crashed after its last checkpoint, then the resumed run),
the later row wins.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

Series = dict[str, dict[int, float]]  # key -> {step: value}


def read_metrics(path: Path) -> tuple[Series, dict[str, Any]]:
    """Numeric series per key, and the last (step, non-scalar value) per key (e.g. "moe/active_LT").

    A line that is not JSON (a row cut by a crash) is skipped with a warning naming file and line.
    """
    series: Series = {}
    last_other: dict[str, Any] = {}
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            step = int(row["step"])
        except (ValueError, KeyError, TypeError):
            warnings.warn(f"{path}:{lineno}: not a metrics row with a 'step'; skipped", RuntimeWarning, stacklevel=2)
            continue
        for key, value in row.items():
            if key in ("step", "time"):
                continue
            if isinstance(value, int | float) and not isinstance(value, bool):
                series.setdefault(key, {})[step] = float(value)
            elif value is not None and not isinstance(value, str):
                last_other[key] = (step, value)
    return series, last_other


def _plot_lines(ax: Any, series: Series, keys: list[str], style: str = "-") -> int:
    drawn = 0
    for key in keys:
        points = sorted(series.get(key, {}).items())
        if points:
            ax.plot(
                [s for s, _ in points],
                [v for _, v in points],
                style,
                label=key,
                marker="." if len(points) < 50 else None,
            )
            drawn += 1
    return drawn


def _save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=110)
    return path


def _tasks(series: Series, prefix: str, suffix: str = "") -> list[str]:
    """Keys of `series` that start with `prefix` and end with `suffix`, sorted."""
    return sorted(k for k in series if k.startswith(prefix) and k.endswith(suffix))


def _line_plot(path: Path, title: str, ylabel: str, series: Series, solid: list[str], dashed: list[str]) -> Path | None:
    if not any(series.get(k) for k in solid + dashed):
        return None
    fig = Figure(figsize=(8, 4.5))
    ax = fig.add_subplot()
    _plot_lines(ax, series, solid, "-")
    _plot_lines(ax, series, dashed, "--")
    ax.set(title=title, xlabel="step", ylabel=ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    return _save(fig, path)


def _draw_heatmap(fig: Figure, matrix_LT: list[list[float]], title: str) -> None:
    ax = fig.add_subplot()
    finite = [v for row in matrix_LT for v in row if v == v]
    vmax = 1.0 if finite and max(finite) <= 1.0 else None  # shares: a fixed 0..1 scale compares runs
    im = ax.imshow(matrix_LT, aspect="auto", cmap="viridis", vmin=0.0, vmax=vmax, interpolation="nearest")
    ax.set(title=title, xlabel="token", ylabel="layer")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    if len(matrix_LT) * len(matrix_LT[0]) <= 64:
        for layer, row in enumerate(matrix_LT):
            for token, v in enumerate(row):
                ax.text(token, layer, f"{v:.2f}", ha="center", va="center", color="w" if v < 0.6 else "k", fontsize=8)
    fig.colorbar(im, ax=ax, label="share of experts active")
    fig.tight_layout()


def _check_matrix(matrix_LT: Any, key: str) -> list[list[float]]:
    if not (isinstance(matrix_LT, list) and matrix_LT and all(isinstance(r, list) and r for r in matrix_LT)):
        raise ValueError(f"{key}: expected a non-empty L x T nested list of numbers, got {type(matrix_LT).__name__}")
    if len({len(r) for r in matrix_LT}) != 1:
        raise ValueError(f"{key}: rows have different lengths {[len(r) for r in matrix_LT]}; expected L x T")
    return [[float(v) if v is not None else float("nan") for v in r] for r in matrix_LT]


def heatmap_rgb(matrix_LT: list[list[float]], title: str) -> Any:
    """An H x W x 4 uint8 numpy image of a layers x tokens heatmap (for a W&B image)."""
    fig = Figure(figsize=(6, 3.5))
    canvas = FigureCanvasAgg(fig)
    _draw_heatmap(fig, _check_matrix(matrix_LT, title), title)
    canvas.draw()
    import numpy as np  # noqa: PLC0415

    return np.asarray(canvas.buffer_rgba()).copy()


def write_plots(run_dir: Path) -> list[Path]:
    """Write the PNG plots of run_dir/metrics.jsonl into run_dir; return the paths written.

    Raises:
        FileNotFoundError: run_dir/metrics.jsonl is missing.
    """
    run_dir = Path(run_dir)
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"write_plots: {path} not found (MetricsLogger writes it on rank 0)")
    series, other = read_metrics(path)
    written = [
        _line_plot(
            run_dir / "loss.png",
            "loss",
            "loss, logloss (nats)",
            series,
            ["loss", *_tasks(series, "loss/")],
            _tasks(series, "eval/", "/logloss"),
        ),
        _line_plot(
            run_dir / "auc.png",
            "AUC (train: windowed)",
            "AUC",
            series,
            [*_tasks(series, "train_auc/"), *_tasks(series, "eval/", "/auc")],
            _tasks(series, "eval/", "/uauc"),
        ),
    ]
    if series.get("samples_per_s") or series.get("mfu"):
        fig = Figure(figsize=(8, 6))
        ax_top, ax_bottom = fig.subplots(2, 1, sharex=True)
        _plot_lines(ax_top, series, ["samples_per_s", "samples_per_s_per_rank"])
        ax_top.set(title="throughput", ylabel="samples/s")
        if _plot_lines(ax_bottom, series, ["mfu"]):
            ax_bottom.yaxis.set_major_formatter(lambda v, _: f"{100 * v:.1f}%")
        ax_bottom.set(xlabel="step", ylabel="MFU")
        for ax in (ax_top, ax_bottom):
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize="small")
        fig.tight_layout()
        written.append(_save(fig, run_dir / "throughput.png"))
    if "moe/active_LT" in other:
        fig = Figure(figsize=(8, 4.5))
        step, matrix = other["moe/active_LT"]
        _draw_heatmap(fig, _check_matrix(matrix, f"{path}: moe/active_LT"), f"MoE activation ratio (step {step})")
        written.append(_save(fig, run_dir / "moe_activation.png"))
    return [p for p in written if p is not None]
