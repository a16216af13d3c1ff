"""The two rows of AT-on-AD's Figure 1 (Hu et al., ICML 2023): gap of accuracy disparity and gap
of standard accuracy against the imbalance ratio R, one line per ε, one panel per norm, error
bars ± standard error over seeds. Drawn with matplotlib's Agg canvas (no display, no global
backend switch)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..engine.io import atomic_write_bytes

ROWS = (("ad_gap", "gap of accuracy disparity (points)"),
        ("acc_gap", "gap of standard accuracy (points)"))
NORM_LABEL = {"l2": r"$\ell_2$", "linf": r"$\ell_\infty$"}


def _panel(ax: Any, results: dict[str, Any], norm: str, metric: str, ylabel: str) -> None:
    ratios = results["ratios"]
    xs = list(range(len(ratios)))
    for row in results["gaps"][norm]:
        mean = [100 * v for v in row[f"{metric}_mean"]]
        se = [100 * v for v in row[f"{metric}_se"]]
        ax.errorbar(xs, mean, yerr=se, marker="o", capsize=3, label=f"ε = {row['eps']:g}")
    ax.axhline(0.0, color="grey", lw=0.8, ls="--")
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


def _title(results: dict[str, Any]) -> str:
    params = results.get("data_params") or {}
    extra = f" (α = {params['alpha']:g})" if "alpha" in params else ""
    return f"{results['dataset']}{extra}, {results['model']}, {len(results['seeds'])} seeds"


def plot_figure1(results: dict[str, Any], out_dir: str | Path) -> dict[str, str]:
    """Write ``figure1.png`` (both rows) and ``figure1_ad_gap.png`` / ``figure1_acc_gap.png``
    (one row each); return their paths."""
    from matplotlib.figure import Figure

    out = Path(out_dir)
    norms = results["norms"]
    paths: dict[str, str] = {}
    fig = Figure(figsize=(4.5 * len(norms), 7.0), layout="constrained")
    axes = fig.subplots(2, len(norms), squeeze=False)
    for r, (metric, label) in enumerate(ROWS):
        for c, n in enumerate(norms):
            _panel(axes[r][c], results, n, metric, label)
    fig.suptitle(_title(results))
    _save(fig, out / "figure1.png")
    paths["figure1"] = str(out / "figure1.png")
    for metric, label in ROWS:
        fig = Figure(figsize=(4.5 * len(norms), 3.6), layout="constrained")
        axes = fig.subplots(1, len(norms), squeeze=False)
        for c, n in enumerate(norms):
            _panel(axes[0][c], results, n, metric, label)
        fig.suptitle(_title(results))
        path = out / f"figure1_{metric}.png"
        _save(fig, path)
        paths[metric] = str(path)
    return paths
