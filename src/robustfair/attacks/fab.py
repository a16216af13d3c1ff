"""FAB, the Fast Adaptive Boundary attack, and its targeted version FAB-T (Croce & Hein,
"Minimally distorted adversarial examples with a fast adaptive boundary attack", ICML 2020,
arXiv:1907.02044; FAB-T as used in AutoAttack, arXiv:2003.01690).

FAB looks for the adversarial point of smallest norm. At x^(k) it linearises the decision
boundary between the true class y and a class t, {z : f_t(x^(k)) − f_y(x^(k)) + ∇(f_t − f_y)·(z −
x^(k)) = 0}, projects both x^(k) and the original x onto it inside the image box [0, 1]
(δ^(k), δ_orig), and moves

    x^(k+1) = P_box((1 − α)(x^(k) + η δ^(k)) + α (x + η δ_orig)),
    α = min(‖δ^(k)‖ / (‖δ^(k)‖ + ‖δ_orig‖), α_max),

with the extrapolation η = 1.05 and α_max = 0.1. Once a point is adversarial it steps back
towards x: x^(k+1) ← x + β (x^(k+1) − x), β = 0.9. FAB picks t as the class whose linearised
boundary is nearest; FAB-T fixes t in turn to the classes with the highest clean logits.

Within a budget ε the attack succeeds when it finds an adversarial point with ‖δ‖ ≤ ε; with
``early_stop`` a point leaves the batch as soon as it has one. Distances are measured in units of
ε (‖δ/ε‖_∞, or ‖δ‖_2/ε), so a per-sample ε and, for ℓ∞, a per-element ε map are handled by the
same projection.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from . import ATTACKS
from ._helpers import (
    clean_correct,
    eps_rows,
    make_generator,
    n_targets,
    rank_groups,
    ranked_targets,
    target_copies,
    view_n,
)
from .base import Attack, AttackParams, per_sample
from .malt import TargetedParams


def box_hyperplane_projection(w: Tensor, c: Tensor, d: Tensor, lb: Tensor, ub: Tensor,
                              max_iter: int = 100) -> Tensor:
    """The smallest step δ = clip(t·d', lb, ub), t ≥ 0, with w·δ = c (one row per point).

    ``d`` is the direction of steepest change of the norm being minimised, aligned with ``w``
    (ℓ∞: ε ⊙ sign w; ℓ2: w), and d' = sign(c)·d. g(t) = |w·clip(t d', lb, ub)| is concave,
    piecewise linear and non-decreasing (one breakpoint τ_i per coordinate), so Newton's method
    from t = 0 stays below the root and reaches it exactly after crossing a few breakpoints.
    When |c| cannot be reached inside the box, δ goes to the box's corner. All arguments are
    (B, D) except ``c`` (B,).
    """
    sgn = torch.where(c < 0, -1.0, 1.0).to(w.dtype)[:, None]
    dd = d * sgn
    slope = (w * d).clamp_min(0)
    lim = torch.where(dd > 0, ub, lb)
    safe = torch.where(dd != 0, dd, torch.ones_like(dd))
    tau = torch.where((dd != 0) & (slope > 0), lim / safe, torch.zeros_like(dd)).clamp_min(0)
    target = c.abs()[:, None]
    t = torch.zeros_like(target)
    for _ in range(max_iter):
        g = (slope * torch.minimum(tau, t)).sum(1, keepdim=True)
        g_prime = (slope * (tau > t)).sum(1, keepdim=True)
        res = target - g
        done = (res <= 1e-6 * target) | (g_prime <= 0)
        if bool(done.all()):
            break
        t = torch.where(done, t, t + res / g_prime.clamp_min(1e-30))
    reachable = target < (slope * tau).sum(1, keepdim=True)
    t = torch.where(reachable, t, tau.amax(1, keepdim=True))
    return torch.minimum(torch.maximum(t * dd, lb), ub)


@dataclass
class _FabProblem:
    """What one FAB run needs besides the points: norm, ε (x-broadcast) and step constants."""

    norm: str
    eps: Tensor
    alpha_max: float
    eta: float
    beta: float

    def dist(self, delta: Tensor, eps: Tensor) -> Tensor:
        """‖δ‖ in units of ε: max |δ_i|/ε_i (ℓ∞) or ‖δ‖_2/ε (ℓ2)."""
        if self.norm == "linf":
            return (delta.abs() / eps.clamp_min(1e-12)).flatten(1).amax(1)
        return delta.flatten(1).norm(p=2, dim=1) / per_sample(eps, delta).clamp_min(1e-12)

    def direction(self, w: Tensor, eps: Tensor) -> Tensor:
        if self.norm == "linf":
            return eps.expand_as(w) * w.sign()
        return w

    def dual(self, g: Tensor, eps: Tensor) -> Tensor:
        """The dual norm of the scaled norm: ‖ε ⊙ g‖_1 (ℓ∞) or ε·‖g‖_2 (ℓ2)."""
        if self.norm == "linf":
            return (g.abs() * eps).flatten(1).sum(1)
        return g.flatten(1).norm(p=2, dim=1) * per_sample(eps, g)


def _diff_grad(model: nn.Module, x: Tensor, y: Tensor, target: Tensor | None,
               prob: _FabProblem, eps: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(f_t − f_y (N,), its input gradient, prediction). Without a target, t is the class with
    the nearest linearised boundary (one backward pass per class)."""
    xr = x.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = model(xr)
        pred = logits.detach().argmax(1)
        z_y = logits.gather(1, y[:, None]).squeeze(1)
        if target is not None:
            diff = logits.gather(1, target[:, None]).squeeze(1) - z_y
            (g,) = torch.autograd.grad(diff.sum(), [xr])
            return diff.detach(), g, pred
        best_d = torch.full_like(z_y, float("inf"))
        df = torch.zeros_like(z_y)
        dg = torch.zeros_like(x)
        for j in range(logits.shape[1]):
            diff = logits[:, j] - z_y
            (g,) = torch.autograd.grad(diff.sum(), [xr], retain_graph=j < logits.shape[1] - 1)
            dist = diff.detach().abs() / (prob.dual(g, eps) + 1e-12)
            dist = torch.where(y == j, torch.full_like(dist, float("inf")), dist)
            take = dist < best_d
            best_d = torch.where(take, dist, best_d)
            df = torch.where(take, diff.detach(), df)
            dg[take] = g[take]
        return df, dg, pred


