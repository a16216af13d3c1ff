"""Auto-PGD: APGD-CE and APGD-DLR (Croce & Hein, "Reliable evaluation of adversarial robustness
with an ensemble of diverse parameter-free attacks", ICML 2020, arXiv:2003.01690).

APGD is PGD without a step size to tune: it starts at η = 2ε, keeps the best point x_max, and at
the checkpoints w_j (p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j − p_{j−1} − 0.03, 0.06))
halves η and restarts from x_max when

1. the loss went up in fewer than ρ·(w_j − w_{j−1}) of the steps since the last checkpoint, or
2. η was not halved at the last checkpoint and the best loss did not improve since then.

Each step takes z = P(x_k + η·sign ∇) and moves with momentum α = 0.75:
x_{k+1} = P(x_k + α(z − x_k) + (1 − α)(x_k − x_{k−1})).

Restarts run only on the points not yet fooled. With ``early_stop`` (the default) a point leaves
the batch as soon as it is misclassified, so no work is spent on points already broken; every
remaining point follows exactly the trajectory it would follow in the full batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from . import ATTACKS
from ._helpers import clean_correct, cross_entropy, eps_rows, make_generator, view_n
from .base import Attack, AttackParams, ascent_direction, per_sample, project

#: ``loss(logits, y, target) -> (N,)``, maximised by the attack
LossFn = Callable[[Tensor, Tensor, "Tensor | None"], Tensor]


def dlr_loss(logits: Tensor, y: Tensor, target: Tensor | None = None) -> Tensor:
    """Difference of Logits Ratio: −(z_y − max_{i≠y} z_i) / (z_π1 − z_π3), π sorting z
    decreasingly (Croce & Hein 2020, eq. 6). Shift- and scale-invariant in the logits.

    With 2 classes z_π3 does not exist; the unnormalised margin −(z_y − max_{i≠y} z_i) is used.
    """
    z_sorted = logits.sort(dim=1, descending=True).values
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    top_is_y = logits.argmax(1) == y
    z_other = torch.where(top_is_y, z_sorted[:, 1], z_sorted[:, 0])
    if logits.shape[1] < 3:
        return -(z_y - z_other)
    return -(z_y - z_other) / (z_sorted[:, 0] - z_sorted[:, 2] + 1e-12)


def dlr_loss_targeted(logits: Tensor, y: Tensor, target: Tensor | None) -> Tensor:
    """Targeted DLR: −(z_y − z_t) / (z_π1 − (z_π3 + z_π4)/2) (Croce & Hein 2020, eq. 7).

    With fewer than 4 classes z_π4 does not exist; the unnormalised −(z_y − z_t) is used."""
    if target is None:
        raise ValueError("the targeted DLR loss needs target classes")
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    z_t = logits.gather(1, target[:, None]).squeeze(1)
    if logits.shape[1] < 4:
        return -(z_y - z_t)
    z_sorted = logits.sort(dim=1, descending=True).values
    return -(z_y - z_t) / (z_sorted[:, 0] - 0.5 * (z_sorted[:, 2] + z_sorted[:, 3]) + 1e-12)


def checkpoints(steps: int) -> list[int]:
    """The iterations w_j (1-based) after which the step size is checked: intervals of
    ⌊0.22 N⌋ shrinking by ⌊0.03 N⌋ down to ⌊0.06 N⌋ (each at least 1), i.e. w_j = p_j·N with
    p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j − p_{j−1} − 0.03, 0.06)."""
    k, k_min, k_decr = max(int(0.22 * steps), 1), max(int(0.06 * steps), 1), \
        max(int(0.03 * steps), 1)
    out, w = [], k
    while w <= steps:
        out.append(w)
        k = max(k - k_decr, k_min)
        w += k
    return out


def apgd_init(x: Tensor, eps: Tensor, norm: str, generator: torch.Generator | None) -> Tensor:
    """A random point on the boundary of the ε-ball, clipped to the image box."""
    if norm == "linf":
        t = 2 * torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype) - 1
        t = t / view_n(t.flatten(1).abs().amax(1).clamp_min(1e-12), x)
        return (x + eps * t).clamp(0, 1)
    t = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    t = t / view_n(t.flatten(1).norm(p=2, dim=1).clamp_min(1e-12), x)
    return (x + view_n(per_sample(eps, x), x) * t).clamp(0, 1)


def loss_and_grad(model: nn.Module, x_adv: Tensor, y: Tensor, target: Tensor | None,
                  loss_fn: LossFn, eot_iter: int = 1) -> tuple[Tensor, Tensor, Tensor]:
    """(loss (N,), ∇_x loss averaged over ``eot_iter`` passes (EOT), prediction of the last pass)."""
    grad = torch.zeros_like(x_adv)
    loss_sum = torch.zeros(len(x_adv), device=x_adv.device, dtype=x_adv.dtype)
    logits = None
    for _ in range(eot_iter):
        xr = x_adv.detach().requires_grad_(True)
        with torch.enable_grad():
            logits = model(xr)
            loss = loss_fn(logits, y, target)
            (g,) = torch.autograd.grad(loss.sum(), [xr])
        grad += g
        loss_sum += loss.detach()
    assert logits is not None
    return loss_sum / eot_iter, grad / eot_iter, logits.detach().argmax(1)


@dataclass
class APGDResult:
    """One APGD run: ``x_adv`` is the fooling point where ``fooled``, else the best-loss point."""

    x_adv: Tensor
    fooled: Tensor
    loss: Tensor


class _Run:
    """The per-sample state of one APGD run, compacted as points get fooled."""

    def __init__(self, x: Tensor, y: Tensor, target: Tensor | None, group: Tensor | None,
                 eps: Tensor, step0: Tensor, x_cur: Tensor, loss: Tensor, grad: Tensor) -> None:
        n = len(x)
        self.idx = torch.arange(n, device=x.device)
        self.x, self.y, self.target, self.eps, self.step0 = x, y, target, eps, step0
        self.group = group
        self.x_cur, self.x_prev, self.grad = x_cur, x_cur.clone(), grad
        self.x_best, self.g_best, self.l_best = x_cur.clone(), grad.clone(), loss.clone()
        self.l_prev, self.l_best_ck = loss.clone(), loss.clone()
        self.scale = torch.ones(n, device=x.device, dtype=x.dtype)
        self.n_incr = torch.zeros(n, device=x.device, dtype=torch.long)
        self.reduced = torch.ones(n, device=x.device, dtype=torch.bool)

    _ROWS = ("idx", "x", "y", "x_cur", "x_prev", "grad", "x_best", "g_best", "l_best",
             "l_prev", "l_best_ck", "scale", "n_incr", "reduced")

    def keep(self, mask: Tensor) -> None:
        n = len(self.idx)
        for name in self._ROWS:
            setattr(self, name, getattr(self, name)[mask])
        if self.target is not None:
            self.target = self.target[mask]
        if self.group is not None:
            self.group = self.group[mask]
        self.eps = eps_rows(self.eps, mask.nonzero().flatten(), n)
        self.step0 = eps_rows(self.step0, mask.nonzero().flatten(), n)


def apgd(
    model: nn.Module, x: Tensor, y: Tensor, eps: Tensor, loss_fn: LossFn, *,
    norm: str = "linf", steps: int = 100, rho: float = 0.75, momentum: float = 0.75,
    eot_iter: int = 1, target: Tensor | None = None, step_size: Tensor | float | None = None,
    generator: torch.Generator | None = None, early_stop: bool = True,
    group: Tensor | None = None,
) -> APGDResult:
    """One run of APGD from a random point of the ε-sphere (Croce & Hein 2020, Algorithm 1).

    Args:
        eps: ε broadcastable to ``x`` (scalar, per sample, or per element for ℓ∞).
        loss_fn: the per-sample loss to maximise (CE, DLR, targeted DLR).
        rho: checkpoint threshold ρ on the fraction of steps that increased the loss.
        momentum: α of the update.
        eot_iter: gradients averaged over this many forward passes (EOT, for random models).
        step_size: the initial step η^(0); default 2ε.
        early_stop: drop a point from the batch once it is misclassified.
        group: for rows that are copies of one point (one per target class), the point's id:
            with ``early_stop`` all copies leave the batch once one of them is misclassified.
    """
    n = len(x)
    out, fooled = x.clone(), torch.zeros(n, dtype=torch.bool, device=x.device)
    best_loss = torch.full((n,), float("-inf"), device=x.device, dtype=x.dtype)
    step0 = 2 * eps if step_size is None else torch.as_tensor(step_size, dtype=x.dtype,
                                                                device=x.device) * 1.0
    if step0.dim() == 1:
        step0 = view_n(step0, x)
    x0 = apgd_init(x, eps, norm, generator)
    loss, grad, pred = loss_and_grad(model, x0, y, target, loss_fn, eot_iter)
    s = _Run(x, y, target, group, eps, step0, x0, loss, grad)
    s = _record(s, pred, out, fooled, early_stop)
    marks = set(checkpoints(steps))
    last_mark = 0
    for i in range(steps):
        if len(s.idx) == 0:
            break
        with torch.no_grad():
            a = momentum if i > 0 else 1.0
            eta = s.step0 * view_n(s.scale, s.x)
            z = _proj(s.x, s.x_cur + eta * ascent_direction(s.grad, norm), s.eps, norm)
            x_new = _proj(s.x, s.x_cur + a * (z - s.x_cur) + (1 - a) * (s.x_cur - s.x_prev),
                          s.eps, norm)
            s.x_prev, s.x_cur = s.x_cur, x_new
        loss, s.grad, pred = loss_and_grad(model, s.x_cur, s.y, s.target, loss_fn, eot_iter)
        s.n_incr += (loss > s.l_prev).long()
        s.l_prev = loss
        better = loss > s.l_best
        s.x_best[better], s.g_best[better], s.l_best[better] = (
            s.x_cur[better], s.grad[better], loss[better])
        if i + 1 in marks:
            _checkpoint(s, i + 1 - last_mark, rho)
            last_mark = i + 1
        s = _record(s, pred, out, fooled, early_stop)
    rest = ~fooled[s.idx]
    out[s.idx[rest]] = s.x_best[rest]
    best_loss[s.idx] = s.l_best
    return APGDResult(out, fooled, best_loss)


def _proj(x: Tensor, x_adv: Tensor, eps: Tensor, norm: str) -> Tensor:
    return (x + project(x_adv - x, eps, norm)).clamp(0, 1)


def _checkpoint(s: _Run, k: int, rho: float) -> None:
    """Halve η and go back to x_max where condition 1 or 2 holds (Croce & Hein 2020, §3.1)."""
    cond1 = s.n_incr.double() < rho * k
    cond2 = ~s.reduced & (s.l_best_ck >= s.l_best)
    reduce = cond1 | cond2
    s.reduced = reduce
    s.l_best_ck = s.l_best.clone()
    s.n_incr.zero_()
    if reduce.any():
        s.scale[reduce] /= 2
        s.x_cur[reduce] = s.x_best[reduce]
        s.grad[reduce] = s.g_best[reduce]


def _record(s: _Run, pred: Tensor, out: Tensor, fooled: Tensor, early_stop: bool) -> _Run:
    hit = pred != s.y
    if not bool(hit.any()):
        return s
    out[s.idx[hit]] = s.x_cur[hit]
    fooled[s.idx[hit]] = True
    if early_stop:
        s.keep(~(torch.isin(s.group, s.group[hit]) if s.group is not None else hit))
    return s


class APGDParams(AttackParams):
    norm: Literal["linf", "l2"] = "linf"
    steps: int = Field(100, ge=1, le=100_000, description="iterations per run (reference: 100)")
    restarts: int = Field(1, ge=1, description="runs; each restart only on points not yet fooled")
    rho: float = Field(0.75, gt=0.0, lt=1.0, description="checkpoint threshold ρ")
    momentum: float = Field(0.75, gt=0.0, le=1.0, description="momentum α of the update")
    eot_iter: int = Field(1, ge=1, description="gradient averaged over this many passes (EOT)")
    seed: int | None = Field(0, description="seed of the random starts (None: global RNG)")
    early_stop: bool = Field(True, description="stop working on a point once it is fooled")


class APGDBase(Attack):
    """APGD with restarts on the points not yet fooled; subclasses choose the loss."""

    Params = APGDParams

    def loss_fn(self) -> LossFn:
        raise NotImplementedError  # abstract

    def perturb(self, model, x, y, eps, step_size):  # type: ignore[override]
        gen = make_generator(self.seed, x.device)
        out = x.clone()
        fooled = ~clean_correct(model, x, y)
        best = torch.full((len(x),), float("-inf"), device=x.device, dtype=x.dtype)
        for _ in range(self.restarts):
            idx = (~fooled).nonzero().flatten()
            if len(idx) == 0:
                break
            r = apgd(model, x[idx], y[idx], eps_rows(eps, idx, len(x)), self.loss_fn(),
                     norm=self.norm, steps=self.steps, rho=self.rho, momentum=self.momentum,
                     eot_iter=self.eot_iter, step_size=_rows(step_size, idx, len(x)),
                     generator=gen, early_stop=self.early_stop)
            take = r.fooled | (r.loss > best[idx])
            out[idx[take]] = r.x_adv[take]
            best[idx] = torch.maximum(best[idx], r.loss)
            fooled[idx[r.fooled]] = True
        return out


def _rows(step_size: Tensor | float | None, idx: Tensor, n: int) -> Tensor | float | None:
    if isinstance(step_size, Tensor):
        return eps_rows(step_size, idx, n)
    return step_size


@ATTACKS.register("apgd-ce")
class APGDCE(APGDBase):
    """APGD on the cross-entropy loss (Croce & Hein, ICML 2020, arXiv:2003.01690).

    Example::

        x_adv = build_attack("apgd-ce")(model, x, y, eps=8 / 255)
    """

    def loss_fn(self) -> LossFn:
        return cross_entropy


@ATTACKS.register("apgd-dlr")
class APGDDLR(APGDBase):
    """APGD on the Difference-of-Logits-Ratio loss (Croce & Hein, ICML 2020, arXiv:2003.01690).

    The DLR loss is invariant to shifting and rescaling the logits, so a saturated softmax does
    not hide the gradient.
    """

    def loss_fn(self) -> LossFn:
        return dlr_loss


__all__ = ["APGDCE", "APGDDLR", "APGDBase", "APGDParams", "APGDResult", "apgd", "checkpoints",
           "dlr_loss", "dlr_loss_targeted"]
