"""Weights: how much each sample's loss counts (static; adaptive weights live in policies)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from ..errors import UserError
from ..registry import Registry

WEIGHTS: Registry = Registry("weights")


class WeightsParams(BaseModel):
    model_config = ConfigDict(extra="forbid")


@WEIGHTS.register("uniform")
class UniformWeights:
    """Every sample counts the same."""

    Params: ClassVar[type[BaseModel]] = WeightsParams

    def __init__(self, params: BaseModel, ctx: Any = None) -> None:
        self.params = params

    def __call__(self, y: Tensor) -> Tensor:
        return torch.ones(y.shape[0], device=y.device)


@WEIGHTS.register("classwise")
class ClasswiseWeights(UniformWeights):
    """A fixed weight per class (``values``), or inverse class frequency (``inverse_frequency``)."""

    class Params(WeightsParams):
        values: list[float] | None = None
        inverse_frequency: bool = False
        counts: list[int] | None = Field(None, description="filled in from the training set")

    def __init__(self, params, ctx=None):  # type: ignore[no-untyped-def]
        super().__init__(params, ctx)
        n = ctx.num_classes if ctx is not None else None
        if params.values is not None:
            if n is not None and len(params.values) != n:
                raise UserError(f"method.weights.values: needs {n} values, got "
                                f"{len(params.values)}")
            self.table = torch.tensor(params.values, dtype=torch.float32)
        elif params.inverse_frequency and ctx is not None and "class_counts" in ctx.extra:
            c = torch.as_tensor(ctx.extra["class_counts"], dtype=torch.float32).clamp_min(1)
            w = 1.0 / c
            self.table = w / w.mean()
        else:
            self.table = torch.ones(n or 1)

    def __call__(self, y):  # type: ignore[override]
        return self.table.to(y.device)[y]
