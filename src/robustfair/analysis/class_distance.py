"""Class-distance analysis of a trained run (the motivation of DAFA, arXiv:2401.12532).

DAFA observes that under attack the samples of the worst class are mostly predicted as classes
*similar* to it, not as the easy classes, and that a class's robust accuracy falls with its
distance to the other classes. This module measures both on a run's test split:

- the class-similarity matrix under attack, P[i, j] = mean over test images of class i of the
  softmax probability of class j at the adversarial example (DAFA's p_i(j));
- the most confused class pairs (symmetrised similarity (P[i, j] + P[j, i]) / 2);
- per class: robust accuracy, the nearest other class and its distance, where the distance of
  classes i and j is ‖μ_i − μ_j‖₂ between the centroids of the model's clean logits, and the
  class-wise variance (mean squared distance of a class's logits to its centroid);
- Pearson and Spearman correlations of per-class robust accuracy with the nearest-class distance
  (expected positive), with the largest off-diagonal similarity (expected negative) and with the
  class-wise variance (the indicator DAFA contrasts with distance);
- the weights DAFA's rule would assign from P (λ = 1).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..attacks import build_attack
from ..attacks.base import eval_mode
from ..errors import UserError
from ..policies.dafa import dafa_weights

log = logging.getLogger("robustfair")


def class_statistics(model: nn.Module, data: Any, attack: str, eps: float, norm: str,
                     num_classes: int, batch_size: int = 500, step_size: float | None = None,
                     device: torch.device | None = None, seed: int = 0, bounded: bool = True
                     ) -> dict[str, Tensor]:
    """Per-class sums over ``data`` (an ArrayData): adversarial softmax, clean logits, counts.

    Returns:
        ``similarity`` (C, C) = P, ``robust`` (C,) and ``clean`` (C,) accuracy, ``centroids``
        (C, C) mean clean logits, ``variance`` (C,), ``count`` (C,), ``confusion`` (C, C) counts
        of (true, predicted-under-attack).
    """
    device = device or next(model.parameters()).device
    atk = build_attack(attack, norm, step_size, bounded=bounded)
    c = num_classes
    z = lambda *s: torch.zeros(*s, dtype=torch.float64)  # noqa: E731
    prob_sum, logit_sum, sq_sum, count = z(c, c), z(c, c), z(c), z(c)
    rob, cln, conf = z(c), z(c), z(c, c)
    feats: list[tuple[Tensor, Tensor]] = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for start in range(0, len(data), batch_size):
            idx = torch.arange(start, min(start + batch_size, len(data)))
            x = data.images(idx.to(data.y.device)).to(device)
            y = data.y[idx.to(data.y.device)].to(device)
            x_adv = x if atk.name == "clean" else atk(model, x, y, eps)
            with eval_mode(model), torch.no_grad():
                logits, logits_adv = model(x).double().cpu(), model(x_adv).double().cpu()
            yc = y.cpu()
            prob_sum.index_add_(0, yc, torch.softmax(logits_adv, 1))
            logit_sum.index_add_(0, yc, logits)
            count += torch.bincount(yc, minlength=c).double()
            pa, pc = logits_adv.argmax(1), logits.argmax(1)
            rob.index_add_(0, yc, (pa == yc).double())
            cln.index_add_(0, yc, (pc == yc).double())
            conf.index_put_((yc, pa), torch.ones(len(yc), dtype=torch.float64), accumulate=True)
            feats.append((logits, yc))
    n = count.clamp_min(1)
    nan = torch.full((c,), float("nan"), dtype=torch.float64)
    centroids = logit_sum / n[:, None]
    for logits, yc in feats:
        sq_sum.index_add_(0, yc, ((logits - centroids[yc]) ** 2).sum(1))
    return {"similarity": prob_sum / n[:, None], "robust": torch.where(count > 0, rob / n, nan),
            "clean": torch.where(count > 0, cln / n, nan),
            "centroids": centroids, "variance": sq_sum / n, "count": count, "confusion": conf}


def _ranks(v: Tensor) -> Tensor:
    """Average ranks (ties share the mean rank), for Spearman's correlation."""
    order = torch.argsort(v)
    ranks = torch.empty_like(v)
    ranks[order] = torch.arange(len(v), dtype=v.dtype)
    for val in torch.unique(v):
        m = v == val
        ranks[m] = ranks[m].mean()
    return ranks


def correlation(a: Tensor, b: Tensor) -> dict[str, float]:
    """Pearson's and Spearman's correlation of two (C,) vectors (NaN if one is constant)."""
    def pearson(u: Tensor, w: Tensor) -> float:
        u, w = u - u.mean(), w - w.mean()
        den = float(u.norm() * w.norm())
        return float((u * w).sum()) / den if den > 0 else float("nan")

    a, b = a.double(), b.double()
    return {"pearson": pearson(a, b), "spearman": pearson(_ranks(a), _ranks(b))}


