"""MALT target selection: Mesoscopic Almost Linearity Targeting (Melamed, Yehudai & Shamir,
"MALT Powers Up Adversarial Attacks", NeurIPS 2024, arXiv:2407.02240).

A targeted attack (APGD-T, FAB-T) tries a few target classes per point. AutoAttack takes the
classes of highest clean logit; MALT ranks them instead by a linear estimate of the distance to
each class's decision boundary,

    d_t(x) = (z_y(x) − z_t(x)) / ‖∇z_y(x) − ∇z_t(x)‖_*,

with ‖·‖_* the dual of the attack's norm (ℓ1 for ℓ∞, ℓ2 for ℓ2), and attacks the targets of
smallest d_t first. For a linear model d_t is the exact distance to the boundary between y and t
(inputs unbounded), so the ranking is exact there. The ranking costs one forward pass and C + 1
backward passes per batch (one for the true class, one per class), all through the graph of that
one forward pass, which is kept until the last; each class's input gradient is reduced to its
dual norm before the next is computed.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from .base import AttackParams, per_sample

#: how targets are chosen: by clean logit (AutoAttack) or by MALT's distance estimate
Targeting = Literal["confidence", "malt"]


class TargetedParams(AttackParams):
    """The settings every targeted attack (APGD-T, FAB-T) shares."""

    n_target_classes: int | None = Field(
        None, ge=1, description="target classes tried in turn; None: min(9, C − 1)")
    targeting: Targeting = Field(
        "confidence", description="how targets are ranked: 'confidence' (the clean logits, as "
                                  "in AutoAttack) or 'malt' (linearised boundary distance)")
    max_batch: int = Field(500, ge=1, description="targets of a point are attacked side by "
                                                   "side while points × targets ≤ max_batch")


def dual_norm(g: Tensor, eps: Tensor, norm: str) -> Tensor:
    """‖ε ⊙ g‖_1 (ℓ∞, ε may be a per-element map) or ε·‖g‖_2 (ℓ2), per row: the linear change
    of a function of gradient ``g`` over the ε-ball, so that d_t is measured in units of ε."""
    if norm == "linf":
        return (g.abs() * eps).flatten(1).sum(1)
    return g.flatten(1).norm(p=2, dim=1) * per_sample(eps, g)


def malt_parts(model: nn.Module, x: Tensor, y: Tensor, eps: Tensor | float = 1.0,
               norm: str = "linf") -> tuple[Tensor, Tensor]:
    """The numerator z_y − z_t and the denominator ‖∇z_y − ∇z_t‖_* (in units of ε) of MALT's
    d_t, both (N, C); one backward pass per class."""
    e = torch.as_tensor(eps, dtype=x.dtype, device=x.device)
    if e.dim() == 0:
        e = e.reshape([1] * x.dim())
    elif e.dim() == 1:
        e = e.view([-1] + [1] * (x.dim() - 1))
    xr = x.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = model(xr)
        n_classes = logits.shape[1]
        z_y = logits.gather(1, y[:, None]).squeeze(1)
        (g_y,) = torch.autograd.grad(z_y.sum(), [xr], retain_graph=True)
        dual = torch.empty(len(x), n_classes, device=x.device, dtype=x.dtype)
        for t in range(n_classes):
            (g_t,) = torch.autograd.grad(logits[:, t].sum(), [xr],
                                         retain_graph=t < n_classes - 1)
            dual[:, t] = dual_norm(g_y - g_t, e, norm)
    return (z_y[:, None] - logits).detach(), dual


def malt_scores(model: nn.Module, x: Tensor, y: Tensor, eps: Tensor | float = 1.0,
                norm: str = "linf") -> Tensor:
    """MALT's d_t (N, C): the linearised distance from x to the boundary between y and every
    class t, in units of ε (+inf at t = y). Negative where t already scores above y."""
    gap, dual = malt_parts(model, x, y, eps, norm)
    return (gap / dual.clamp_min(1e-12)).scatter(1, y[:, None], float("inf"))


def malt_order(model: nn.Module, x: Tensor, y: Tensor, eps: Tensor | float = 1.0,
               norm: str = "linf") -> Tensor:
    """Classes per point (N, C): y first, then the others by MALT's d_t, nearest first; the
    drop-in replacement of the confidence order (rank 0 the true class, targets from rank 1)."""
    with torch.no_grad():
        d = malt_scores(model, x, y, eps, norm).scatter(1, y[:, None], float("-inf"))
    return d.argsort(dim=1, stable=True)


__all__ = ["Targeting", "dual_norm", "malt_order", "malt_parts", "malt_scores"]
