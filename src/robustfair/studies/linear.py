"""Exact adversarial training of linear binary classifiers (AT-on-AD, Hu et al., ICML 2023,
arXiv:2211.15762; specs part_atad §2.3).

With two logits z = Wx + b, write v = w_1 − w_0 and c = b_1 − b_0, s_y = 2y − 1 and the margin
m = s_y(v·x + c); the cross-entropy is softplus(−m). It decreases in m, so the worst
perturbation in the ε-ball is the one that lowers v·δ·s_y most:

    δ* = −ε·s_y·sign(v)      (ℓ∞),      δ* = −ε·s_y·v/‖v‖_2      (ℓ2),

and the robust margin is m − ε‖v‖_* (‖·‖_* the dual norm: ℓ1 for ℓ∞, ℓ2 for ℓ2). On unbounded
inputs this is exact (FGSM/FGM find it in one step); on images clamped to [0, 1] the clamped δ*
is still exact for ℓ∞ (the problem separates per coordinate) and is FGM-then-clip for ℓ2.

:func:`fit_linear_bank` trains many linear models at once — every (method, learning rate) pair of
a grid cell — with one batched forward pass per step, the same initial weights and the same batch
order for all (as the official scripts do), and early stopping per model.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from ..attacks.base import Attack, AttackParams
from ..data import DataBundle
from ..models.normalize import Classifier
from .trainer import (
    Fit,
    Method,
    TrainSettings,
    batch_order,
    make_optimizer,
    single_thread,
    split_tensors,
)


def worst_case_delta(v: Tensor, s: Tensor, eps: Tensor | float, norm: str) -> Tensor:
    """δ* for weight differences ``v`` (..., d) and signs ``s`` (B,) = 2y − 1.

    ``v`` of shape (d,) gives (B, d); a bank (S, d) with ``eps`` of shape (S,) gives (S, B, d)."""
    if norm == "linf":
        direction = torch.sign(v)
    elif norm == "l2":
        direction = v / v.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    else:
        raise ValueError(f"unknown norm {norm!r}")
    e = torch.as_tensor(eps, dtype=v.dtype, device=v.device)
    if v.dim() == 1:
        return -e * s[:, None].to(v.dtype) * direction[None, :]
    return -e.view(-1, 1, 1) * s[None, :, None].to(v.dtype) * direction[:, None, :]


def dual_norm(v: Tensor, norm: str) -> Tensor:
    """‖v‖_* along the last axis: ℓ1 for an ℓ∞ budget, ℓ2 for an ℓ2 budget."""
    return v.abs().sum(-1) if norm == "linf" else v.norm(dim=-1)


def robust_margin(margin: Tensor, v: Tensor, eps: float, norm: str) -> Tensor:
    """m − ε‖v‖_*: the margin left after the worst ε-perturbation (unbounded inputs)."""
    return margin - eps * dual_norm(v, norm)


def affine_params(model: nn.Module) -> tuple[Tensor, Tensor]:
    """(W, b) with model(x) = W·flatten(x) + b, for a :class:`Classifier` around the ``linear``
    model (its input normalization folded in) or a bare ``nn.Linear``."""
    if isinstance(model, nn.Linear):
        return model.weight, model.bias if model.bias is not None else model.weight.new_zeros(
            model.out_features)
    if isinstance(model, Classifier) and isinstance(getattr(model.net, "fc", None), nn.Linear):
        fc = model.net.fc
        c = model.normalize.mean.numel()
        per = fc.in_features // c
        mean = model.normalize.mean.flatten().repeat_interleave(per)
        std = model.normalize.std.flatten().repeat_interleave(per)
        w = fc.weight / std
        b = (fc.bias if fc.bias is not None else fc.weight.new_zeros(fc.out_features))
        return w, b - w @ mean
    raise TypeError("the closed-form attack needs a linear model (model 'linear' or nn.Linear)")


class LinearWorstCase(Attack):
    """Closed-form worst-case ℓ∞/ℓ2 perturbation of a two-class linear classifier (exact on
    unbounded inputs; inputs may be clamped to [0, 1] with ``clip``)."""

    class Params(AttackParams):
        norm: Literal["linf", "l2"] = "linf"
        clip: bool = Field(False, description="clamp x_adv to [0, 1]")

    def perturb(self, model, x, y, eps, step_size):  # type: ignore[override]
        w, _ = affine_params(model)
        if w.shape[0] != 2:
            raise ValueError("the closed-form attack is for two-class linear models")
        v = (w[1] - w[0]).detach()
        e = eps.flatten()[0] if eps.numel() == 1 else eps.reshape(len(x), -1)[:, 0]
        s = 2.0 * y.to(x.dtype) - 1.0
        if e.dim() == 0:
            delta = worst_case_delta(v, s, e, self.norm)
        else:
            delta = worst_case_delta(v, s, 1.0, self.norm) * e[:, None]
        x_adv = x + delta.view_as(x)
        return x_adv.clamp(0, 1) if self.clip else x_adv


class _Bank:
    """S linear two-class models W (S, 2, d), b (S, 2) trained with one optimizer.

    Everything is computed from the margins m = s_y(v·x + c), v = w_1 − w_0, c = b_1 − b_0
    (CE = softplus(−m)); gradients still reach both rows of W, as with a two-logit model.
    The optimizer runs with learning rate 1 and each model's step is then scaled by its own
    learning rate (0 once it has stopped). This is exact for SGD (with momentum) and Adam, whose
    steps are proportional to the learning rate."""

    def __init__(self, d: int, slices: list[tuple[Method, float]], settings: TrainSettings,
                 bounded: bool, seed: int, device: torch.device) -> None:
        torch.manual_seed(seed)
        init = nn.Linear(d, 2)  # PyTorch's default initialisation, as the official MyLR
        n = len(slices)
        self.w = init.weight.detach().to(device).expand(n, 2, d).clone().requires_grad_(True)
        self.b = init.bias.detach().to(device).expand(n, 2).clone().requires_grad_(True)
        self.opt = make_optimizer([self.w, self.b], settings, 1.0)
        self.lr = torch.tensor([lr for _, lr in slices], device=device)
        self.eps = torch.tensor([m.eps if m.robust else 0.0 for m, _ in slices], device=device)
        self.is_l2 = torch.tensor([m.norm == "l2" for m, _ in slices], device=device)
        self.robust = self.eps > 0
        self.bounded = bounded
        self.accumulate = settings.accumulate_attack_grads

    def vc(self, w: Tensor | None = None, b: Tensor | None = None) -> tuple[Tensor, Tensor]:
        w = self.w if w is None else w
        b = self.b if b is None else b
        return w[:, 1] - w[:, 0], b[:, 1] - b[:, 0]

    def margins(self, x: Tensor, y: Tensor, w: Tensor | None = None,
                b: Tensor | None = None) -> Tensor:
        """(S, B) clean margins s_y(v·x + c)."""
        v, c = self.vc(w, b)
        return (2.0 * y.to(x.dtype) - 1.0)[None, :] * (v @ x.T + c[:, None])

    def adversarial_margins(self, x: Tensor, y: Tensor) -> Tensor:
        """(S, B) margins at x + δ*: m − ε‖v‖_* on unbounded inputs; on images x + δ* is clamped
        to [0, 1] first (δ* detached: the attack's point, Danskin's theorem)."""
        v, c = self.vc()
        if not self.bounded:
            dual = torch.where(self.is_l2, v.norm(dim=-1), v.abs().sum(-1))
            return self.margins(x, y) - (self.eps * dual)[:, None]
        s = 2.0 * y.to(x.dtype) - 1.0
        vd = v.detach()
        delta = torch.where(self.is_l2[:, None, None], worst_case_delta(vd, s, self.eps, "l2"),
                            worst_case_delta(vd, s, self.eps, "linf"))
        x_adv = (x[None] + delta).clamp(0, 1)
        return s[None, :] * (torch.einsum("sbd,sd->sb", x_adv, v) + c[:, None])

    def loss(self, x: Tensor, y: Tensor) -> Tensor:
        """Σ over models of the mean CE at x_adv (+ the official leaked CE(x) for AT models)."""
        per_model = F.softplus(-self.adversarial_margins(x, y)).mean(1)
        if self.accumulate:
            per_model = per_model + F.softplus(-self.margins(x, y)).mean(1) * self.robust
        return per_model.sum()

    def step(self, x: Tensor, y: Tensor, active: Tensor) -> None:
        old_w, old_b = self.w.detach().clone(), self.b.detach().clone()
        self.opt.zero_grad(set_to_none=True)
        self.loss(x, y).backward()
        self.opt.step()
        scale = self.lr * active
        with torch.no_grad():
            self.w.copy_(old_w + scale.view(-1, 1, 1) * (self.w - old_w))
            self.b.copy_(old_b + scale.view(-1, 1) * (self.b - old_b))

    @torch.no_grad()
    def val_loss(self, x: Tensor, y: Tensor, robust: bool = False) -> Tensor:
        """(S,) mean CE, clean or (``robust``) at each model's worst-case point."""
        m = self.adversarial_margins(x, y) if robust else self.margins(x, y)
        return F.softplus(-m).mean(1)

    @torch.no_grad()
    def predict(self, x: Tensor, w: Tensor, b: Tensor) -> Tensor:
        """(S, B) predicted classes: 1 iff v·x + c > 0."""
        v, c = self.vc(w, b)
        return (v @ x.T + c[:, None] > 0).long()


