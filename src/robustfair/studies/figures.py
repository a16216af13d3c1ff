"""The two rows of AT-on-AD's Figure 1 (Hu et al., ICML 2023): gap of accuracy disparity and gap
of standard accuracy against the imbalance ratio R, one line per ε, one panel per norm. Error bars
are ± one standard error over seeds (std/√n, ddof = 0), the dots are the single seeds (their
spread), and dashed lines the closed form where there is one. The title names the data. Drawn
with matplotlib's Agg canvas (no display, no global backend switch)."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import numpy as np

from ..engine.io import atomic_write_bytes

ROWS = (("ad_gap", "gap of accuracy disparity (points)"),
        ("acc_gap", "gap of standard accuracy (points)"))
NORM_LABEL = {"l2": r"$\ell_2$", "linf": r"$\ell_\infty$"}


def _panel(ax: Any, results: dict[str, Any], norm: str, metric: str, ylabel: str) -> None:
    ratios = results["ratios"]
    xs = np.arange(len(ratios), dtype=float)
    cf = results.get("closed_form")
    rows = results["gaps"][norm]
    for k, row in enumerate(rows):
        shift = (k - (len(rows) - 1) / 2) * 0.08
        mean = [100 * v for v in row[f"{metric}_mean"]]
        se = [100 * v for v in row[f"{metric}_se"]]
        bar = ax.errorbar(xs + shift, mean, yerr=se, marker="o", capsize=3,
                          label=f"ε = {row['eps']:g}")
        color = bar.lines[0].get_color()
        seeds = 100 * np.asarray(row[metric], dtype=float)  # (R, seed)
        for i in range(len(ratios)):
            ax.scatter(np.full(seeds.shape[1], xs[i] + shift), seeds[i], s=9, alpha=0.35,
                       color=color, linewidths=0)
        if cf and norm in cf["gaps"]:
            ax.plot(xs + shift, [100 * v for v in cf["gaps"][norm][k][metric]], ls="--",
                    color=color, lw=1.0, alpha=0.8)
    ax.axhline(0.0, color="grey", lw=0.8, ls=":")
    ax.set_xticks(xs)
    ax.set_xticklabels([f"{r:g}" for r in ratios])
    ax.set_xlabel("imbalance ratio R")
    ax.set_ylabel(ylabel)
    ax.set_title(f"{NORM_LABEL.get(norm, norm)} adversarial training")
    ax.legend(fontsize=8)


def _save(fig: Any, path: Path) -> None:
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    atomic_write_bytes(path, buf.getvalue())


def caption(results: dict[str, Any]) -> str:
    """What the figure shows: the data, the model, the selection rule and the error bars."""
    n = len(results["seeds"])
    sel = results.get("selection", {})
    rule = f"selection by {sel.get('loss', 'clean')} validation loss" + (
        f" after {sel['min_epochs']} epochs" if sel.get("min_epochs") else "")
    cf = results.get("closed_form")
    extra = f"; dashed: closed form ({cf['loss']} optimum)" if cf else ""
    return (f"data: {results.get('data', results['dataset'])}; model {results['model']}, "
            f"{rule}. Error bars: ± standard error over {n} seeds (std/√n); "
            f"dots: single seeds{extra}.")


def plot_figure1(results: dict[str, Any], out_dir: str | Path) -> dict[str, str]:
    """Write ``figure1.png`` (both rows) and ``figure1_ad_gap.png`` / ``figure1_acc_gap.png``
    (one row each); return their paths."""
    from matplotlib.figure import Figure

    out = Path(out_dir)
    norms = results["norms"]
    width = max(4.8 * len(norms), 8.0)
    title = "\n".join(textwrap.wrap(caption(results), int(width * 13)))
    paths: dict[str, str] = {}
    fig = Figure(figsize=(width, 7.6), layout="constrained")
    axes = fig.subplots(2, len(norms), squeeze=False)
    for r, (metric, label) in enumerate(ROWS):
        for c, n in enumerate(norms):
            _panel(axes[r][c], results, n, metric, label)
    fig.suptitle(title, fontsize=8)
    _save(fig, out / "figure1.png")
    paths["figure1"] = str(out / "figure1.png")
    for metric, label in ROWS:
        fig = Figure(figsize=(width, 4.2), layout="constrained")
        axes = fig.subplots(1, len(norms), squeeze=False)
        for c, n in enumerate(norms):
            _panel(axes[0][c], results, n, metric, label)
        fig.suptitle(title, fontsize=8)
        path = out / f"figure1_{metric}.png"
        _save(fig, path)
        paths[metric] = str(path)
    return paths
