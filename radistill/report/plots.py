"""The report's pictures, each a function from plain data to a matplotlib figure (saved by the caller)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and CI

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

TEACHER_COLOR = "black"


def _colors(names: list[str]) -> dict[str, str]:
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    return {name: cycle[i % len(cycle)] for i, name in enumerate(names)}


def head_heatmap(scan: dict, kept: list[tuple[int, int]], title: str) -> Figure:
    """Layers × heads grid of the scan's score, with ``kept`` heads outlined and numbered by rank."""
    layout = scan["layout"]
    grid = np.full((layout["num_layers"], layout["num_heads"]), np.nan)
    for row in scan["heads"]:
        grid[row["layer"], row["head"]] = row["score"]
    rank = {(row["layer"], row["head"]): i + 1 for i, row in enumerate(scan["heads"])}
    fig, ax = plt.subplots(figsize=(max(6.0, 0.35 * grid.shape[1] + 2), max(3.5, 0.3 * grid.shape[0] + 1.5)))
    image = ax.imshow(grid, cmap="viridis", aspect="auto", origin="upper")
    for layer, head in kept:
        ax.add_patch(Rectangle((head - 0.5, layer - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2))
        if (layer, head) in rank and grid.shape[1] <= 40:
            ax.text(head, layer, str(rank[(layer, head)]), ha="center", va="center", color="white", fontsize=7)
    ax.set_xticks(range(grid.shape[1]))
    ax.set_yticks(range(grid.shape[0]))
    ax.set_xlabel("query head")
    ax.set_ylabel("layer")
    ax.set_title(title, fontsize=10)
    fig.colorbar(image, ax=ax, label=f"score ({scan.get('metric', '?')} drop)")
    fig.tight_layout()
    return fig


def training_curves(metrics: dict[str, list[dict]]) -> Figure:
    """Loss against tokens, one panel per stage, one line per student."""
    stages = sorted({row["stage"] for rows in metrics.values() for row in rows if "loss" in row})
    colors = _colors(list(metrics))
    fig, axes = plt.subplots(1, len(stages), figsize=(4.2 * len(stages), 3.2), squeeze=False)
    for ax, stage in zip(axes[0], stages):
        for name, rows in metrics.items():
            points = [(row.get("tokens", row.get("step", 0)), row["loss"]) for row in rows
                      if row.get("stage") == stage and "loss" in row]
            if points:
                x, y = zip(*points)
                ax.plot(x, y, label=name, color=colors[name])
        ax.set_title(f"stage {stage}")
        ax.set_xlabel("tokens")
        ax.set_ylabel("loss")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def kv_by_size(curves: dict[str, dict[str, dict[int, float]]]) -> Figure:
    """KV-retrieval accuracy against dictionary size: ``curves[model][scoring][pairs] = accuracy``.

    Solid lines score by log-likelihood over the choices, dashed by greedy generation; the teacher is black.
    """
    colors = _colors([m for m in curves if m != "teacher"])
    colors["teacher"] = TEACHER_COLOR
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for model, scorings in curves.items():
        for scoring, style in (("loglik", "-"), ("generation", "--")):
            points = sorted(scorings.get(scoring, {}).items())
            if points:
                x, y = zip(*points)
                ax.plot(x, [100 * v for v in y], style, marker="o", color=colors[model], label=f"{model} ({scoring})")
    ax.set_xlabel("key-value pairs in the prompt")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(-3, 103)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return fig


def memory_curves(rows: dict[str, dict[int, int]]) -> Figure:
    """Cache bytes per sequence against context length: ``rows[model][length] = bytes``."""
    colors = _colors([m for m in rows if m != "teacher"])
    colors["teacher"] = TEACHER_COLOR
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for model, points in rows.items():
        x, y = zip(*sorted(points.items()))
        ax.plot(x, [v / 1e6 for v in y], marker="o", color=colors[model], label=model)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("cache per sequence (MB)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
