"""FRL: Fair Robust Learning (Xu et al., ICML 2021, arXiv:2010.06121).

FRL treats fairness as constraints — no class's clean error and boundary error may exceed the
average by more than τ1 and τ2 — and solves them with Lagrange multipliers updated on a
validation split after every epoch. The multipliers either re-weight the class losses
(*reweight*), enlarge the adversarial margin of the classes that violate the boundary constraint
(*remargin*), or both.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field
from torch import Tensor

from ..engine import distributed
from ..engine.distributed import all_reduce_max
from ..objectives.base import ObjectiveOutput
from . import POLICIES
from ._classwise import natural_and_rest, per_class_rates, per_sample
from .base import EpochContext, Policy, PolicyParams


def normalize_multipliers(phi: Tensor, lim: float) -> Tensor:
    """Clamp φ at 0 and, if Σφ exceeds ``lim``, rescale it so that Σφ = lim (FRL's code)."""
    phi = phi.clamp_min(0)
    total = float(phi.sum())
    return phi * (lim / total) if total > lim else phi


def cost_sensitive_weights(phi: Tensor) -> Tensor:
    """Class weights w_k = 1/C + φ_k − (1/C)·Σ_j φ_j (they sum to 1)."""
    c = phi.numel()
    return 1.0 / c + phi - phi.sum() / c


def fairness_slacks(clean: Tensor, robust: Tensor, clean_avg: float, robust_avg: float,
                    tau1: float, tau2: float) -> tuple[Tensor, Tensor]:
    """Constraint slacks from per-class clean and robust accuracy on validation.

    γ0_k = R_nat(k) − R_nat − τ1 (clean error) and γ1_k = R_bndy(k) − R_bndy − τ2, where the
    boundary error is R_bndy = clean accuracy − robust accuracy.
    """
    gamma0 = (1 - clean) - (1 - clean_avg) - tau1
    gamma1 = (clean - robust) - (clean_avg - robust_avg) - tau2
    return gamma0, gamma1


@POLICIES.register("frl")
class FRL(Policy):
    """FRL (arXiv:2010.06121): validation-driven re-weighting and/or re-margining per class.

    After each epoch (from epoch ``warmup``), the model is evaluated on the validation split
    (clean and ``attack``); with the slacks γ0, γ1 of the clean-error and boundary-error
    constraints the multipliers move by φ0 += α1·γ0, φ1 += 2α1·γ1 (both clamped at 0 and scaled
    to Σ ≤ ``lim``) and φ2 += α2·γ1. Reweight: the loss is Σw0·CE/Σw0 + Σw1·(rest)/Σw1 over the
    batch, with w = 1/C + φ − mean φ (term ``natural`` takes w0, the other terms w1). Remargin:
    the attack radius of class k is ε·m_k with m_k = clamp(exp(2·φ2_k), 0.98, margin_max), and
    the whole batch takes one step, α·max_i m_{y_i} (FRL's code: max_i(ε·m_{y_i})/4, the same at
    its α = ε/4; ``remargin_step: per_sample`` gives each sample α·m_y). α1 halves every
    ``halve_every`` updates. Before the first update the policy is plain training, which plays
    the role of FRL's pre-trained starting point. The validation attack takes steps of ε/4
    (``val_step``), FRL's 2/255 at ε = 8/255. Under torchrun the batch of these sums and of this
    maximum is the global batch (summed, or maximised, over processes).
    """

    class Params(PolicyParams):
        mode: Literal["reweight", "remargin", "both"] = "both"
        tau1: float | None = Field(None, description="τ1, clean-error bound; None: 0.1 / 0.07")
        tau2: float | None = Field(None, description="τ2, boundary-error bound; None: 0.1 / 0.07")
        alpha1: float = Field(0.05, ge=0.0, description="α1, multiplier step of φ0 (φ1: 2α1)")
        alpha2: float | None = Field(None, ge=0.0, description="α2, step of φ2; None: 0.1/0.2")
        lim: float = Field(0.5, gt=0.0, lt=1.0, description="bound on Σφ0 and Σφ1")
        margin_max: float | None = Field(None, gt=0.0, description="None: 2.5 (3 for both)")
        halve_every: int | None = Field(40, ge=1, description="halve α1 every N updates")
        attack: str = Field("pgd20", description="validation attack")
        val_step: float | None = Field(
            0.25, gt=0.0, description="step of the validation attack as a fraction of ε "
            "(0.25: FRL's 2/255 at ε = 8/255); None: the attack's default 2.5·ε/steps")
        remargin_step: Literal["batch", "per_sample"] = Field(
            "batch", description="attack step under remargin: batch = one step for the batch, "
            "α·max_i m_{y_i} (FRL's code); per_sample = α·m_y")
        warmup: int = Field(0, ge=0, description="first update after this epoch (0: epoch 1)")

    needs = frozenset({"validation"})

    def __init__(self, params: Params, ctx: Any = None) -> None:
        super().__init__(params, ctx)
        both = params.mode == "both"
        self.num_classes = c = int(ctx.num_classes) if ctx is not None else 10
        self.tau1 = params.tau1 if params.tau1 is not None else (0.07 if both else 0.1)
        self.tau2 = params.tau2 if params.tau2 is not None else (0.07 if both else 0.1)
        self.alpha2 = params.alpha2 if params.alpha2 is not None else (0.2 if both else 0.1)
        self.margin_max = params.margin_max if params.margin_max is not None else (
            3.0 if both else 2.5)
        self.phi = torch.zeros(3, c, dtype=torch.float64)  # φ0 (clean), φ1 (boundary), φ2 (margin)
        self.updates = 0

    # ------------------------------------------------------------------ derived tables
    @property
    def reweights(self) -> bool:
        return self.params.mode in ("reweight", "both")

    @property
    def remargins(self) -> bool:
        return self.params.mode in ("remargin", "both")

    def class_weights(self) -> tuple[Tensor, Tensor]:
        """(w0, w1): the weights of the clean term and of the other terms."""
        return cost_sensitive_weights(self.phi[0]), cost_sensitive_weights(self.phi[1])

    def margins(self) -> Tensor:
        return torch.exp(2 * self.phi[2]).clamp(0.98, self.margin_max)

    # ------------------------------------------------------------------ per step
    def eps_scale(self, y: Tensor) -> Tensor | None:
        return per_sample(self.margins(), y).float() if self.remargins else None

    def attack_step(self, step: Tensor, scale: Tensor, eps: Tensor) -> Tensor:
        if self.params.remargin_step == "per_sample":
            return step * scale
        # the maximum over the global batch: under torchrun over every process's share
        return all_reduce_max((step * scale).amax()) * torch.ones_like(step)

    def combine(self, out: ObjectiveOutput, y: Tensor) -> Tensor:
        if not self.reweights:
            return out.total()
        natural, rest = natural_and_rest(out)
        w0, w1 = (per_sample(w, y).to(rest.dtype) for w in self.class_weights())
        n: Any = len(y)
        s1, s0 = w1.sum(), w0.sum()
        if distributed.active():  # n and the weight sums of the global batch
            tot = distributed.all_reduce_sum(torch.stack([torch.tensor(
                float(n), dtype=torch.float64, device=s1.device), s1.double(), s0.double()]))
            n, s1, s0 = tot[0], tot[1], tot[2]
        loss = rest * (n * w1 / s1)
        if natural is not None:
            loss = loss + natural * (n * w0 / s0)
        return loss

    # ------------------------------------------------------------------ epoch end
    def on_epoch_end(self, ctx: EpochContext) -> None:
        if ctx.epoch < max(self.params.warmup, 1) or ctx.evaluate is None:
            return
        res = ctx.evaluate(self.validation_attack())
        c = self.num_classes
        clean = per_class_rates(res.correct[0], res.labels, c)
        robust = per_class_rates(res.correct[1], res.labels, c)
        self.update(clean, robust, float(res.correct[0].float().mean()),
                    float(res.correct[1].float().mean()))

    def validation_attack(self) -> Any:
        """The validation attack: its spec, built with the step ``val_step``·ε if that is set."""
        p = self.params
        if p.val_step is None or self.ctx is None or float(self.ctx.eps) <= 0:
            return p.attack
        from ..attacks import build_attack

        return build_attack(p.attack, self.ctx.norm, step_size=p.val_step * float(self.ctx.eps),
                            bounded=getattr(self.ctx, "bounded", True))

    def update(self, clean: Tensor, robust: Tensor, clean_avg: float, robust_avg: float) -> None:
        """One multiplier step from per-class clean and robust validation accuracy."""
        p = self.params
        alpha1 = p.alpha1 * (0.5 ** ((self.updates + 1) // p.halve_every) if p.halve_every else 1.0)
        g0, g1 = fairness_slacks(clean.double(), robust.double(), clean_avg, robust_avg,
                                 self.tau1, self.tau2)
        self.phi[0] = normalize_multipliers(self.phi[0] + alpha1 * g0, p.lim)
        self.phi[1] = normalize_multipliers(self.phi[1] + 2 * alpha1 * g1, p.lim)
        self.phi[2] = self.phi[2] + self.alpha2 * g1
        self.updates += 1

    def log(self) -> dict[str, Any]:
        w0, w1 = self.class_weights()
        r = lambda t: [round(float(v), 5) for v in t]  # noqa: E731
        out: dict[str, Any] = {"updates": self.updates}
        if self.reweights:
            out.update(w_clean=r(w0), w_boundary=r(w1))
        if self.remargins:
            out["margin"] = r(self.margins())
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"phi": self.phi.clone(), "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            self.phi = state["phi"].double().cpu()
            self.updates = int(state["updates"])

