"""DAFA: Distance-Aware Fair Adversarial Training (Lee et al., ICLR 2024, arXiv:2401.12532).

After a warm-up of τ epochs of the base method, DAFA measures how similar the classes are under
attack and gives every class y a weight W_y that scales both its adversarial margin (ε_y = W_y·ε,
step α_y = W_y·α) and its loss weight. The weights move robustness between *similar* classes:
a hard class takes weight from the easier classes it is confused with, and the weights sum to C.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import torch
from pydantic import Field
from torch import Tensor

from ..objectives.base import ObjectiveOutput
from . import POLICIES
from ._classwise import num_epochs, per_sample
from .base import EpochContext, Policy, PolicyParams

log = logging.getLogger("robustfair")


def dafa_weights(similarity: Tensor, lam: float) -> Tensor:
    """DAFA's class weights from the class-similarity matrix (the paper's Algorithm 2, DAFA_comp).

    ``similarity[i, j]`` = p_i(j), the mean probability of class j over the adversarial examples
    of class i. Starting from W = 1, for every ordered pair i ≠ j:

    - if p_i(i) < p_j(j) (class i is harder): W_i ← W_i + λ·p_i(j)·p_j(j);
    - if p_i(i) > p_j(j): W_i ← W_i − λ·p_j(i)·p_i(i).

    Each pair moves the same amount from the easier class to the harder one, so Σ_c W_c = C.
    Exact ties move nothing (the paper skips them).

    Args:
        similarity: (C, C) matrix, rows are true classes.
        lam: λ, the step of the transfer (1.0 on CIFAR-10, 1.5 on CIFAR-100 and STL-10).

    Returns:
        (C,) weights, float64.
    """
    p = similarity.double()
    d = p.diagonal()
    harder = d[:, None] < d[None, :]  # [i, j]: class i is harder than class j
    easier = d[:, None] > d[None, :]
    moved = lam * p * d[None, :]  # moved[i, j] = λ·p_i(j)·p_j(j): from j to i when i is harder
    return 1.0 + (moved * harder).sum(1) - (moved.T * easier).sum(1)


@POLICIES.register("dafa")
class DAFA(Policy):
    """DAFA (arXiv:2401.12532): class-wise ε, step and loss weight from class similarity.

    Epochs 1..τ train the base objective unchanged; during epoch τ the policy stores the softmax
    of the adversarial logits of every training batch (``out.logits_adv``) and, at its end,
    computes the similarity matrix p_i(j) and the weights W with :func:`dafa_weights`. From
    epoch τ+1 the weights are frozen and used: sample i is attacked within radius W_{y_i}·ε with
    step W_{y_i}·α, and W_{y_i} multiplies its loss — on TRADES the clean cross-entropy only
    (term ``natural``), otherwise (PGD-AT) the whole loss. The paper's radius W·ε is used on
    PGD-AT too (the official code's second step with radius ε is not reproduced).

    The weights and the similarity matrix are checkpointed, so a resumed run keeps them (the
    official code does not save them). Weights can become ≤ 0 for a very easy class when λ is
    large; ``min_weight`` clamps them (off by default, as in the paper). A class with W ≤ 0 keeps
    its loss weight W but is attacked within radius max(W, 0)·ε, i.e. not at all: a radius
    cannot be negative. The official code applies the negative radius W·ε, which makes the box
    degenerate (its projection sends every image to x + W·ε, clamped to [0, 1], whatever the
    gradient); ``negative_radius: official`` reproduces that.
    """

    class Params(PolicyParams):
        warmup: int | None = Field(
            None, ge=1, description="τ, epochs of the base method; None: round(0.64·epochs)"
        )
        lam: float = Field(1.0, ge=0.0, description="λ (1.0 CIFAR-10, 1.5 CIFAR-100/STL-10)")
        min_weight: float | None = Field(
            None, description="clamp W ≥ min_weight (off: the paper's rule)"
        )
        weighted_terms: list[str] | None = Field(
            None, description="terms W multiplies; None: 'natural' if present, else all"
        )
        negative_radius: Literal["zero", "official"] = Field(
            "zero", description="attack radius of a class with W < 0: zero (max(W, 0)·ε) or "
            "official (W·ε: the official code's degenerate box, x_adv = x + W·ε)"
        )

    needs = frozenset({"train_batches"})

    def __init__(self, params: Params, ctx: Any = None) -> None:
        super().__init__(params, ctx)
        self.num_classes = int(ctx.num_classes) if ctx is not None else 10
        epochs = num_epochs(ctx, 110)
        self.tau = params.warmup if params.warmup is not None else max(1, round(0.64 * epochs))
        c = self.num_classes
        self.weights = torch.ones(c, dtype=torch.float64)
        self.active = False
        self.similarity: Tensor | None = None
        self._prob_sum = torch.zeros(c, c, dtype=torch.float64)
        self._count = torch.zeros(c, dtype=torch.float64)
        self._epoch = 0

    # ------------------------------------------------------------------ per step
    def eps_scale(self, y: Tensor) -> Tensor | None:
        if not self.active:
            return None
        w = self.weights if self.params.negative_radius == "official" else self.weights.clamp_min(0)
        return per_sample(w, y).float()

    def combine(self, out: ObjectiveOutput, y: Tensor) -> Tensor:
        if not self.active:
            return out.total()
        w = per_sample(self.weights, y).to(next(iter(out.terms.values())).dtype)
        names = self.params.weighted_terms
        if names is None:
            names = ["natural"] if "natural" in out.terms else list(out.terms)
        return torch.stack([t * w if k in names else t for k, t in out.terms.items()]).sum(0)

    def on_epoch_start(self, epoch: int) -> None:
        if self._epoch == 0 and not self.active and self.tau >= num_epochs(self.ctx, 110):
            log.warning("warning: DAFA's warm-up (τ = %d epochs) is not shorter than the run "
                        "(%d epochs): the class weights are never used and this run trains "
                        "the base objective only; set method.policy.warmup below train.epochs",
                        self.tau, num_epochs(self.ctx, 110))
        self._epoch = epoch

    def observe(self, x: Tensor, y: Tensor, out: ObjectiveOutput, index: Tensor) -> None:
        if self._epoch != self.tau or self.active or out.logits_adv is None:
            return
        with torch.no_grad():
            prob = torch.softmax(out.logits_adv.detach().float(), dim=1).double().cpu()
            yc = y.detach().cpu()
            self._prob_sum.index_add_(0, yc, prob)
            self._count += torch.bincount(yc, minlength=self.num_classes).double()

    def process_sums(self) -> list[Tensor]:
        return [] if self.active else [self._prob_sum, self._count]

    # ------------------------------------------------------------------ epoch end
    def on_epoch_end(self, ctx: EpochContext) -> None:
        if ctx.epoch != self.tau or self.active:
            return
        from ..engine.distributed import all_reduce_sum

        all_reduce_sum(self._prob_sum)  # under torchrun: the statistics of the global batches
        all_reduce_sum(self._count)
        seen = self._count > 0
        if not bool(seen.any()):
            log.warning("DAFA: no adversarial logits were seen in epoch %d (the objective "
                        "returns none); all class weights stay 1", ctx.epoch)
        sim = torch.eye(self.num_classes, dtype=torch.float64)
        sim[seen] = self._prob_sum[seen] / self._count[seen, None]
        self.similarity = sim
        w = dafa_weights(sim, self.params.lam)
        if self.params.min_weight is not None:
            w = w.clamp_min(self.params.min_weight)
        elif bool((w <= 0).any()):
            log.warning("DAFA: classes %s got a weight ≤ 0 (λ = %s): they are not attacked "
                        "and their loss weight is ≤ 0; set method.policy.min_weight to clamp",
                        torch.nonzero(w <= 0).flatten().tolist(), self.params.lam)
        self.weights = w
        self.active = True

    def log(self) -> dict[str, Any]:
        out: dict[str, Any] = {"active": self.active, "warmup": self.tau}
        if self.active:
            out["weights"] = [round(float(v), 5) for v in self.weights]
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"weights": self.weights.clone(), "active": self.active, "tau": self.tau,
                "similarity": None if self.similarity is None else self.similarity.clone(),
                "prob_sum": self._prob_sum.clone(), "count": self._count.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        self.weights = state["weights"].double().cpu()
        self.active = bool(state["active"])
        self.tau = int(state["tau"])
        sim = state.get("similarity")
        self.similarity = None if sim is None else sim.double().cpu()
        self._prob_sum = state["prob_sum"].double().cpu()
        self._count = state["count"].double().cpu()
