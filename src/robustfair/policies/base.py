"""The policy interface and the ``none`` policy."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor, nn

from ..objectives.base import ObjectiveOutput
from . import POLICIES


class PolicyParams(BaseModel):
    model_config = ConfigDict(extra="forbid")


@dataclass
class EpochContext:
    """What the engine offers a policy or sampler at the end of an epoch.

    ``evaluate(attack)`` runs that attack (a spec such as ``pgd20``, or a built
    :class:`~robustfair.attacks.Attack`) on the validation split and returns an
    :class:`~robustfair.engine.evaluator.EvalResult` (cached per attack within the epoch)."""

    epoch: int
    epochs: int
    model: nn.Module
    num_classes: int
    device: torch.device
    evaluate: Callable[[Any], Any] | None = None
    train_stats: dict[str, Tensor] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


class Policy:
    """Base policy: uniform ε scale and weights; sums the objective's terms."""

    Params: ClassVar[type[BaseModel]] = PolicyParams
    #: statistics the policy needs: "train_batches" (observe is called) and/or "validation"
    needs: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, params: BaseModel, ctx: Any = None) -> None:
        self.params = params
        self.ctx = ctx
        for k, v in params.model_dump().items():
            setattr(self, k, v)

    # --- used in every training step
    def eps_scale(self, y: Tensor) -> Tensor | None:
        """Per-sample multiplier of ε and, unless :meth:`attack_step` says otherwise, of the
        attack step (None: 1)."""
        return None

    def attack_step(self, step: Tensor, scale: Tensor, eps: Tensor) -> Tensor:
        """The attack step when :meth:`eps_scale` gave ``scale``: by default scaled the same way.

        Args:
            step: the configured step per sample, (B, 1, …).
            scale: the ε multiplier, shaped like ``step``.
            eps: the scaled ε.
        """
        return step * scale

    def combine(self, out: ObjectiveOutput, y: Tensor) -> Tensor:
        """Per-sample loss from the objective's terms."""
        return out.total()

    def observe(self, x: Tensor, y: Tensor, out: ObjectiveOutput, index: Tensor) -> None:
        """See a training batch (only called when ``"train_batches" in needs``)."""

    def process_sums(self) -> list[Tensor]:
        """Tensors that hold this process's part of sums over training batches, as
        :meth:`Objective.process_sums <robustfair.objectives.base.Objective.process_sums>`."""
        return []

    # --- epoch boundaries
    def on_epoch_start(self, epoch: int) -> None:
        pass

    def on_epoch_end(self, ctx: EpochContext) -> None:
        pass

    def log(self) -> dict[str, Any]:
        """Figures for log.jsonl (e.g. the current per-class weights)."""
        return {}

    def eval_state(self) -> dict[str, Tensor] | None:
        """Model weights the final evaluation should use instead of the trained ones (e.g.
        CFA's fairness-aware weight average); None: the trained model."""
        return None

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


@POLICIES.register("none")
class NoPolicy(Policy):
    """No adaptive policy."""
