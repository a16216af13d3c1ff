"""Standard training, PGD-AT, TRADES and MART."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from ..attacks import build_attack
from ..attacks.basic import kl_per_sample
from . import OBJECTIVES
from .base import Objective, ObjectiveOutput, ObjectiveParams


@OBJECTIVES.register("standard")
class Standard(Objective):
    """Standard training: cross-entropy on clean images, no attack."""

    uses_attack = False

    def forward(self, model, x, y, eps, step_size):  # type: ignore[override]
        logits = model(x)
        return ObjectiveOutput({"natural": F.cross_entropy(logits, y, reduction="none")}, logits)


@OBJECTIVES.register("pgd_at")
class PGDAT(Objective):
    """PGD adversarial training (Madry et al., arXiv:1706.06083): CE on PGD examples."""

    class Params(ObjectiveParams):
        random_start: bool = True

    def __init__(self, params, ctx):  # type: ignore[no-untyped-def]
        super().__init__(params, ctx)
        self.attack = build_attack(
            f"pgd{ctx.steps}", ctx.norm, random_start=params.random_start
        ) if ctx.steps > 0 else None

    def forward(self, model, x, y, eps, step_size):  # type: ignore[override]
        x_adv = self.attack(model, x, y, eps, step_size) if self.attack is not None else x
        logits_adv = model(x_adv)
        loss = F.cross_entropy(logits_adv, y, reduction="none")
        return ObjectiveOutput({"robust": loss}, None, logits_adv, x_adv)


class TradesParams(ObjectiveParams):
    beta: float = Field(6.0, ge=0.0, description="β, the weight of the KL term")


def trades_attack(ctx, steps: int | None = None):  # type: ignore[no-untyped-def]
    steps = ctx.steps if steps is None else steps
    return build_attack(f"trades-kl{steps}", ctx.norm) if steps > 0 else None


@OBJECTIVES.register("trades")
class Trades(Objective):
    """TRADES (Zhang et al., arXiv:1901.08573): CE(f(x), y) + β·KL(p(x) ‖ p(x_adv))."""

    Params = TradesParams

    def __init__(self, params, ctx):  # type: ignore[no-untyped-def]
        super().__init__(params, ctx)
        self.attack = trades_attack(ctx)

    def forward(self, model, x, y, eps, step_size):  # type: ignore[override]
        x_adv = self.attack(model, x, y, eps, step_size) if self.attack is not None else x
        logits = model(x)
        logits_adv = model(x_adv)
        natural = F.cross_entropy(logits, y, reduction="none")
        robust = self.beta * kl_per_sample(logits, logits_adv)
        return ObjectiveOutput({"natural": natural, "robust": robust}, logits, logits_adv, x_adv)


def mart_terms(logits: Tensor, logits_adv: Tensor, y: Tensor, beta: float) -> dict[str, Tensor]:
    """MART's per-sample terms (Wang et al., ICLR 2020), as in its official code."""
    adv_probs = F.softmax(logits_adv, dim=1)
    tmp = torch.argsort(adv_probs, dim=1)[:, -2:]
    new_y = torch.where(tmp[:, -1] == y, tmp[:, -2], tmp[:, -1])
    adv = F.cross_entropy(logits_adv, y, reduction="none") + F.nll_loss(
        torch.log(1.0001 - adv_probs + 1e-12), new_y, reduction="none"
    )
    nat_probs = F.softmax(logits, dim=1)
    true_probs = nat_probs.gather(1, y[:, None]).squeeze(1)
    kl = (nat_probs * (torch.log(nat_probs + 1e-12) - torch.log(adv_probs + 1e-12))).sum(1)
    return {"adversarial": adv, "robust": beta * kl * (1.0000001 - true_probs)}


@OBJECTIVES.register("mart")
class MART(Objective):
    """MART (Wang et al., ICLR 2020): boosted CE on PGD examples + β·KL·(1 − p_y(x))."""

    Params = TradesParams

    def __init__(self, params, ctx):  # type: ignore[no-untyped-def]
        super().__init__(params, ctx)
        self.attack = build_attack(f"pgd{ctx.steps}", ctx.norm) if ctx.steps > 0 else None

    def forward(self, model, x, y, eps, step_size):  # type: ignore[override]
        x_adv = self.attack(model, x, y, eps, step_size) if self.attack is not None else x
        logits = model(x)
        logits_adv = model(x_adv)
        return ObjectiveOutput(mart_terms(logits, logits_adv, y, self.beta), logits, logits_adv,
                               x_adv)
