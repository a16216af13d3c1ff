"""Budget base class and the uniform and class-wise budgets."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import Tensor, nn

from ..units import parse_eps
from . import BUDGETS


class BudgetParams(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Budget:
    """Base: one ε for every sample."""

    Params: ClassVar[type[BaseModel]] = BudgetParams

    def __init__(self, params: BaseModel, ctx: Any = None) -> None:
        self.params = params
        self.ctx = ctx
        for k, v in params.model_dump().items():
            setattr(self, k, v)

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor, eps: float) -> Tensor:
        return torch.full((x.shape[0],) + (1,) * (x.dim() - 1), float(eps), device=x.device,
                          dtype=x.dtype)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def on_epoch_start(self, epoch: int, model: nn.Module) -> None:
        pass


@BUDGETS.register("uniform")
class Uniform(Budget):
    """One ε for every sample and pixel (attack.eps)."""


@BUDGETS.register("classwise")
class Classwise(Budget):
    """A fixed ε per class: ``scale`` multiplies attack.eps per class, or ``eps`` gives it."""

    class Params(BudgetParams):
        scale: list[float] | None = Field(None, description="per-class multipliers of attack.eps")
        eps: list[float] | None = Field(None, description="per-class absolute ε")

        @field_validator("eps", mode="before")
        @classmethod
        def _fractions(cls, v: Any) -> Any:
            return [parse_eps(e) for e in v] if isinstance(v, list) else v

    def __init__(self, params, ctx=None):  # type: ignore[no-untyped-def]
        super().__init__(params, ctx)
        n = ctx.num_classes if ctx is not None else None
        for key in ("scale", "eps"):
            v = getattr(params, key)
            if v is not None and n is not None and len(v) != n:
                from ..errors import UserError

                raise UserError(f"method.budget.{key}: needs {n} values (one per class), "
                                f"got {len(v)}")

    def __call__(self, model, x, y, eps):  # type: ignore[override]
        if self.eps is not None:
            table = torch.tensor(self.eps, device=x.device, dtype=x.dtype)
        else:
            s = self.scale if self.scale is not None else [1.0] * (int(y.max()) + 1)
            table = torch.tensor(s, device=x.device, dtype=x.dtype) * float(eps)
        return table[y].view((-1,) + (1,) * (x.dim() - 1))
