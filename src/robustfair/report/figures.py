"""Figures of the reports, drawn with matplotlib's Agg canvas and returned as base64 PNG.

Figures are built as :class:`matplotlib.figure.Figure` objects (not through ``pyplot``), so no
global figure state is kept and no display is needed.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

CLEAN_COLOR = "#8fb3d9"
ROBUST_COLOR = "#2b5d8c"
WORST_COLOR = "#d62728"


def to_png(fig: Figure, dpi: int = 90) -> bytes:
    """Render ``fig`` to PNG bytes (drawn once: the figures use the constrained layout)."""
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def new_figure(size: tuple[float, float]) -> Figure:
    """A figure of ``size`` inches with the constrained layout (labels and legends inside)."""
    return Figure(figsize=size, dpi=90, layout="constrained")


def to_base64(fig: Figure) -> str:
    return base64.b64encode(to_png(fig)).decode("ascii")


def _nan(values: Sequence[Any]) -> np.ndarray:
    return np.array([np.nan if v is None else float(v) for v in values], dtype=float)


def training_curves(epochs: Sequence[int], loss: Sequence[Any],
                    acc: dict[str, Sequence[Any]],
                    train_acc: dict[str, Sequence[Any]] | None = None) -> Figure:
    """Training loss and accuracy against epochs.

    The right panel shows the validation accuracy (overall and worst class) when the run
    validated, else the accuracy on the training batches (``train_acc``), else nothing: no
    empty panel is drawn.

    Args:
        epochs: epoch numbers.
        loss: training loss per epoch.
        acc: label → validation accuracy per epoch in [0, 1]; labels ending in "worst class"
            are dashed.
        train_acc: label → accuracy on the training batches per epoch in [0, 1].
    """
    right = acc or train_acc or {}
    fig = new_figure((11, 3.6) if right else (6, 3.6))
    axes = np.atleast_1d(fig.subplots(1, 2 if right else 1))
    ax1 = axes[0]
    ax1.plot(epochs, _nan(loss), marker="o", color="#444")
    ax1.set(xlabel="epoch", ylabel="training loss", title="loss")
    if right:
        ax2 = axes[1]
        colors: dict[str, Any] = {}
        for label, values in right.items():
            worst = label.endswith("worst class")
            key = label.rsplit(":", 1)[0]
            color = colors.setdefault(key, f"C{len(colors)}")
            ax2.plot(epochs, 100 * _nan(values), "--" if worst else "-", marker="o",
                     label=label, color=color)
        title = ("validation accuracy" if acc else
                 "accuracy on the training batches (validation is off)")
        ax2.set(xlabel="epoch", ylabel="accuracy (%)", title=title, ylim=(0, 100))
        ax2.legend(fontsize=8)
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    return fig


def class_bars(names: Sequence[str], clean: Sequence[Any], robust: Sequence[Any],
               attack: str, worst: int | None) -> Figure:
    """Per-class clean and robust accuracy as grouped bars; the worst class (robust) in red."""
    c = len(names)
    fig = new_figure((max(5.5, min(16.0, 0.45 * c + 2)), 3.2))
    ax = fig.subplots()
    x = np.arange(c)
    ax.bar(x - 0.2, 100 * _nan(clean), 0.4, label="clean", color=CLEAN_COLOR)
    colors = [WORST_COLOR if k == worst else ROBUST_COLOR for k in range(c)]
    ax.bar(x + 0.2, 100 * _nan(robust), 0.4, label=attack, color=colors)
    if worst is not None:
        ax.annotate("worst", (worst + 0.2, 100 * _nan(robust)[worst]), ha="center",
                    va="bottom", color=WORST_COLOR, fontsize=8)
    ax.set_xticks(x, [str(n) for n in names], rotation=90 if c > 20 else 0, fontsize=8)
    ax.set(ylabel="accuracy (%)", ylim=(0, 105), title=f"per-class accuracy: clean and {attack}")
    from matplotlib.patches import Patch

    handles = [Patch(color=CLEAN_COLOR, label="clean"), Patch(color=ROBUST_COLOR, label=attack)]
    if worst is not None:
        handles.append(Patch(color=WORST_COLOR, label=f"{attack}, worst class"))
    ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    ax.grid(axis="y", alpha=0.3)
    return fig


def heatmap(matrix: np.ndarray, names: Sequence[str], title: str, xlabel: str, ylabel: str,
            annotate: bool = True, fmt: str = "{:.2f}", cbar_label: str = "") -> Figure:
    """A square matrix as a heatmap (annotated with its values when small enough); the colour
    bar carries ``cbar_label``."""
    c = len(names)
    size = max(4.0, min(10.0, 0.4 * c + 1.5))
    fig = new_figure((size + 1, size))
    ax = fig.subplots()
    im = ax.imshow(matrix, cmap="viridis")
    cbar = fig.colorbar(im, ax=ax, shrink=0.8)
    cbar.set_label(cbar_label, fontsize=8)
    ticks = np.arange(c)
    ax.set_xticks(ticks, [str(n) for n in names], rotation=90 if c > 15 else 0, fontsize=7)
    ax.set_yticks(ticks, [str(n) for n in names], fontsize=7)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    if annotate and c <= 12:
        hi = np.nanmax(matrix) if matrix.size else 0
        for i in range(c):
            for j in range(c):
                v = matrix[i, j]
                ax.text(j, i, fmt.format(v), ha="center", va="center", fontsize=7,
                        color="black" if v > 0.6 * hi else "white")
    return fig


def eps_curve(eps: Sequence[float], per_class: Sequence[Sequence[Any]], avg: Sequence[Any],
              names: Sequence[str], attack: str, norm: str) -> Figure:
    """Robust accuracy against ε: one thin line per class, the average in black."""
    fig = new_figure((8, 4))
    ax = fig.subplots()
    pc = np.array([_nan(row) for row in per_class])  # (E, C)
    cmap = _class_colors(len(names))
    for k, name in enumerate(names):
        ax.plot(eps, 100 * pc[:, k], marker=".", lw=1, color=cmap[k], label=str(name))
    ax.plot(eps, 100 * _nan(avg), color="black", lw=2.5, marker="o", label="average")
    ax.set(xlabel=f"ε ({norm})", ylabel="accuracy (%)", ylim=(0, 102),
           title=f"{attack} accuracy against ε, per class")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2 if len(names) > 8 else 1, bbox_to_anchor=(1.01, 1),
              loc="upper left")
    return fig


def _class_colors(c: int) -> list[Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if c <= 10 else "tab20" if c <= 20 else "viridis"]
    return [cmap(k % cmap.N) if c <= 20 else cmap(k / max(c - 1, 1)) for k in range(c)]


def grouped_bars(labels: Sequence[str], series: dict[str, Sequence[Any]], title: str,
                 ylabel: str = "accuracy (%)", percent: bool = True) -> Figure:
    """Bars per label (e.g. per group), one colour per series (e.g. per attack)."""
    n, s = len(labels), max(len(series), 1)
    fig = new_figure((max(5.0, min(14.0, 0.8 * n * s / 2 + 3)), 3.4))
    ax = fig.subplots()
    x = np.arange(n)
    w = 0.8 / s
    for i, (name, values) in enumerate(series.items()):
        v = _nan(values) * (100 if percent else 1)
        ax.bar(x - 0.4 + w * (i + 0.5), v, w, label=name)
    ax.set_xticks(x, [str(lab) for lab in labels], fontsize=8)
    ax.set(title=title, ylabel=ylabel)
    if percent:
        ax.set_ylim(0, 105)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return fig


def state_over_epochs(epochs: Sequence[int], series: dict[str, np.ndarray],
                      names_for: dict[str, Sequence[str]]) -> Figure:
    """One panel per logged quantity: each column of ``series[key]`` (E, K) is a line."""
    keys = list(series)
    cols = min(2, len(keys))
    rows = (len(keys) + cols - 1) // cols
    fig = new_figure((11, 3.2 * rows))
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    for ax, key in zip(axes, keys, strict=False):
        values = series[key]
        names = names_for.get(key, [str(k) for k in range(values.shape[1])])
        colors = _class_colors(values.shape[1])
        for k in range(values.shape[1]):
            ax.plot(epochs, values[:, k], marker=".", color=colors[k],
                    label=str(names[k]) if values.shape[1] > 1 else None)
        ax.set(title=key, xlabel="epoch")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
        if 1 < values.shape[1] <= 20:  # beside the panel, never over the lines
            ax.legend(fontsize=6, ncol=1 if values.shape[1] <= 10 else 2, loc="upper left",
                      bbox_to_anchor=(1.01, 1), borderaxespad=0)
    for ax in axes[len(keys):]:
        ax.remove()
    return fig


def avg_vs_worst(points: Sequence[dict[str, Any]], attack: str, baseline: str | None) -> Figure:
    """Average against worst-class robust accuracy, one point per method (± std bars).

    Each point is ``{"label", "avg", "worst", "avg_std", "worst_std"}`` in [0, 1]."""
    fig = new_figure((6.5, 5))
    ax = fig.subplots()
    for p in points:
        is_base = p["label"] == baseline
        ax.errorbar(100 * p["avg"], 100 * p["worst"], xerr=100 * (p.get("avg_std") or 0),
                    yerr=100 * (p.get("worst_std") or 0), fmt="s" if is_base else "o",
                    color="#555" if is_base else ROBUST_COLOR, capsize=3, ms=7)
        ax.annotate(p["label"] + (" (baseline)" if is_base else ""),
                    (100 * p["avg"], 100 * p["worst"]), textcoords="offset points",
                    xytext=(6, 5), fontsize=8)
    ax.set(xlabel=f"average robust accuracy (%) [{attack}]",
           ylabel=f"worst-class robust accuracy (%) [{attack}]",
           title="robust accuracy: average against worst class")
    ax.grid(alpha=0.3)
    ax.margins(0.2)
    return fig
