"""Learning-rate schedules, as a function of the epoch (1-based)."""

from __future__ import annotations

import math
from typing import Any


def lr_at(cfg: Any, base_lr: float, epoch: int, epochs: int) -> float:
    """The learning rate for ``epoch`` (1..epochs) under a :class:`ScheduleConfig`."""
    name = cfg.name
    if name == "constant":
        return base_lr
    if name == "multistep":
        k = sum(epoch > m for m in cfg.milestones)
        return base_lr * cfg.gamma**k
    if name == "cosine":
        return 0.5 * base_lr * (1 + math.cos(math.pi * (epoch - 1) / max(epochs, 1)))
    if name == "piecewise":
        # the DAFA code's bag-of-tricks schedule: 110 epochs → ×0.1 after 99, ×0.01 after 104
        m1 = cfg.milestones[0] if len(cfg.milestones) > 0 else round(epochs * 100 / 110) - 1
        m2 = cfg.milestones[1] if len(cfg.milestones) > 1 else round(epochs * 105 / 110) - 1
        if epoch <= m1:
            return base_lr
        return base_lr * (cfg.gamma if epoch <= m2 else cfg.gamma**2)
    if name == "lbgat":
        if epoch == 1:
            return base_lr * cfg.first_epoch_factor
        k = sum(epoch > m for m in cfg.milestones)
        return base_lr * cfg.gamma**k
    raise ValueError(f"unknown schedule {name!r}")