def fit_linear_bank(
    data: DataBundle, slices: list[tuple[Method, float]], settings: TrainSettings, seed: int,
    device: torch.device | str = "cpu",
) -> list[Fit]:
    """Train one linear model per (method, learning rate) with the closed-form attack and early
    stopping on the validation loss (``settings.selection``, after ``settings.min_epochs``;
    each model stops on its own); return their fits."""
    with single_thread():
        return _fit_bank(data, slices, settings, seed, torch.device(device))


def _fit_bank(data: DataBundle, slices: list[tuple[Method, float]], settings: TrainSettings,
              seed: int, device: torch.device) -> list[Fit]:
    t = {k: (x.flatten(1), y) for k, (x, y) in split_tensors(data, device).items()}
    x_tr, y_tr = t["train"]
    bank = _Bank(x_tr.shape[1], slices, settings, bool(data.extra.get("bounded", True)), seed,
                 device)
    n = len(slices)
    best_loss = torch.full((n,), math.inf, device=device)
    best_epoch = torch.full((n,), -1, dtype=torch.long, device=device)
    best_w, best_b = bank.w.detach().clone(), bank.b.detach().clone()
    active = torch.ones(n, device=device)
    stopped_at = torch.full((n,), settings.epochs, dtype=torch.long, device=device)
    gen = torch.Generator().manual_seed(seed)
    for epoch in range(settings.epochs):
        for idx in batch_order(len(y_tr), settings.batch_size, gen):
            idx = idx.to(device)
            bank.step(x_tr[idx], y_tr[idx], active)
        if not settings.eligible(epoch):
            continue
        val = bank.val_loss(*t["val"], robust=settings.selection == "robust")
        better = (val < best_loss) & (active > 0)
        best_loss = torch.where(better, val, best_loss)
        best_epoch = torch.where(better, torch.full_like(best_epoch, epoch), best_epoch)
        best_w[better] = bank.w.detach()[better]
        best_b[better] = bank.b.detach()[better]
        done = (epoch - best_epoch >= settings.patience) & (active > 0)
        stopped_at = torch.where(done, torch.full_like(stopped_at, epoch + 1), stopped_at)
        active = active * (~done)
        if not bool(active.any()):
            break
    pred_test = bank.predict(t["test"][0], best_w, best_b).cpu()
    pred_bal = bank.predict(t["balanced"][0], best_w, best_b).cpu()
    return [
        Fit(m, lr, float(best_loss[i]), int(best_epoch[i]), int(stopped_at[i]), pred_test[i],
            pred_bal[i], _params(best_w[i], best_b[i]))
        for i, (m, lr) in enumerate(slices)
    ]


def _params(w: Tensor, b: Tensor) -> dict[str, Any]:
    """The rule "class 1 iff v·x + c > 0" of a two-logit linear model."""
    return {"v": (w[1] - w[0]).cpu().tolist(), "c": float(b[1] - b[0])}
