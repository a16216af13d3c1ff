"""Clean (no attack), FGSM, PGD, CW-ℓ∞ and the TRADES KL attack."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from . import ATTACKS
from .base import Attack, AttackParams, ascent_direction, input_grad, project, random_init


@ATTACKS.register("clean")
class Clean(Attack):
    """No attack: the natural images (clean accuracy)."""

    def perturb(self, model, x, y, eps, step_size):  # type: ignore[override]
        return x


def cw_margin(logits: Tensor, y: Tensor, kappa: float = 0.0) -> Tensor:
    """Per-sample CW margin max_{j≠y} z_j − z_y, clamped below at −κ (ascent makes it positive)."""
    onehot = F.one_hot(y, logits.shape[1]).bool()
    z_y = logits[onehot]
    other = logits.masked_fill(onehot, float("-inf")).amax(1)
    return torch.clamp(other - z_y, min=-kappa)


def box(x: Tensor, clip: bool = True) -> Tensor:
    """Clamp to the image range [0, 1] (or leave unbounded inputs as they are)."""
    return x.clamp(0, 1) if clip else x


class IterativeParams(AttackParams):
    norm: Literal["linf", "l2"] = "linf"
    steps: int = Field(10, ge=1, le=100_000)
    step_size: float | None = Field(
        None, gt=0, description="absolute step; None: 2.5·eps/steps (Madry et al.)"
    )
    random_start: bool = True
    init_std: float = Field(0.0, ge=0.0, description="without random_start: the start is "
                            "x + init_std·N(0, I) (0: x itself)")
    clamp_start: bool = Field(True, description="project the start onto the ε-ball and clamp it "
                              "to [0, 1] before the first gradient; False: the first gradient is "
                              "taken at the raw start (the official TRADES, MART, PART codes)")
    start_eps: float | None = Field(None, ge=0.0, description="radius of the uniform random "
                                    "start (None: ε itself, per sample or per element)")
    restarts: int = Field(1, ge=1)
    clip: bool = Field(True, description="clamp x_adv to [0, 1]; off for inputs that are not "
                       "images (e.g. synthetic mixtures)")


def project_box_first(delta: Tensor, eps: Tensor, norm: str) -> Tensor:
    """:func:`project` with the ℓ∞ bounds applied as min(max(δ, −ε), ε), the order of the
    official TRADES-style codes (``torch.min(torch.max(x_adv, x − ε), x + ε)``).

    For ε ≥ 0 it is the projection; a negative ε (a DAFA weight W < 0 scaling ε) gives δ = ε,
    the degenerate box those codes produce."""
    if norm == "linf":
        return torch.minimum(torch.maximum(delta, -eps), eps)
    return project(delta, eps, norm)


class Iterative(Attack):
    """Projected gradient ascent on a per-sample loss, keeping the worst iterate per restart.

    The start is a uniform random point of the ε-ball (``random_start``; of radius
    ``start_eps`` if set), else x + ``init_std``·N(0, I). With ``clamp_start`` it is projected
    onto the ε-ball and clamped to [0, 1] before the first gradient; without, the first gradient
    is taken at the raw start, as the official TRADES, MART and PART codes do. Every step is
    then projected and clamped.
    """

    Params = IterativeParams

    def loss(self, model: nn.Module, x_adv: Tensor, y: Tensor, ctx: dict) -> Tensor:
        raise NotImplementedError  # abstract

    def init_ctx(self, model: nn.Module, x: Tensor, y: Tensor) -> dict:
        return {}

    def start(self, x: Tensor, eps: Tensor) -> Tensor:
        """The start's offset δ_0 from x (before the optional projection and clamp)."""
        if self.random_start:
            radius = eps if self.start_eps is None else torch.full_like(eps, self.start_eps)
            return random_init(x, radius, self.norm)
        if self.init_std > 0:
            return self.init_std * torch.randn_like(x)
        return torch.zeros_like(x)

    def start_point(self, x: Tensor, eps: Tensor) -> Tensor:
        """The point of the first gradient."""
        delta = self.start(x, eps)
        if not self.clamp_start:
            return x + delta
        return box(x + project(delta, eps, self.norm), self.clip)

    def perturb(self, model, x, y, eps, step_size):  # type: ignore[override]
        alpha = step_size if step_size is not None else (
            self.step_size if self.step_size is not None else 2.5 * eps / self.steps
        )
        ctx = self.init_ctx(model, x, y)
        best = x.clone()
        still = torch.ones(len(x), dtype=torch.bool, device=x.device)
        for r in range(self.restarts):
            x_adv = self.start_point(x, eps)
            for _ in range(self.steps):
                x_adv.requires_grad_(True)
                loss = self.loss(model, x_adv, y, ctx).sum()
                g = input_grad(loss, x_adv)
                with torch.no_grad():
                    x_adv = x_adv + alpha * ascent_direction(g, self.norm)
                    x_adv = box(x + project_box_first(x_adv - x, eps, self.norm), self.clip)
            x_adv = x_adv.detach()
            if self.restarts == 1:
                return x_adv
            with torch.no_grad():
                fooled = model(x_adv).argmax(1) != y
                take = still & fooled if r > 0 else torch.ones_like(still)
                best[take] = x_adv[take]
                still &= ~fooled
        return best


