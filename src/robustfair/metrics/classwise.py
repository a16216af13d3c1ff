"""Class-wise accuracy figures."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def per_class_accuracy(correct: Tensor, labels: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    """(accuracy per class, count per class); a class absent from ``labels`` gets NaN."""
    labels = labels.long().cpu()
    correct = correct.bool().cpu()
    counts = torch.bincount(labels, minlength=num_classes).double()
    hits = torch.bincount(labels, weights=correct.double(), minlength=num_classes)
    acc = torch.where(counts > 0, hits / counts.clamp_min(1), torch.full_like(counts, float("nan")))
    return acc, counts.long()


def class_summary(correct: Tensor, labels: Tensor, num_classes: int) -> dict[str, Any]:
    """Average, per-class, worst class, best−worst gap and std across classes (in [0, 1])."""
    acc, counts = per_class_accuracy(correct, labels, num_classes)
    present = counts > 0
    a = acc[present]
    if a.numel() == 0:
        return {"avg": float("nan"), "per_class": acc.tolist(), "counts": counts.tolist()}
    worst = int(torch.nonzero(present).flatten()[int(torch.argmin(a))])
    best = int(torch.nonzero(present).flatten()[int(torch.argmax(a))])
    return {
        "avg": float(correct.float().mean()) if len(correct) else float("nan"),
        "per_class": [None if c == 0 else float(v) for v, c in zip(acc, counts, strict=True)],
        "counts": counts.tolist(),
        "worst": float(a.min()),
        "worst_class": worst,
        "best": float(a.max()),
        "best_class": best,
        "gap": float(a.max() - a.min()),
        "std": float(a.std(unbiased=False)) if a.numel() > 1 else 0.0,
        "class_mean": float(a.mean()),
    }


def rho(avg: float, worst: float, avg_base: float, worst_base: float) -> float:
    """DAFA's ρ = (worst − worst_base)/worst_base − (avg_base − avg)/avg_base."""
    if worst_base == 0 or avg_base == 0:
        return float("nan")
    return (worst - worst_base) / worst_base - (avg_base - avg) / avg_base
