"""The objective interface and the build context shared by every method part."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor, nn


class ObjectiveParams(BaseModel):
    model_config = ConfigDict(extra="forbid")


@dataclass
class BuildContext:
    """What a method part may need to know when it is built."""

    num_classes: int
    in_channels: int
    image_size: int
    norm: str = "linf"
    eps: float = 8 / 255
    step_size: float = 2 / 255
    steps: int = 10
    num_groups: int = 0
    train_size: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    build_model: Callable[..., nn.Module] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    bounded: bool = True  # inputs in [0, 1]: attacks clip to that box


@dataclass
class ObjectiveOutput:
    """Per-sample loss terms (each (B,)), and the logits the objective computed."""

    terms: dict[str, Tensor]
    logits_clean: Tensor | None = None
    logits_adv: Tensor | None = None
    x_adv: Tensor | None = None

    def total(self) -> Tensor:
        return torch.stack(list(self.terms.values())).sum(0)


class Objective(nn.Module):
    """Base class: ``objective(model, x, y, eps, step_size) -> ObjectiveOutput``.

    ``eps`` and ``step_size`` are tensors broadcastable to ``x`` (per sample or per element).
    An objective may own trainable modules (LBGAT's natural model): they are optimised, saved
    and restored with the model.
    """

    Params: ClassVar[type[BaseModel]] = ObjectiveParams
    uses_attack: ClassVar[bool] = True

    def __init__(self, params: BaseModel, ctx: BuildContext) -> None:
        super().__init__()
        self.params = params
        self.ctx = ctx
        for k, v in params.model_dump().items():
            if not hasattr(nn.Module, k):
                setattr(self, k, v)

    def forward(  # type: ignore[override]
        self, model: nn.Module, x: Tensor, y: Tensor, eps: Tensor, step_size: Tensor
    ) -> ObjectiveOutput:
        raise NotImplementedError  # abstract

    def eval_model(self, model: nn.Module) -> nn.Module:
        """The model that evaluation should use (the robust one)."""
        return model

    def on_epoch_start(self, epoch: int) -> None:
        """Called by the engine before each epoch (1-based), also when a run resumes mid-epoch.

        An objective that keeps statistics across epochs (DKL's class-wise weights) rolls them
        over here; it should keep them in buffers so that checkpoints hold them."""

    def process_sums(self) -> list[Tensor]:
        """Tensors that hold this process's part of sums over training batches (under torchrun
        the parts add up to the sum over the global batches; see
        :func:`~robustfair.engine.distributed.gather_into_first`): before a checkpoint the
        engine moves the whole sums into the first process, and on resume the other processes
        start their parts from zero."""
        return []
