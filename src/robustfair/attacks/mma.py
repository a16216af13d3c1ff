"""The multi-targeted margin attack (MMA) used to evaluate PART.

PART (Zhang et al., ICML 2024, arXiv:2406.00685) reports robustness under "MMA" (Gao et al.,
"Fast and Reliable Evaluation of Adversarial Robustness with Minimum-Margin Attack", ICML 2022):
for each of the k classes with the largest clean logits other than the label, run a targeted
PGD on the capped margin −max(z_y − z_t + κ, 0) from one shared random start, then keep, per
sample, the candidate with the largest final margin z_t − z_y.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from . import ATTACKS
from .base import Attack, AttackParams, ascent_direction, input_grad, project, random_init


def _repeat_eps(eps: Tensor, n: int, k: int) -> Tensor:
    """Repeat a broadcastable ε for k stacked copies of a batch of n."""
    if eps.dim() > 0 and eps.shape[0] == n and n > 1:
        return eps.repeat((k,) + (1,) * (eps.dim() - 1))
    return eps


@ATTACKS.register("mma")
class MMA(Attack):
    """Multi-targeted margin attack over the top-k classes (Gao et al., ICML 2022), as PART
    evaluates with it: k = 3, κ = 50, 20 steps, uniform random start.

    Inputs in [0, 1]; ℓ∞ (the paper) or ℓ2. Example: ``build_attack("mma20")(model, x, y, 8/255)``.
    """

    class Params(AttackParams):
        norm: Literal["linf", "l2"] = "linf"
        steps: int = Field(20, ge=1, le=100_000)
        step_size: float | None = Field(
            None, gt=0, description="absolute step; None: eps/4 (2/255 at 8/255, as in PART)")
        k: int = Field(3, ge=1, description="number of target classes (the top-k wrong ones)")
        kappa: float = Field(50.0, ge=0.0, description="confidence κ of the margin")
        random_start: bool = True

    def perturb(self, model: nn.Module, x: Tensor, y: Tensor, eps: Tensor,  # type: ignore[override]
                step_size: float | Tensor | None) -> Tensor:
        alpha = step_size if step_size is not None else (
            self.step_size if self.step_size is not None else eps / 4)
        n = len(x)
        with torch.no_grad():
            logits = model(x)
        k = min(self.k, logits.shape[1] - 1)
        masked = logits.scatter(1, y[:, None], float("-inf"))
        targets = masked.topk(k, dim=1).indices.T.reshape(-1)  # (k·n,) target-major
        start = random_init(x, eps, self.norm) if self.random_start else torch.zeros_like(x)
        x0 = (x + start).clamp(0, 1)
        xs, ys = x.repeat(k, 1, 1, 1), y.repeat(k)
        e = _repeat_eps(eps, n, k)
        a = _repeat_eps(alpha, n, k) if isinstance(alpha, Tensor) else alpha
        x_adv = x0.repeat(k, 1, 1, 1)
        for _ in range(self.steps):
            x_adv.requires_grad_(True)
            z = model(x_adv)
            # ascent on −max(z_y − z_t + κ, 0): push z_t above z_y, up to a margin of κ
            loss = -torch.clamp(self.kappa - self._margin(z, ys, targets), min=0).sum()
            g = input_grad(loss, x_adv)
            with torch.no_grad():
                x_adv = x_adv + a * ascent_direction(g, self.norm)
                x_adv = (xs + project(x_adv - xs, e, self.norm)).clamp(0, 1)
        x_adv = x_adv.detach()
        with torch.no_grad():
            final = self._margin(model(x_adv), ys, targets).view(k, n)
        best = final.argmax(0)
        return x_adv.view(k, n, *x.shape[1:])[best, torch.arange(n, device=x.device)]

    @staticmethod
    def _margin(z: Tensor, y: Tensor, t: Tensor) -> Tensor:
        """z_t − z_y per sample."""
        return z.gather(1, t[:, None]).squeeze(1) - z.gather(1, y[:, None]).squeeze(1)
