"""Budgets: how large may the perturbation be, per sample and per pixel.

``budget(model, x, y, eps) -> Tensor`` broadcastable to ``x`` (per-sample (B,1,1,1) or per
element (B,C,H,W)), where ``eps`` is the configured ``attack.eps``."""

from __future__ import annotations

from ..registry import Registry

BUDGETS: Registry = Registry("budget", package="robustfair.budgets")

from .base import Budget  # noqa: E402

__all__ = ["BUDGETS", "Budget"]
