"""See what PART sees: test images, their class activation map and their ε map, as one PNG.

``robustfair analyze RUN --cam`` calls :func:`analyze_cam`. For a run trained with the ``pixel``
budget the grid uses that budget's settings (CAM method, layer, mask, ε_low); for any other run
it shows, labelled as hypothetical, what PART's defaults (GradCAM, jet mask, ε_low = 7/8·ε)
would give on its model, and logs a warning that the run never used such a map.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import click
import torch
from torch import Tensor

from ..errors import UserError

log = logging.getLogger("robustfair")

GRID_NAME = "cam_grid.png"


def _load_run(run_dir: Path) -> Any:
    """A Trainer of the run with the weights of its evaluation checkpoint loaded."""
    import yaml

    from ..config import build_config
    from ..data import load_data
    from ..engine.io import load_checkpoint
    from ..engine.trainer import Trainer

    cfg_file = run_dir / "config.yaml"
    if not cfg_file.is_file():
        raise UserError(f"{str(run_dir)!r} is not a run directory (no config.yaml); give the "
                        f"folder that 'robustfair train' created")
    cfg = build_config(yaml.safe_load(cfg_file.read_text(encoding="utf-8")))
    ckpt = run_dir / "checkpoints" / f"{cfg.eval.checkpoint}.pt"
    if not ckpt.is_file():
        ckpt = run_dir / "checkpoints" / "last.pt"
    if not ckpt.is_file():
        raise UserError(f"{str(run_dir)!r} has no checkpoint yet; train the run first")
    trainer = Trainer(cfg, run_dir, data=load_data(cfg.data), quiet=True)
    trainer.load_state_dict(load_checkpoint(ckpt, map_location=trainer.device))
    return trainer


def _pixel_budget(trainer: Any) -> tuple[Any, bool]:
    """The run's pixel budget, or PART's defaults for another run; and whether it is the run's."""
    from ..budgets.pixel import Pixel, PixelParams

    if isinstance(trainer.budget, Pixel):
        return trainer.budget, True
    eps = float(trainer.cfg.attack.eps)
    return Pixel(PixelParams(eps_low=eps * 7 / 8), ctx=None), False


def cam_panels(model: torch.nn.Module, budget: Any, x: Tensor, eps: float
               ) -> dict[str, Any]:
    """Everything the grid shows, for a batch: prediction, upsampled CAM, weights, ε map."""
    out, u, w = budget.cam_weights(model, x)
    eps_map = torch.lerp(torch.full_like(x, budget.eps_low), torch.full_like(x, eps), w)
    return {"pred": out.logits.argmax(1), "cam": u.clamp(0, 1), "weights": w, "eps_map": eps_map,
            "layer": out.layer}


def _to_hwc(img: Tensor) -> Any:
    a = img.detach().cpu().clamp(0, 1)
    return a[0].numpy() if a.shape[0] == 1 else a.permute(1, 2, 0).numpy()


def _uniform_text(eps_map: Tensor, eps: float, eps_low: float) -> str | None:
    """``None`` when the map varies; else what the single value is (float32 tolerance)."""
    lo, hi = float(eps_map.min()), float(eps_map.max())
    tol = 1e-6 * max(eps, 1e-12)
    if hi - lo > tol:
        return None
    if abs(lo - eps) <= tol:
        return f"uniform: ε = {eps:.4g}\nat every pixel"
    if abs(lo - eps_low) <= tol:
        return f"uniform: ε_low = {eps_low:.4g}\nat every pixel"
    return f"uniform: {lo:.4g}\nat every pixel"


