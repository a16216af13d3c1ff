"""Standard training, PGD-AT, TRADES and MART."""

from __future__ import annotations

from typing import Any, Literal

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


#: Where the training attack takes its first gradient (``method.objective.start``).
Start = Literal["normal", "normal_clamped", "uniform", "uniform_raw"]

START_HELP = (
    "start of the training attack: normal = x + 0.001·N(0, I), first gradient at that raw point "
    "(official TRADES, MART, LBGAT, DKL, PART-T/M codes); normal_clamped = the same point "
    "projected and clamped to [0, 1] first; uniform = uniform in the ε-ball, clamped (Madry, "
    "torchattacks); uniform_raw = x + U(−ε, ε) with the scalar attack.eps, not clamped "
    "(official PART code)"
)


def start_params(start: str, eps: float) -> dict[str, Any]:
    """The iterative attack's parameters that give the start ``start`` (see :data:`Start`)."""
    if start == "normal":
        return {"random_start": False, "init_std": 0.001, "clamp_start": False}
    if start == "normal_clamped":
        return {"random_start": False, "init_std": 0.001, "clamp_start": True}
    if start == "uniform":
        return {"random_start": True, "clamp_start": True}
    if start == "uniform_raw":
        return {"random_start": True, "clamp_start": False, "start_eps": float(eps)}
    raise ValueError(f"unknown attack start {start!r}")


def per_element(eps: Tensor) -> bool:
    """True for an ε that varies within a sample (a per-pixel map, as PART's budget gives)."""
    return eps.dim() > 1 and eps.flatten(1).shape[1] > 1


@OBJECTIVES.register("pgd_at")
class PGDAT(Objective):
    """PGD adversarial training (Madry et al., arXiv:1706.06083): CE on PGD examples.

    The attack starts at a uniform random point of the ε-ball clamped to [0, 1] (Madry's and
    torchattacks' PGD). With a per-pixel ε map (PART's pixel budget) ``start: auto`` starts as
    the official PART code does: x + U(−ε, ε) with the scalar attack.eps, not clamped, outside
    the ε_low part of the map, and the first gradient is taken there.
    """

    class Params(ObjectiveParams):
        random_start: bool = Field(True, description="False: start at x itself")
        start: Literal["auto"] | Start = Field(
            "auto", description="auto: uniform, or uniform_raw on a per-pixel ε map (PART); "
            + START_HELP)

    def __init__(self, params, ctx):  # type: ignore[no-untyped-def]
        super().__init__(params, ctx)
        self.attack = self.map_attack = None
        if ctx.steps <= 0:
            return
        if not params.random_start:
            self.attack = build_attack(f"pgd{ctx.steps}", ctx.norm, random_start=False,
                                       bounded=ctx.bounded)
            return
        start = "uniform" if params.start == "auto" else params.start
        self.attack = build_attack(f"pgd{ctx.steps}", ctx.norm, bounded=ctx.bounded,
                                   **start_params(start, ctx.eps))
        if params.start == "auto":
            self.map_attack = build_attack(f"pgd{ctx.steps}", ctx.norm, bounded=ctx.bounded,
                                           **start_params("uniform_raw", ctx.eps))

    def forward(self, model, x, y, eps, step_size):  # type: ignore[override]
        attack = self.attack
        if self.map_attack is not None and per_element(eps):
            attack = self.map_attack
        x_adv = attack(model, x, y, eps, step_size) if attack is not None else x
        logits_adv = model(x_adv)
        loss = F.cross_entropy(logits_adv, y, reduction="none")
        return ObjectiveOutput({"robust": loss}, None, logits_adv, x_adv)


class TradesParams(ObjectiveParams):
    beta: float = Field(6.0, ge=0.0, description="β, the weight of the KL term")
    start: Start = Field("normal", description=START_HELP)


def trades_attack(ctx: Any, steps: int | None = None, start: str = "normal") -> Any:
    """The TRADES-KL training attack with ``ctx``'s norm and steps and the given start."""
    steps = ctx.steps if steps is None else steps
    if steps <= 0:
        return None
    return build_attack(f"trades-kl{steps}", ctx.norm, bounded=ctx.bounded,
                        **start_params(start, ctx.eps))


@OBJECTIVES.register("trades")
class Trades(Objective):
    """TRADES (Zhang et al., arXiv:1901.08573): CE(f(x), y) + β·KL(p(x) ‖ p(x_adv))."""

    Params = TradesParams

    def __init__(self, params, ctx):  # type: ignore[no-untyped-def]
        super().__init__(params, ctx)
        self.attack = trades_attack(ctx, start=params.start)

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
    # nn.KLDivLoss(log(p' + 1e-12), p) elementwise: p·log p − p·log(p' + 1e-12)
    kl = (torch.xlogy(nat_probs, nat_probs) - nat_probs * torch.log(adv_probs + 1e-12)).sum(1)
    return {"adversarial": adv, "robust": beta * kl * (1.0000001 - true_probs)}


@OBJECTIVES.register("mart")
class MART(Objective):
    """MART (Wang et al., ICLR 2020): boosted CE on PGD examples + β·KL·(1 − p_y(x)).

    The attack is PGD on the cross-entropy started, as in MART's and PART-M's official codes,
    at the raw x + 0.001·N(0, I) (``start: uniform`` gives the uniform start in the ε-ball)."""

    Params = TradesParams

    def __init__(self, params, ctx):  # type: ignore[no-untyped-def]
        super().__init__(params, ctx)
        self.attack = build_attack(f"pgd{ctx.steps}", ctx.norm, bounded=ctx.bounded,
                                   **start_params(params.start, ctx.eps)) if ctx.steps > 0 else None

    def forward(self, model, x, y, eps, step_size):  # type: ignore[override]
        x_adv = self.attack(model, x, y, eps, step_size) if self.attack is not None else x
        logits = model(x)
        logits_adv = model(x_adv)
        return ObjectiveOutput(mart_terms(logits, logits_adv, y, self.beta), logits, logits_adv,
                               x_adv)
