"""Small helpers shared by the class-wise policies (DAFA, FRL, CFA, WAT)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..objectives.base import ObjectiveOutput


def per_sample(table: Tensor, y: Tensor) -> Tensor:
    """Look up a per-class table (C,) for each label: ``table[y]`` on ``y``'s device."""
    return table.to(y.device)[y]


def natural_and_rest(out: ObjectiveOutput) -> tuple[Tensor | None, Tensor]:
    """Split the terms into the clean term ``natural`` (None if absent) and the sum of the rest."""
    terms = dict(out.terms)
    natural = terms.pop("natural", None)
    if not terms:
        return natural, torch.zeros_like(natural) if natural is not None else torch.zeros(0)
    return natural, torch.stack(list(terms.values())).sum(0)


def objective_beta(ctx: Any, given: float | None, default: float = 6.0) -> float:
    """The TRADES β: ``given`` if set, else the objective's ``beta`` (``ctx.extra['objective']``)."""
    if given is not None:
        return float(given)
    spec = (getattr(ctx, "extra", None) or {}).get("objective") or {}
    return float(spec.get("beta", default))


def num_epochs(ctx: Any, default: int = 1) -> int:
    """The run's number of epochs, from the build context."""
    return int((getattr(ctx, "extra", None) or {}).get("epochs", default))


def per_class_rates(correct: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """Accuracy per class (C,) as float64; a class absent from ``labels`` gets the mean."""
    labels = labels.long().cpu()
    counts = torch.bincount(labels, minlength=num_classes).double()
    hits = torch.bincount(labels, weights=correct.double().cpu(), minlength=num_classes)
    overall = hits.sum() / counts.sum().clamp_min(1)
    return torch.where(counts > 0, hits / counts.clamp_min(1), overall)
