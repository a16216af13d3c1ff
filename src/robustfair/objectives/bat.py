"""BAT: Balance Adversarial Training (Sun et al., AAAI 2023, arXiv:2209.07534).

Source-class fairness: every sample is attacked only as far as it needs to reach the decision
boundary (per-sample early stopping of the TRADES-KL attack). Target-class fairness: the outputs
at the stopped points are pushed towards the uniform distribution, so that no target class
absorbs the adversarial mass.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from ..attacks.base import ascent_direction, eval_mode, input_grad, project
from ..attacks.basic import box, kl_per_sample
from . import OBJECTIVES
from .base import Objective, ObjectiveOutput, ObjectiveParams


def kl_to_uniform(logits: Tensor) -> Tensor:
    """KL(p ‖ U) per sample = log C − H(p), p = softmax(logits)."""
    logp = F.log_softmax(logits, dim=1)
    return (logp.exp() * logp).sum(1) + math.log(logits.shape[1])


def early_stopped_kl_pgd(model: nn.Module, x: Tensor, y: Tensor, eps: Tensor, step: Tensor,
                         steps: int, tau: int = 1, norm: str = "linf", init_std: float = 0.001,
                         clip: bool = True) -> tuple[Tensor, Tensor]:
    """TRADES-KL PGD from x + init_std·N(0, I) that keeps two iterates per sample.

    With x_0, x_1, ... the iterates (each x_k is checked before it is stepped):

    - x_lc, "last clean": the iterate just before the first misclassified one (x_0 if x_0 is
      already misclassified); the last iterate x_K if none of x_0..x_{K−1} is misclassified;
    - x_fa, "first adversarial" with τ extra steps (FAT): the (τ+1)-th misclassified iterate
      among x_0..x_{K−1}, else x_K.

    The model is in eval mode; one trajectory serves both iterates.

    Returns:
        (x_lc, x_fa), both detached.
    """
    with eval_mode(model), torch.enable_grad():
        with torch.no_grad():
            nat = model(x)
        x_k = box(x + init_std * torch.randn_like(x), clip).detach()
        prev = x_k
        x_lc, x_fa = x_k.clone(), x_k.clone()
        lc_done = torch.zeros(len(x), dtype=torch.bool, device=x.device)
        fa_done = torch.zeros_like(lc_done)
        misses = torch.zeros(len(x), dtype=torch.long, device=x.device)
        for _ in range(steps):
            x_k = x_k.detach().requires_grad_(True)
            logits = model(x_k)
            wrong = logits.argmax(1) != y
            new_lc = wrong & ~lc_done
            x_lc[new_lc] = prev[new_lc]
            lc_done |= new_lc
            hit = wrong & ~fa_done
            stop = hit & (misses >= tau)
            x_fa[stop] = x_k.detach()[stop]
            fa_done |= stop
            misses += (hit & ~stop).long()
            if bool(fa_done.all()):
                break
            g = input_grad(kl_per_sample(nat, logits).sum(), x_k)
            with torch.no_grad():
                prev = x_k.detach()
                x_next = prev + step * ascent_direction(g, norm)
                x_k = box(x + project(x_next - x, eps, norm), clip)
        x_lc[~lc_done] = x_k.detach()[~lc_done]
        x_fa[~fa_done] = x_k.detach()[~fa_done]
    return x_lc.detach(), x_fa.detach()


@OBJECTIVES.register("bat")
class BAT(Objective):
    """BAT (arXiv:2209.07534): early-stopped TRADES with uniform-output terms.

    Per sample: ``natural`` = CE(f(x_lc), y); ``robust`` = β·KL(p(x) ‖ p(x_fa));
    ``uniform`` = γ·[KL(p(x_lc) ‖ U) + KL(p(x_fa) ‖ U)], with x_lc and x_fa from
    :func:`early_stopped_kl_pgd` (ε, step size and step count of the training attack, so a
    class-wise policy's ε reaches it). The official code uses β = 6, τ = 1, γ = 1.
    """

    class Params(ObjectiveParams):
        beta: float = Field(6.0, ge=0.0, description="β, weight of KL(p(x) ‖ p(x_fa))")
        tau: int = Field(1, ge=0, description="extra steps after the first misclassification")
        gamma: float = Field(1.0, ge=0.0, description="weight of the two uniform terms")

    def forward(self, model, x, y, eps, step_size):  # type: ignore[override]
        steps = self.ctx.steps
        if steps > 0:
            x_lc, x_fa = early_stopped_kl_pgd(model, x, y, eps, step_size, steps, self.tau,
                                              self.ctx.norm, clip=self.ctx.bounded)
        else:
            x_lc = x_fa = x
        logits = model(x)
        logits_lc = model(x_lc)
        logits_fa = model(x_fa)
        terms = {
            "natural": F.cross_entropy(logits_lc, y, reduction="none"),
            "robust": self.beta * kl_per_sample(logits, logits_fa),
            "uniform": self.gamma * (kl_to_uniform(logits_lc) + kl_to_uniform(logits_fa)),
        }
        return ObjectiveOutput(terms, logits, logits_fa, x_fa)