def cam_figure(x: Tensor, y: Tensor, panels: dict[str, Tensor], class_names: list[str],
               title: str, eps: float, eps_low: float, hypothetical: bool = False) -> Any:
    """Rows of (image, CAM overlay, ε map) as a matplotlib Figure (Agg canvas).

    The ε map shows ε per pixel (the mean over channels for colour images) on one colour scale
    from ε_low to ε, with a colour bar; a map that is one value everywhere says so in its
    panel. ``hypothetical`` labels the maps as PART's defaults on a run that has no pixel
    budget."""
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n = len(x)
    fig = Figure(figsize=(7.6, 2.1 * n + 1.0), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(n, 3, squeeze=False)
    jet = matplotlib.colormaps["jet"]
    vmax = eps if eps > eps_low else eps_low + 1e-6
    channels = x.shape[1]
    im = None
    for i in range(n):
        img = _to_hwc(x[i])
        grey = img.ndim == 2
        name = lambda k: class_names[k] if k < len(class_names) else str(k)  # noqa: E731
        ax = axes[i]
        ax[0].imshow(img, cmap="gray" if grey else None, vmin=0, vmax=1)
        ax[0].set_title(f"label {name(int(y[i]))} / pred {name(int(panels['pred'][i]))}",
                        fontsize=8)
        ax[1].imshow(img, cmap="gray" if grey else None, vmin=0, vmax=1)
        ax[1].imshow(jet(panels["cam"][i].cpu().numpy())[..., :3], alpha=0.5)
        ax[1].set_title("CAM of the prediction (red: high)", fontsize=8)
        emap = panels["eps_map"][i].detach().cpu().double()
        im = ax[2].imshow(emap.mean(0).numpy(), cmap="viridis", vmin=eps_low, vmax=vmax)
        what = "hypothetical ε map" if hypothetical else "ε map"
        ax[2].set_title(f"{what}, mean {float(emap.mean()):.4g}", fontsize=8)
        uniform = _uniform_text(emap, eps, eps_low)
        if uniform is not None:
            ax[2].text(0.5, 0.5, uniform, transform=ax[2].transAxes, ha="center",
                       va="center", fontsize=7, color="white",
                       bbox={"facecolor": "black", "alpha": 0.55, "lw": 0})
        for a in ax:
            a.set_xticks([])
            a.set_yticks([])
    assert im is not None
    cbar = fig.colorbar(im, ax=list(axes[:, 2]), shrink=min(1.0, 0.5 + 0.1 * n))
    cbar.set_ticks([eps_low, vmax], labels=[f"ε_low {eps_low:.4g}", f"ε {eps:.4g}"])
    cbar.ax.tick_params(labelsize=8)
    cbar.set_label("ε per pixel" + (f" (mean of {channels} channels)" if channels > 1 else ""),
                   fontsize=8)
    legend = ("ε map: colour from ε_low (dark) to ε (bright), see the colour bar")
    if hypothetical:
        legend = (f"this run has no pixel budget: hypothetical ε maps with PART's defaults "
                  f"(ε_low = 7/8·ε = {eps_low:.4g})\n" + legend)
    fig.suptitle(f"{title}\n{legend}", fontsize=9)
    return fig


def save_grid(path: Path, x: Tensor, y: Tensor, panels: dict[str, Tensor],
              class_names: list[str], title: str, eps: float, eps_low: float,
              hypothetical: bool = False) -> Path:
    """Draw :func:`cam_figure` and write the PNG atomically."""
    import io

    from ..engine.io import atomic_write_bytes

    fig = cam_figure(x, y, panels, class_names, title, eps, eps_low, hypothetical)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    atomic_write_bytes(path, buf.getvalue())
    return path


def analyze_cam(run_dir: str | Path, n: int | None = None, quiet: bool = False) -> Path:
    """Save ``RUN/cam_grid.png``: n test images with their CAM and ε map; print its path.

    Args:
        run_dir: a run directory made by ``robustfair train``.
        n: number of images (default 8).
        quiet: log nothing but the path.

    Returns:
        The path of the PNG.
    """
    run_dir = Path(run_dir)
    trainer = _load_run(run_dir)
    n = 8 if n is None else n
    if n < 1:
        raise UserError(f"--n {n}: give at least one image")
    test = trainer.data.test
    # evenly spaced over the split (the splits are ordered by class)
    idx = torch.linspace(0, len(test) - 1, min(n, len(test))).round().long()
    x = test.images(idx).to(trainer.device)
    y = test.y[idx]
    budget, own = _pixel_budget(trainer)
    eps = float(trainer.cfg.attack.eps)
    if not own:
        log.warning("warning: %s has no pixel budget (PART); the ε maps are hypothetical, with "
                    "PART's defaults (%s, mask %s, ε_low = 7/8·ε = %.4g), and say so",
                    run_dir, budget.cam, budget.mask, budget.eps_low)
    panels = cam_panels(trainer.eval_model(), budget, x, eps)
    title = (f"{trainer.cfg.name}: {budget.cam} on {panels['layer']}, mask {budget.mask}, "
             f"ε {eps:.4f}, ε_low {budget.eps_low:.4f}")
    path = save_grid(run_dir / GRID_NAME, x, y, panels, trainer.data.class_names, title, eps,
                     budget.eps_low, hypothetical=not own)
    if not quiet:
        w = panels["weights"]
        log.info("%d images; full ε on %.1f%% of the entries, mean weight %.3f (0: ε_low, 1: ε)",
                 len(x), 100 * float((w >= 1).float().mean()), float(w.mean()))
    click.echo(str(path))
    return path