class _Rows:
    """The rows still attacked, compacted as points succeed."""

    def __init__(self, x0: Tensor, x1: Tensor, y: Tensor, target: Tensor | None, eps: Tensor,
                 group: Tensor | None) -> None:
        self.idx = torch.arange(len(x0), device=x0.device)
        self.x0, self.x1, self.y, self.target, self.eps, self.group = x0, x1, y, target, eps, group
        self.df = torch.zeros(len(x0), device=x0.device, dtype=x0.dtype)
        self.dg = torch.zeros_like(x0)

    def __len__(self) -> int:
        return len(self.idx)

    def keep(self, mask: Tensor) -> None:
        sel = mask.nonzero().flatten()
        self.eps = eps_rows(self.eps, sel, len(mask))
        self.idx, self.x0, self.x1, self.y = self.idx[sel], self.x0[sel], self.x1[sel], self.y[sel]
        self.df, self.dg = self.df[sel], self.dg[sel]
        self.target = None if self.target is None else self.target[sel]
        self.group = None if self.group is None else self.group[sel]

    def gradient(self, model: nn.Module, prob: _FabProblem, rows: Tensor | None = None) -> Tensor:
        """Set f_t − f_y and its gradient at x^(k) (of ``rows`` only, if given); return the
        prediction."""
        if rows is None:
            self.df, self.dg, pred = _diff_grad(model, self.x1, self.y, self.target, prob,
                                                self.eps)
            return pred
        sel = rows.nonzero().flatten()
        self.df[sel], self.dg[sel], pred = _diff_grad(
            model, self.x1[sel], self.y[sel], None if self.target is None else self.target[sel],
            prob, eps_rows(self.eps, sel, len(rows)))
        return pred


