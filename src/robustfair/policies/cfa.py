"""CFA: Class-wise Calibrated Fair Adversarial Training (Wei et al., CVPR 2023,
arXiv:2303.14460).

Three parts, each calibrated by the class-wise robust accuracy r_k of the previous epoch's
training batches: a class-wise margin (CCM), a class-wise TRADES regularization (CCR), and a
fairness-aware weight average (FAWA) that only absorbs epochs whose worst validation class is
robust enough.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from ..objectives.base import ObjectiveOutput
from . import POLICIES
from ._classwise import natural_and_rest, objective_beta, per_class_rates, per_sample
from .base import EpochContext, Policy, PolicyParams


def ccm_scale(robust: Tensor, lambda_1: float) -> Tensor:
    """CCM: ε_k = (λ1 + r_k)·ε, returned as the multiplier λ1 + r_k."""
    return lambda_1 + robust


def ccr_beta(robust: Tensor, lambda_2: float, beta: float) -> Tensor:
    """CCR: b_k = (λ2 + r_k)β / (1 + (λ2 + r_k)β); the loss is (1 − b_k)·CE + b_k·KL."""
    s = (lambda_2 + robust) * beta
    return s / (1 + s)


def balanced_rates(correct: Tensor, count: Tensor) -> Tensor:
    """CFA's code's class-wise accuracy C·correct_k / N (N = Σ_k n_k): correct_k / n_k only when
    every class has N / C samples."""
    return len(count) * correct.double() / count.sum().clamp_min(1)


def average_state(avg: dict[str, Tensor] | None, new: dict[str, Tensor], decay: float
                  ) -> dict[str, Tensor]:
    """θ̄ ← decay·θ̄ + (1 − decay)·θ on floating tensors (others copied); None starts at θ."""
    if avg is None:
        return {k: v.detach().clone().cpu() for k, v in new.items()}
    out = {}
    for k, v in new.items():
        v = v.detach().cpu()
        out[k] = (decay * avg[k] + (1 - decay) * v) if v.is_floating_point() else v.clone()
    return out


@POLICIES.register("cfa")
class CFA(Policy):
    """CFA (arXiv:2303.14460): class-wise margin, class-wise TRADES β, fairness-aware averaging.

    r_k is the class-k accuracy on the adversarial examples of the previous epoch's training
    batches (the engine's ``train_stats``). From epoch ``begin`` + 1:

    - CCM (``ccm``): class k is attacked within (λ1 + r_k)·ε, with the configured step α for
      every class, as in CFA's code (``ccm_step: scaled`` scales the step by λ1 + r_k too);
    - CCR (``ccr``, TRADES only): per sample, (1 − b_y)·CE + b_y·KL with
      b_y = (λ2 + r_y)β / (1 + (λ2 + r_y)β). Without CCR (or before ``begin``) b = β/(1 + β),
      which is TRADES divided by 1 + β, as in the official code (``normalize: false`` keeps
      TRADES' scale instead, dividing by 1 + β only where CCR changes b).

    FAWA (``fawa``): after every epoch, if the worst class's validation accuracy under
    ``fawa_attack`` is ≥ ``fawa_threshold``, the averaged weights θ̄ ← d·θ̄ + (1 − d)·θ
    (the first such epoch starts θ̄ = θ); otherwise θ̄ is left as it is. The final evaluation uses
    θ̄ (``eval_state``); if no epoch qualified, it uses the trained model.

    Per-class accuracies (r_k and the FAWA gate) are correct_k / n_k. CFA's code computes
    C·correct_k / N, which is the same on balanced data (its CIFAR setting) and not an accuracy
    otherwise; ``class_accuracy: balanced`` reproduces it.
    """

    class Params(PolicyParams):
        ccm: bool = True
        ccr: bool = True
        lambda_1: float = Field(0.5, ge=0.0, description="λ1, base of the class-wise margin")
        lambda_2: float = Field(0.5, ge=0.0, description="λ2, base of the class-wise β")
        beta: float | None = Field(None, ge=0.0, description="TRADES β; None: the objective's")
        begin: int = Field(10, ge=0, description="calibration starts after this epoch")
        normalize: bool = Field(True, description="divide the loss by 1 + β as CFA's code does")
        fawa: bool = True
        fawa_decay: float = Field(0.88, ge=0.0, lt=1.0)
        fawa_threshold: float = Field(0.24, ge=0.0, le=1.0)
        fawa_attack: str = "pgd10"
        ccm_step: Literal["fixed", "scaled"] = Field(
            "fixed", description="attack step under CCM: fixed α (CFA's code) or (λ1 + r_k)·α")
        class_accuracy: Literal["exact", "balanced"] = Field(
            "exact", description="per-class accuracy: exact = correct_k/n_k; balanced = "
            "C·correct_k/N (CFA's code; equal on balanced data)")

    needs = frozenset({"validation"})

    def __init__(self, params: Params, ctx: Any = None) -> None:
        super().__init__(params, ctx)
        self.num_classes = int(ctx.num_classes) if ctx is not None else 10
        self.trades_beta = objective_beta(ctx, params.beta)
        self.robust = torch.ones(self.num_classes, dtype=torch.float64)
        self.calibrated = False
        self.fawa_state: dict[str, Tensor] | None = None
        self.fawa_updates = 0

    # ------------------------------------------------------------------ per step
    def eps_scale(self, y: Tensor) -> Tensor | None:
        if not (self.calibrated and self.params.ccm):
            return None
        return per_sample(ccm_scale(self.robust, self.params.lambda_1), y).float()

    def attack_step(self, step: Tensor, scale: Tensor, eps: Tensor) -> Tensor:
        return step if self.params.ccm_step == "fixed" else step * scale

    def combine(self, out: ObjectiveOutput, y: Tensor) -> Tensor:
        natural, rest = natural_and_rest(out)
        if natural is None:
            return out.total()
        beta = self.trades_beta
        if self.calibrated and self.params.ccr:
            s = per_sample(self.params.lambda_2 + self.robust, y).to(rest.dtype)
        else:
            s = torch.ones_like(rest)
        # (1 − b)·CE + b·KL with b = sβ/(1 + sβ) and rest = β·KL
        loss = natural + s * rest
        if self.params.normalize:
            return loss / (1 + s * beta)
        return loss * (1 + beta) / (1 + s * beta)

    # ------------------------------------------------------------------ epoch end
    def on_epoch_end(self, ctx: EpochContext) -> None:
        st = ctx.train_stats
        if "adv_correct" in st and int(st["count"].sum()) > 0:
            count = st["count"].double()
            if self.params.class_accuracy == "balanced":
                self.robust = balanced_rates(st["adv_correct"].double(), count)
            else:
                acc = st["adv_correct"].double() / count.clamp_min(1)
                self.robust = torch.where(count > 0, acc, self.robust)
        self.calibrated = ctx.epoch >= self.params.begin
        if self.params.fawa and ctx.evaluate is not None:
            self.update_fawa(ctx)

    def update_fawa(self, ctx: EpochContext) -> None:
        res = ctx.evaluate(self.params.fawa_attack)
        c = self.num_classes
        if self.params.class_accuracy == "balanced":
            labels = res.labels.long().cpu()
            hits = torch.bincount(labels, weights=res.correct[1].double().cpu(), minlength=c)
            rates = balanced_rates(hits, torch.bincount(labels, minlength=c).double())
        else:
            rates = per_class_rates(res.correct[1], res.labels, c)
        worst = float(rates.min())
        if worst >= self.params.fawa_threshold:
            self.absorb(ctx.model)

    def absorb(self, model: nn.Module) -> None:
        """Fold the current weights into the fairness-aware average."""
        self.fawa_state = average_state(self.fawa_state, model.state_dict(),
                                        self.params.fawa_decay)
        self.fawa_updates += 1

    def eval_state(self) -> dict[str, Tensor] | None:
        return self.fawa_state

    def log(self) -> dict[str, Any]:
        out: dict[str, Any] = {"calibrated": self.calibrated, "fawa_updates": self.fawa_updates,
                               "train_robust": [round(float(v), 4) for v in self.robust]}
        if self.calibrated and self.params.ccm:
            out["eps_scale"] = [round(float(v), 4) for v in
                                ccm_scale(self.robust, self.params.lambda_1)]
        if self.calibrated and self.params.ccr:
            out["class_beta"] = [round(float(v), 4) for v in ccr_beta(
                self.robust, self.params.lambda_2, self.trades_beta)]
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"robust": self.robust.clone(), "calibrated": self.calibrated,
                "fawa": self.fawa_state, "fawa_updates": self.fawa_updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        self.robust = state["robust"].double().cpu()
        self.calibrated = bool(state["calibrated"])
        fawa = state.get("fawa")
        self.fawa_state = None if fawa is None else {k: v.cpu() for k, v in fawa.items()}
        self.fawa_updates = int(state["fawa_updates"])