@ATTACKS.register("pgd")
class PGD(Iterative):
    """PGD on cross-entropy, ℓ∞ or ℓ2, uniform random start (Madry et al., arXiv:1706.06083)."""

    def loss(self, model, x_adv, y, ctx):  # type: ignore[override]
        return F.cross_entropy(model(x_adv), y, reduction="none")


@ATTACKS.register("cw")
class CW(Iterative):
    """CW-ℓ∞: PGD on the Carlini–Wagner margin loss max_{j≠y} z_j − z_y (arXiv:1608.04644)."""

    class Params(IterativeParams):
        kappa: float = Field(50.0, ge=0.0, description="confidence: the margin is capped at κ")

    def loss(self, model, x_adv, y, ctx):  # type: ignore[override]
        return cw_margin(model(x_adv), y, self.kappa)


@ATTACKS.register("fgsm")
class FGSM(Attack):
    """FGSM (Goodfellow et al., arXiv:1412.6572): one step of size ε; FGM for ℓ2."""

    class Params(AttackParams):
        norm: Literal["linf", "l2"] = "linf"
        clip: bool = Field(True, description="clamp x_adv to [0, 1]")

    def perturb(self, model, x, y, eps, step_size):  # type: ignore[override]
        x_adv = x.clone().requires_grad_(True)
        g = input_grad(F.cross_entropy(model(x_adv), y, reduction="sum"), x_adv)
        with torch.no_grad():
            step = eps if step_size is None else step_size
            x_adv = x + project(step * ascent_direction(g, self.norm), eps, self.norm)
        return box(x_adv, self.clip)


def kl_per_sample(logits_p: Tensor, logits_q: Tensor) -> Tensor:
    """KL(p ‖ q) per sample, p = softmax(logits_p), q = softmax(logits_q) (TRADES order)."""
    logp = F.log_softmax(logits_p, dim=1)
    logq = F.log_softmax(logits_q, dim=1)
    return (logp.exp() * (logp - logq)).sum(1)


@ATTACKS.register("trades-kl")
class TradesKL(Iterative):
    """The TRADES inner maximisation of KL(p(x) ‖ p(x')) from x + 0.001·N(0, I)
    (Zhang et al., arXiv:1901.08573).

    As in the official TRADES code (and DAFA's, LBGAT's, CFA's, FRL's, WAT's, DKL's and
    PART-T's), the first gradient is taken at the raw start x + 0.001·N(0, I), neither projected
    nor clamped to [0, 1]; ``clamp_start: true`` clamps it first (BAT's code does)."""

    class Params(IterativeParams):
        random_start: bool = False
        init_std: float = Field(0.001, ge=0.0)
        clamp_start: bool = Field(False, description="project and clamp the start x + "
                                  "0.001·N(0, I) before the first gradient (False: official)")

    def init_ctx(self, model, x, y):  # type: ignore[override]
        with torch.no_grad():
            return {"nat": model(x)}

    def loss(self, model, x_adv, y, ctx):  # type: ignore[override]
        return kl_per_sample(ctx["nat"], model(x_adv))
