"""DKL / IKL: the Decoupled and the Improved Kullback–Leibler divergence losses
(Cui et al., NeurIPS 2024, arXiv:2305.13948).

For logits z_n (clean) and z_a (adversarial), KL(p(z_n) ‖ p(z_a)) has the same gradients as

    DKL = ¼ Σ_{j,k} w_jk ((z_n,j − z_n,k) − S(z_a,j − z_a,k))²  −  Σ_j S(p(z_n)_j) log p(z_a)_j
          └──────────────── wMSE, gradient into z_n ──────────┘    └─ soft-label CE, into z_a ─┘

with w_jk = S(p(z_n)_j · p(z_n)_k) and S the stop-gradient (the paper's Theorem 1). IKL makes two
changes: the stop-gradient inside wMSE is dropped, so both logits receive its gradient, and the
per-sample weights p(z_n) are replaced by class-wise ones s_y, the class-y mean of
softmax(z_n / T) over the previous epoch's training batches (uniform 1/C in the first epoch).
Training minimises CE(z_n, y) + β·wMSE + α·SCE; the official adversarial-training code trains
IKL (its ``dkl_loss``) with α = 4, β = 20, T = 4.

Since w_jk = s_j s_k is an outer product, wMSE is computed in O(C):
¼ Σ_{j,k} s_j s_k (u_j − u_k)² = ½ [(Σ_j s_j)(Σ_j s_j u_j²) − (Σ_j s_j u_j)²], u = z_n − z_a.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from ..attacks.basic import TradesKL
from . import OBJECTIVES
from .base import BuildContext, Objective, ObjectiveOutput, ObjectiveParams
from .basic import START_HELP, Start, start_params, trades_attack


def weighted_mse(z_nat: Tensor, z_adv: Tensor, s: Tensor) -> Tensor:
    """Per-sample wMSE = ¼ Σ_{j,k} s_j s_k ((z_n,j − z_n,k) − (z_a,j − z_a,k))².

    Args:
        z_nat: (B, C) clean logits (the paper's Δn side).
        z_adv: (B, C) adversarial logits; detach them (or ``z_nat``) to stop a side's gradient.
        s: (B, C) weight vectors; the pair weight is w_jk = s_j s_k.

    Returns:
        (B,) tensor.
    """
    u = z_nat - z_adv
    su = s * u
    return 0.5 * (s.sum(1) * (su * u).sum(1) - su.sum(1).pow(2))


def soft_ce(z_nat: Tensor, z_adv: Tensor) -> Tensor:
    """Per-sample soft-label cross-entropy −Σ_j S(p(z_n)_j)·log p(z_a)_j."""
    return -(F.softmax(z_nat.detach(), dim=1) * F.log_softmax(z_adv, dim=1)).sum(1)


def dkl_per_sample(
    z_nat: Tensor, z_adv: Tensor, s: Tensor | None = None, alpha: float = 1.0, beta: float = 1.0,
    stop_grad: bool = True,
) -> Tensor:
    """β·wMSE + α·SCE per sample: a drop-in replacement of ``kl_per_sample(z_nat, z_adv)``.

    Args:
        z_nat: (B, C) clean logits.
        z_adv: (B, C) adversarial logits.
        s: (B, C) weight vectors; None: the per-sample S(softmax(z_nat)) of Theorem 1.
        alpha: α, weight of the soft-label cross-entropy.
        beta: β, weight of wMSE.
        stop_grad: DKL's stop-gradient on the adversarial side of wMSE (False: IKL).

    With ``s=None``, ``stop_grad=True`` and α = β = 1 its gradient equals that of
    KL(p(z_nat) ‖ p(z_adv)) with respect to both logits.
    """
    if s is None:
        s = F.softmax(z_nat.detach(), dim=1)
    wmse = weighted_mse(z_nat, z_adv.detach() if stop_grad else z_adv, s.detach())
    return beta * wmse + alpha * soft_ce(z_nat, z_adv)


class DKLAttack(TradesKL):
    """The official inner maximisation: PGD on SCE + β_attack·wMSE from x + 0.001·N(0, I).

    With β_attack = 0 this is the TRADES KL attack (same gradient with respect to x')."""

    weight_fn: Callable[[Tensor, Tensor], Tensor]
    wmse_weight: float = 1.0

    def init_ctx(self, model, x, y):  # type: ignore[override]
        ctx = super().init_ctx(model, x, y)
        ctx["s"] = self.weight_fn(ctx["nat"], y)
        return ctx

    def loss(self, model, x_adv, y, ctx):  # type: ignore[override]
        z_adv = model(x_adv)
        wmse = weighted_mse(ctx["nat"], z_adv, ctx["s"])
        return soft_ce(ctx["nat"], z_adv) + self.wmse_weight * wmse


class DKLParams(ObjectiveParams):
    alpha: float = Field(4.0, ge=0.0, description="α, weight of the soft-label cross-entropy")
    beta: float = Field(20.0, ge=0.0, description="β, weight of wMSE")
    temperature: float = Field(4.0, gt=0.0, description="T of the class-wise weights")
    weights: Literal["classwise", "sample"] = Field(
        "sample", description="classwise: s_y from the previous epoch; sample: S(p(z_n))"
    )
    stop_grad: bool = Field(True, description="stop wMSE's gradient into the adversarial logits")
    attack_beta: float = Field(
        0.0, ge=0.0, description="weight of wMSE in the attack (0: the KL attack, as on CIFAR-10)"
    )
    start: Start = Field("normal", description=START_HELP)


class IKLParams(DKLParams):
    weights: Literal["classwise", "sample"] = Field(
        "classwise", description="classwise: s_y from the previous epoch; sample: S(p(z_n))"
    )
    stop_grad: bool = Field(False, description="stop wMSE's gradient into the adversarial logits")


@OBJECTIVES.register("dkl")
class DKL(Objective):
    """DKL (arXiv:2305.13948): CE(f(x), y) + β·wMSE + α·SCE, the decoupled form of TRADES' KL.

    Defaults are the paper's DKL (per-sample weights, stop-gradient), which with α = β equals
    TRADES with that β in gradient. ``weights: classwise`` uses the class-wise weights s_y,
    accumulated from the clean logits of the training batches (``softmax(z_n / T)``) and rolled
    over at each epoch start; they are buffers, so checkpoints hold them.
    """

    Params = DKLParams

    def __init__(self, params: DKLParams, ctx: BuildContext) -> None:  # type: ignore[override]
        super().__init__(params, ctx)
        c = ctx.num_classes
        self.register_buffer("class_weights", torch.full((c, c), 1.0 / c))
        self.register_buffer("accum", torch.zeros(c, c))
        self.register_buffer("current_epoch", torch.zeros((), dtype=torch.long))
        self.attack = self._make_attack(ctx)

    def _make_attack(self, ctx: BuildContext) -> Any:
        if ctx.steps <= 0:
            return None
        if self.params.attack_beta == 0:
            return trades_attack(ctx, start=self.params.start)
        atk = DKLAttack(steps=ctx.steps, norm=ctx.norm, clip=ctx.bounded,
                        **start_params(self.params.start, ctx.eps))
        atk.weight_fn = self.sample_weights
        atk.wmse_weight = self.params.attack_beta
        return atk

    def sample_weights(self, z_nat: Tensor, y: Tensor) -> Tensor:
        """s for each sample (B, C): the class-wise row s_y, or the per-sample S(p(z_n))."""
        if self.params.weights == "classwise":
            return self.class_weights[y].to(z_nat.dtype)
        return F.softmax(z_nat.detach(), dim=1)

    @torch.no_grad()
    def _accumulate(self, z_nat: Tensor, y: Tensor) -> None:
        dtype = self.accum.dtype  # float32, or float64 after objective.double()
        onehot = F.one_hot(y, self.accum.shape[0]).to(dtype)
        self.accum += onehot.T @ F.softmax(z_nat.detach().to(dtype) / self.temperature, dim=1)

    @torch.no_grad()
    def on_epoch_start(self, epoch: int) -> None:
        """Turn the finished epoch's sums into the class-wise weights (once per epoch).

        Called again for the same epoch (a run resumed mid-epoch) it does nothing. Classes
        that no batch of the finished epoch contained keep their previous weights. Under
        torchrun each process sums its share of the batches; the sums are added up over
        processes first, so every process gets the weights of the global batches."""
        if int(self.current_epoch) == epoch:
            return
        if int(self.current_epoch) > 0:
            from ..engine.distributed import all_reduce_sum

            all_reduce_sum(self.accum)
            total = self.accum.sum(1, keepdim=True)
            seen = total.squeeze(1) > 0
            self.class_weights[seen] = self.accum[seen] / total[seen]
        self.accum.zero_()
        self.current_epoch.fill_(epoch)

    def process_sums(self) -> list[Tensor]:
        return [self.accum]

    def forward(  # type: ignore[override]
        self, model: nn.Module, x: Tensor, y: Tensor, eps: Tensor, step_size: Tensor
    ) -> ObjectiveOutput:
        x_adv = self.attack(model, x, y, eps, step_size) if self.attack is not None else x
        z_adv = model(x_adv)
        z_nat = model(x)
        if self.training and self.params.weights == "classwise":
            self._accumulate(z_nat, y)
        s = self.sample_weights(z_nat, y)
        z_a = z_adv.detach() if self.params.stop_grad else z_adv
        terms = {
            "natural": F.cross_entropy(z_nat, y, reduction="none"),
            "wmse": self.beta * weighted_mse(z_nat, z_a, s.detach()),
            "sce": self.alpha * soft_ce(z_nat, z_adv),
        }
        return ObjectiveOutput(terms, z_nat, z_adv, x_adv)


@OBJECTIVES.register("ikl")
class IKL(DKL):
    """IKL (arXiv:2305.13948): DKL with class-wise weights and no stop-gradient in wMSE.

    This is the loss the official adversarial-training code trains (its ``dkl_loss``): the
    weights s_y are the class means of softmax(z_n / T) over the previous epoch (uniform 1/C in
    the first), and wMSE's gradient reaches both the clean and the adversarial logits.
    """

    Params = IKLParams