def distance_summary(stats: dict[str, Tensor], top: int = 5) -> dict[str, Any]:
    """Everything derived from :func:`class_statistics`: pairs, nearest classes, correlations."""
    p, mu = stats["similarity"], stats["centroids"]
    present = stats["count"] > 0
    c = len(p)
    dist = torch.cdist(mu, mu)
    dist.fill_diagonal_(float("inf"))
    dist[:, ~present] = float("inf")
    dist[~present] = float("inf")
    nearest_d, nearest = dist.min(1)
    nearest[~present] = -1
    off = p.clone().fill_diagonal_(0)
    sym = (off + off.T) / 2
    iu = torch.triu_indices(c, c, 1)
    vals = sym[iu[0], iu[1]]
    order = torch.argsort(vals, descending=True)[: min(top, len(vals))]
    pairs = [{"classes": [int(iu[0, k]), int(iu[1, k])], "similarity": float(vals[k]),
              "p_ij": float(p[iu[0, k], iu[1, k]]), "p_ji": float(p[iu[1, k], iu[0, k]])}
             for k in order]
    rob = stats["robust"][present]
    worst = int(torch.nonzero(present).flatten()[int(torch.argmin(rob))])
    mass = off[worst]
    share_top2 = float(mass.topk(min(2, c - 1)).values.sum() / mass.sum().clamp_min(1e-12))
    finite = torch.isfinite(nearest_d) & present
    corr = {
        "robust_vs_nearest_distance": correlation(stats["robust"][finite], nearest_d[finite]),
        "robust_vs_max_similarity": correlation(rob, off.max(1).values[present]),
        "robust_vs_variance": correlation(rob, stats["variance"][present]),
    }
    return {
        "pairs": pairs, "nearest_class": nearest.tolist(), "nearest_distance": nearest_d.tolist(),
        "worst_class": worst, "worst_class_error_share_top2": share_top2,
        "correlation": corr, "dafa_weights": dafa_weights(p, 1.0).tolist(),
    }


def _matrix_text(p: Tensor, names: list[str]) -> str:
    w = max(5, *(len(n) for n in names))
    lines = [" " * w + " " + " ".join(f"{n[:5]:>5}" for n in names)]
    for i, row in enumerate(p):
        lines.append(f"{names[i]:<{w}} " + " ".join(f"{100 * float(v):5.1f}" for v in row))
    return "\n".join(lines)


def _num(v: float | None, spec: str) -> str:
    return "n/a" if v is None or not math.isfinite(v) else format(v, spec)


def summary_text(result: dict[str, Any]) -> str:
    """A readable report of :func:`analyze_class_distance`'s result."""
    names = result["class_names"]
    p = torch.tensor(result["similarity"])
    lines = [f"class similarity under {result['attack']} (eps {result['eps']:.4f}, "
             f"n {result['n']}): row = true class, % mean softmax",
             _matrix_text(p, names), "", "most confused class pairs:"]
    for pr in result["pairs"]:
        i, j = pr["classes"]
        lines.append(f"  {names[i]} <-> {names[j]}: {100 * pr['similarity']:.1f}% "
                     f"(p_{names[i]}({names[j]}) {100 * pr['p_ij']:.1f}%, "
                     f"p_{names[j]}({names[i]}) {100 * pr['p_ji']:.1f}%)")
    def nearest_name(j: int) -> str:
        return names[j] if j >= 0 else "n/a"

    lines += ["", f"{'class':<8}{'robust %':>9}{'clean %':>9}  {'nearest':<8}{'distance':>9}"
              f"{'variance':>10}{'DAFA w':>8}"]
    for k, n in enumerate(names):
        rob, cln = result["robust_acc"][k], result["clean_acc"][k]
        lines.append(f"{n:<8}{_num(rob and 100 * rob, '.1f'):>9}{_num(cln and 100 * cln, '.1f'):>9}"
                     f"  {nearest_name(result['nearest_class'][k]):<8}"
                     f"{_num(result['nearest_distance'][k], '.2f'):>9}"
                     f"{_num(result['variance'][k], '.2f'):>10}"
                     f"{_num(result['dafa_weights'][k], '.3f'):>8}")
    wc = result["worst_class"]
    lines.append(f"\nworst class {names[wc]}: {100 * result['worst_class_error_share_top2']:.0f}% "
                 f"of its adversarial mass goes to its 2 most similar classes")
    for key, label in (("robust_vs_nearest_distance", "nearest-class distance"),
                       ("robust_vs_max_similarity", "largest similarity"),
                       ("robust_vs_variance", "class-wise variance")):
        cr = result["correlation"][key]
        lines.append(f"correlation of robust accuracy with {label}: Pearson "
                     f"{_num(cr['pearson'], '+.2f')}, Spearman {_num(cr['spearman'], '+.2f')}")
    return "\n".join(lines)


