"""WAT: Worst-class Adversarial Training (Li & Liu, AAAI 2023, arXiv:2302.02227).

Training is a no-regret game between the model and an adversary that picks, among C + 1
"experts" (the C classes and the class average), where to put the loss weight. The adversary
plays Hedge on the validation losses: the classes that have been expensive so far get more
weight.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from ..attacks import build_attack
from ..attacks.base import eval_mode
from ..attacks.basic import kl_per_sample
from ..engine.subset import subset_indices
from ..objectives.base import ObjectiveOutput
from . import POLICIES
from ._classwise import objective_beta, per_sample
from .base import EpochContext, Policy, PolicyParams


def hedge_weights(cumulative_loss: Tensor, eta: float, num_classes: int) -> Tensor:
    """Hedge over C + 1 experts: w = C · softmax(η · Σ_{s≤t} L(s)).

    Args:
        cumulative_loss: (C + 1,) the per-class validation costs summed over the past epochs
            (entry C is the class-average cost).
        eta: η, the Hedge learning rate.
        num_classes: C.
    """
    return num_classes * torch.softmax(eta * cumulative_loss.double(), dim=0)


def class_costs(total: Tensor, count: Tensor, mode: str = "class_mean", batches: int = 0,
                batch_size: int = 0) -> Tensor:
    """(C + 1,) validation costs from the per-class sums ``total`` and counts ``count`` (C,).

    ``class_mean`` (the paper's L_k): L_k = total_k / n_k and L_C = Σ total / Σ n (a class
    without samples gets L_C). ``official`` (WAT's code): L_k = C·total_k / (batches·batch_size)
    and L_C = Σ total / (batches·batch_size), which are the class means only for a balanced set
    whose size fills its batches exactly (WAT's CIFAR-10 split, 3000 images in 24 batches of 128,
    gives 0.977 times the means, i.e. η = 0.0977).
    """
    total, count = total.double(), count.double()
    if mode == "official":
        denom = float(batches * batch_size)
        return torch.cat([len(total) * total / denom, (total.sum() / denom).view(1)])
    overall = total.sum() / count.sum()
    per_class = torch.where(count > 0, total / count.clamp_min(1), overall)
    return torch.cat([per_class, overall.view(1)])


def trades_cost(model: nn.Module, x: Tensor, y: Tensor, x_adv: Tensor, beta: float) -> Tensor:
    """Per-sample TRADES cost CE(f(x), y) + β·KL(p(x) ‖ p(x_adv)), in eval mode."""
    with eval_mode(model), torch.no_grad():
        logits, logits_adv = model(x), model(x_adv)
    return F.cross_entropy(logits, y, reduction="none") + beta * kl_per_sample(logits, logits_adv)


@POLICIES.register("wat")
class WAT(Policy):
    """WAT (arXiv:2302.02227): Hedge class weights from validation TRADES costs.

    After each epoch t the model is attacked on the validation split with the training attack
    (TRADES-KL, ε, α and steps of ``attack``), and the per-class mean cost
    L_k(t) = mean over class k of CE + β·KL is measured, with L_C(t) the mean over all samples.
    The weights become w = C·softmax(η·Σ_{s≤t} L(s)) over the C + 1 entries, and the training
    loss of a sample of class y is (w_y + w_C)·(its TRADES loss): the class-weighted loss plus
    w_C times the plain batch mean. All weights start at 1.

    L_k is the exact class mean; ``cost: official`` divides the class sums as WAT's code does
    (see :func:`class_costs`; with ``batch_size: 128``, its setting).
    """

    class Params(PolicyParams):
        eta: float = Field(0.1, gt=0.0, description="η, Hedge learning rate")
        beta: float | None = Field(None, ge=0.0, description="TRADES β; None: the objective's")
        val_n: int | None = Field(None, ge=1, description="validation images used, a "
                                                           "class-stratified subset (None: all)")
        batch_size: int = Field(128, ge=1, description="validation batch (WAT's code: 128)")
        cost: Literal["class_mean", "official"] = Field(
            "class_mean", description="class_mean: L_k = the class-k mean cost; official: "
            "C·Σ_k/(batches·batch_size), WAT's code (equal only on balanced, batch-filling data)")

    needs = frozenset({"validation"})

    def __init__(self, params: Params, ctx: Any = None) -> None:
        super().__init__(params, ctx)
        self.num_classes = int(ctx.num_classes) if ctx is not None else 10
        self.trades_beta = objective_beta(ctx, params.beta)
        c = self.num_classes
        self.weights = torch.ones(c + 1, dtype=torch.float64)
        self.cumulative = torch.zeros(c + 1, dtype=torch.float64)

    def combine(self, out: ObjectiveOutput, y: Tensor) -> Tensor:
        total = out.total()
        w = per_sample(self.weights[:-1], y) + self.weights[-1]
        return total * w.to(total.dtype)

    # ------------------------------------------------------------------ epoch end
    def on_epoch_end(self, ctx: EpochContext) -> None:
        data = (self.ctx.extra or {}).get("data") if self.ctx is not None else None
        if data is None or len(data.val) == 0:
            return
        devices = [ctx.device] if ctx.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(int(self.ctx.extra.get("seed", 0)))
            cost = self.validation_costs(ctx.model, data.val, ctx.device)
        self.update(cost)

    def update(self, cost: Tensor) -> None:
        """Add one epoch's (C + 1,) validation costs and recompute the Hedge weights."""
        self.cumulative = self.cumulative + cost.double().cpu()
        self.weights = hedge_weights(self.cumulative, self.params.eta, self.num_classes)

    def validation_costs(self, model: nn.Module, val: Any, device: torch.device) -> Tensor:
        """(C + 1,): the mean TRADES cost of each class under attack, then the overall mean."""
        ctx, c = self.ctx, self.num_classes
        attack = build_attack(f"trades-kl{max(ctx.steps, 1)}", ctx.norm,
                              bounded=getattr(ctx, "bounded", True))
        # val_n: the class-stratified subset (a split may be sorted by class, so never the
        # first n images)
        chosen = subset_indices(val.y.cpu(), self.params.val_n)
        n = len(chosen)
        total = torch.zeros(c, dtype=torch.float64)
        count = torch.zeros(c, dtype=torch.float64)
        for start in range(0, n, self.params.batch_size):
            idx = chosen[start:start + self.params.batch_size]
            x = val.images(idx.to(val.y.device)).to(device)
            y = val.y[idx.to(val.y.device)].to(device)
            x_adv = attack(model, x, y, ctx.eps, ctx.step_size)
            cost = trades_cost(model, x, y, x_adv, self.trades_beta).double().cpu()
            total.index_add_(0, y.cpu(), cost)
            count += torch.bincount(y.cpu(), minlength=c).double()
        batches = -(-n // self.params.batch_size)
        return class_costs(total, count, self.params.cost, batches, self.params.batch_size)

    def log(self) -> dict[str, Any]:
        return {"weights": [round(float(v), 5) for v in self.weights]}

    def state_dict(self) -> dict[str, Any]:
        return {"weights": self.weights.clone(), "cumulative": self.cumulative.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            self.weights = state["weights"].double().cpu()
            self.cumulative = state["cumulative"].double().cpu()