def fab(model: nn.Module, x: Tensor, y: Tensor, eps: Tensor, *, norm: str = "linf",
        steps: int = 100, target: Tensor | None = None, alpha_max: float = 0.1,
        eta: float = 1.05, beta: float = 0.9, rand_start: bool = False,
        start_dist: Tensor | None = None, generator: torch.Generator | None = None,
        early_stop: bool = True, group: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """One FAB run on points classified correctly; returns (best adversarial point, its distance
    in units of ε; +inf where none was found).

    After each step the new point is checked; an adversarial one is recorded and moved back
    towards x before the next gradient. The check shares the forward pass of the next gradient
    while few points are adversarial (a second gradient only for those), and is a forward pass
    of its own when many are (as in the reference): the same iterates, fewer passes.

    Args:
        target: FAB-T's target class per point; None for untargeted FAB.
        rand_start: start from a random point at half the best distance so far (restarts).
        start_dist: that best distance so far, in units of ε (default 1).
        group: for rows that are copies of one point (one per target class), the point's id:
            with ``early_stop`` all copies stop once one has an adversarial point within ε.
    """
    prob = _FabProblem(norm, eps, alpha_max, eta, beta)
    n = len(x)
    best_x, best_d = x.clone(), torch.full((n,), float("inf"), device=x.device, dtype=x.dtype)
    x1 = _random_start(x, eps, norm, start_dist, generator) if rand_start else x.clone()
    r = _Rows(x, x1, y, target, eps, group)
    r.gradient(model, prob)
    check_first = False
    for it in range(steps):
        with torch.no_grad():
            r.x1 = _fab_step(prob, r.x0, r.x1, r.df, r.dg, r.eps)
        last = it == steps - 1
        if check_first or last:
            with torch.no_grad():
                adv = model(r.x1).argmax(1) != r.y
            _back_step(prob, r, adv, best_x, best_d, early_stop)
            if last or len(r) == 0:
                break
            r.gradient(model, prob)
        else:
            adv = r.gradient(model, prob) != r.y
            moved = _back_step(prob, r, adv, best_x, best_d, early_stop)
            if bool(moved.any()):
                r.gradient(model, prob, moved)
            if len(r) == 0:
                break
        check_first = float(adv.float().mean()) > 1 / 3
    return best_x, best_d


def _back_step(prob: _FabProblem, r: _Rows, adv: Tensor, best_x: Tensor, best_d: Tensor,
               early_stop: bool) -> Tensor:
    """Record adversarial points, move them back towards x (x + β(x^(k) − x)), drop the rows
    that succeeded within ε; return which of the remaining rows were moved."""
    if not bool(adv.any()):
        return adv
    dist = _keep_best(prob, adv, r.x0, r.x1, r.eps, r.idx, best_x, best_d)
    r.x1 = torch.where(view_n(adv, r.x1), r.x0 + prob.beta * (r.x1 - r.x0), r.x1)
    if early_stop:
        found = adv & (dist <= 1)
        if bool(found.any()):
            keep = ~(torch.isin(r.group, r.group[found]) if r.group is not None else found)
            r.keep(keep)
            return adv[keep]
    return adv


def _keep_best(prob: _FabProblem, adv: Tensor, x0: Tensor, x1: Tensor, eps: Tensor, idx: Tensor,
               best_x: Tensor, best_d: Tensor) -> Tensor:
    """Record the adversarial points that are closer than the best so far; return distances."""
    dist = prob.dist(x1 - x0, eps)
    better = adv & (dist < best_d[idx])
    best_x[idx[better]], best_d[idx[better]] = x1[better], dist[better]
    return dist


def _fab_step(prob: _FabProblem, x0: Tensor, x1: Tensor, df: Tensor, dg: Tensor,
              eps: Tensor) -> Tensor:
    """One FAB update: project x^(k) and x onto the linearised boundary, mix, extrapolate."""
    b = len(x1)
    w = dg.flatten(1)
    c1 = -df
    c0 = -df - (w * (x0 - x1).flatten(1)).sum(1)
    pts = torch.cat([x1, x0]).flatten(1)
    e2 = torch.cat([eps.expand_as(x1), eps.expand_as(x0)]).flatten(1) if eps.numel() > 1 \
        else eps.flatten()[:1].expand_as(pts)
    d = prob.direction(torch.cat([w, w]), e2)
    delta = box_hyperplane_projection(torch.cat([w, w]), torch.cat([c1, c0]), d, -pts, 1 - pts)
    d1, d2 = delta[:b].view_as(x1), delta[b:].view_as(x0)
    a1 = prob.dist(d1, eps).clamp_min(1e-8)
    a2 = prob.dist(d2, eps).clamp_min(1e-8)
    alpha = view_n((a1 / (a1 + a2)).clamp(0, prob.alpha_max), x1)
    return ((x1 + prob.eta * d1) * (1 - alpha) + (x0 + prob.eta * d2) * alpha).clamp(0, 1)


def _random_start(x: Tensor, eps: Tensor, norm: str, start_dist: Tensor | None,
                  generator: torch.Generator | None) -> Tensor:
    r = torch.ones(len(x), device=x.device, dtype=x.dtype) if start_dist is None else \
        start_dist.clamp(max=1.0)
    if norm == "linf":
        t = 2 * torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype) - 1
        t = t / view_n(t.flatten(1).abs().amax(1).clamp_min(1e-12), x)
        return (x + 0.5 * view_n(r, x) * eps * t).clamp(0, 1)
    t = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    t = t / view_n(t.flatten(1).norm(p=2, dim=1).clamp_min(1e-12), x)
    return (x + 0.5 * view_n(r * per_sample(eps, x), x) * t).clamp(0, 1)