def similarity_figure(p: Tensor, names: list[str], title: str, attack: str) -> Any:
    """The similarity matrix as a heatmap in percent (a matplotlib Figure, Agg canvas): the
    cells and the colour bar share the 0–100 % scale, and the colour bar says what it
    measures."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    c = len(names)
    size = max(4.0, min(16.0, 0.45 * c + 2))
    fig = Figure(figsize=(size + 1.0, size * 0.85), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    pct = 100 * p.double().numpy()
    im = ax.imshow(pct, cmap="viridis", vmin=0, vmax=100)
    ax.set_xlabel("class j (softmax under attack)")
    ax.set_ylabel("true class i")
    ax.set_title(title)
    if c <= 20:
        ax.set_xticks(range(c), names, rotation=90)
        ax.set_yticks(range(c), names)
        for i in range(c):
            for j in range(c):
                v = float(pct[i, j])
                ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=7,
                        color="black" if v > 50 else "white")
    cbar = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    cbar.set_label(f"p_i(j): mean softmax probability of class j\nfor class-i images "
                   f"under {attack} (%)")
    return fig


def save_heatmap(p: Tensor, names: list[str], path: Path, title: str,
                 attack: str = "the attack") -> None:
    """Write :func:`similarity_figure` as a PNG (atomically)."""
    import io

    from ..engine.io import atomic_write_bytes

    fig = similarity_figure(p, names, title, attack)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    atomic_write_bytes(path, buf.getvalue())


def _load_run(run_dir: Path) -> tuple[Any, Any, nn.Module, torch.device]:
    """(config, data, evaluation model, device) of a trained run directory: the model that
    ``robustfair eval`` evaluates."""
    from ..commands.evaluate import load_run

    t = load_run(run_dir)
    return t.cfg, t.data, t.model, t.device


def analyze_class_distance(run_dir: str | Path, attack: str = "pgd20", n: int | None = None,
                           quiet: bool = False) -> dict[str, Any]:
    """Class-distance analysis of a run: writes ``analysis/class_distance.json`` and ``.png``.

    Args:
        run_dir: a run directory made by ``robustfair train``.
        attack: attack spec for the similarity matrix (e.g. ``pgd20``; ``clean`` for none);
            ε, norm and step size come from the run's ``eval`` settings.
        n: use at most this many test images (default: all, or ``eval.n``).
        quiet: do not log the summary.

    Returns:
        The result dictionary that was saved as JSON.
    """
    from ..engine.io import atomic_write_json
    from ..engine.protocol import eval_eps_norm

    run_dir = Path(run_dir)
    cfg, data, model, device = _load_run(run_dir)
    split = data.split(cfg.eval.split)
    limit = n if n is not None else cfg.eval.n
    from ..engine.subset import eval_subset

    split, images = eval_subset(split, limit, name=cfg.eval.split)  # as robustfair eval --n
    if len(split) == 0:
        raise UserError(f"the {cfg.eval.split} split of {cfg.data.name!r} is empty; use "
                        f"--set eval.split=val or another dataset")
    eps, norm = eval_eps_norm(cfg)
    stats = class_statistics(model, split, attack, eps, norm, data.num_classes,
                             cfg.eval.batch_size, cfg.eval.step_size, device, cfg.seed,
                             data.bounded)
    names = [str(s) for s in (data.class_names or range(data.num_classes))]
    result: dict[str, Any] = {
        "run": str(run_dir), "attack": attack, "eps": eps, "norm": norm, "n": len(split),
        "subset": images,
        "class_names": names, "similarity": stats["similarity"].tolist(),
        "robust_acc": stats["robust"].tolist(), "clean_acc": stats["clean"].tolist(),
        "variance": stats["variance"].tolist(), "confusion": stats["confusion"].long().tolist(),
        "distance_definition": "L2 distance between class centroids of the clean logits",
        **distance_summary(stats),
    }
    result = _finite(result)
    out = run_dir / "analysis"
    atomic_write_json(out / "class_distance.json", result)
    save_heatmap(stats["similarity"], names, out / "class_distance.png",
                 f"class similarity under {attack} (ε {eps:.4g}, {norm}, n {len(split)})",
                 attack)
    if not quiet:
        log.info("%s\nsaved: %s, %s", summary_text(result), out / "class_distance.json",
                 out / "class_distance.png")
    return result


def _finite(obj: Any) -> Any:
    """Replace inf/NaN floats by None so that the JSON is standard."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj
