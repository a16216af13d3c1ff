"""Sampler base class, and the uniform and class-balanced samplers."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from . import SAMPLERS


class SamplerParams(BaseModel):
    model_config = ConfigDict(extra="forbid")


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch * 7919 + 17)


class Sampler:
    """Base: every training sample once per epoch, shuffled; the last batch may be smaller."""

    Params: ClassVar[type[BaseModel]] = SamplerParams

    def __init__(self, params: BaseModel, data: Any, batch_size: int, seed: int,
                 ctx: Any = None) -> None:
        self.params = params
        self.data = data
        self.batch_size = batch_size
        self.seed = seed
        self.ctx = ctx
        for k, v in params.model_dump().items():
            setattr(self, k, v)

    def epoch_batches(self, epoch: int) -> list[Tensor]:
        g = epoch_generator(self.seed, epoch)
        perm = torch.randperm(len(self.data), generator=g)
        return list(perm.split(self.batch_size))

    def on_epoch_start(self, epoch: int, model: nn.Module) -> None:
        """Called before the first step of every epoch, after :meth:`epoch_batches` (also when
        a run resumes mid-epoch); adaptive samplers may update here, before the batches they
        shape are drawn."""

    def on_step(self, step: int, model: nn.Module) -> None:
        """Called after every optimizer step (adaptive samplers may update here)."""

    def on_epoch_end(self, ctx: Any) -> None:
        pass

    def log(self) -> dict[str, Any]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


@SAMPLERS.register("uniform")
class UniformSampler(Sampler):
    """Each training sample once per epoch, in a seeded random order."""


@SAMPLERS.register("balanced")
class BalancedSampler(Sampler):
    """Class-balanced batches: each class drawn equally often (with replacement), same epoch size."""

    class Params(SamplerParams):
        by: str = Field("label", pattern="^(label|group|label_group)$")

    def _keys(self) -> Tensor:
        y = self.data.y
        if self.by == "label" or self.data.group is None:
            return y
        if self.by == "group":
            return self.data.group
        return y * (int(self.data.group.max()) + 1) + self.data.group

    def epoch_batches(self, epoch):  # type: ignore[override]
        g = epoch_generator(self.seed, epoch)
        keys = self._keys()
        classes = keys.unique()
        n = len(keys)
        which = classes[torch.randint(len(classes), (n,), generator=g)]
        idx = torch.empty(n, dtype=torch.long)
        for c in classes:
            pool = torch.nonzero(keys == c).flatten()
            m = which == c
            idx[m] = pool[torch.randint(len(pool), (int(m.sum()),), generator=g)]
        return list(idx.split(self.batch_size))