class FABParams(AttackParams):
    norm: Literal["linf", "l2"] = "linf"
    steps: int = Field(100, ge=1, le=100_000, description="iterations per run (reference: 100)")
    restarts: int = Field(1, ge=1, description="runs; the later ones from a random start")
    alpha_max: float = Field(0.1, ge=0.0, le=1.0, description="α_max, the pull towards x")
    eta: float = Field(1.05, ge=1.0, description="η, extrapolation of the projection step")
    beta: float = Field(0.9, gt=0.0, lt=1.0, description="β, the backward step")
    seed: int | None = Field(0, description="seed of the random restarts (None: global RNG)")
    early_stop: bool = Field(True, description="stop on a point once it has an adversarial "
                                               "example within ε")


class FABBase(Attack):
    """FAB within a budget: the minimal adversarial point found, if its norm is within ε."""

    Params = FABParams
    targeted: bool = False

    def _run(self, model: nn.Module, x: Tensor, y: Tensor, eps: Tensor, order: Tensor | None,
             ranks: list[int], gen: torch.Generator | None, out: Tensor, fooled: Tensor,
             best: Tensor) -> None:
        for r in range(self.restarts):
            idx = (~fooled).nonzero().flatten()
            if len(idx) == 0:
                return
            rep, tgt = (idx, None) if order is None else target_copies(idx, order, ranks)
            bx, bd = fab(model, x[rep], y[rep], eps_rows(eps, rep, len(x)), norm=self.norm,
                         steps=self.steps, target=tgt, alpha_max=self.alpha_max, eta=self.eta,
                         beta=self.beta, rand_start=r > 0, start_dist=best[rep], generator=gen,
                         early_stop=self.early_stop, group=None if tgt is None else rep)
            for part in torch.arange(len(rep), device=x.device).split(len(idx)):
                pts, ok = rep[part], (bd[part] <= 1) & ~fooled[rep[part]]
                best[pts] = torch.minimum(best[pts], bd[part])
                out[pts[ok]] = bx[part][ok]
                fooled[pts[ok]] = True

    def perturb(self, model, x, y, eps, step_size):  # type: ignore[override]
        if self.norm == "l2":
            per_sample(eps, x)  # refuses a per-element map
        gen = make_generator(self.seed, x.device)
        out = x.clone()
        fooled = ~clean_correct(model, x, y)
        best = torch.full((len(x),), float("inf"), device=x.device, dtype=x.dtype)
        if not self.targeted:
            self._run(model, x, y, eps, None, [], gen, out, fooled, best)
            return out
        order = ranked_targets(model, x, y, eps, ~fooled, self.norm, self.targeting)
        last = n_targets(order.shape[1], self.n_target_classes)
        rank = 1
        while rank <= last and bool((~fooled).any()):
            ranks = rank_groups(int((~fooled).sum()), last, self.max_batch, rank)
            rank += len(ranks)
            self._run(model, x, y, eps, order, ranks, gen, out, fooled, best)
        return out


@ATTACKS.register("fab")
class FAB(FABBase):
    """Untargeted FAB: the nearest linearised boundary among all classes, one backward pass per
    class each step (Croce & Hein, ICML 2020, arXiv:1907.02044)."""


class FABTParams(FABParams, TargetedParams):
    pass


@ATTACKS.register("fab-t")
class FABT(FABBase):
    """Targeted FAB over the top min(9, C − 1) classes, as in AutoAttack (Croce & Hein, ICML
    2020, arXiv:1907.02044 and arXiv:2003.01690).

    Example::

        x_adv = build_attack("fab-t")(model, x, y, eps=8 / 255)
    """

    Params = FABTParams
    targeted = True


__all__ = ["FAB", "FABT", "box_hyperplane_projection", "fab"]
