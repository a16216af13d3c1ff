"""Objectives: what loss, given clean ``x``, its adversarial ``x_adv`` and labels.

An objective runs its own inner maximisation (the attack that belongs to it) with the ε and step
size the engine gives it, and returns per-sample loss *terms* (e.g. ``natural`` and ``robust``)
so that policies can weight terms separately (DAFA weights TRADES' natural term only)."""

from __future__ import annotations

from ..registry import Registry

OBJECTIVES: Registry = Registry("objective", package="robustfair.objectives")

from .base import BuildContext, Objective, ObjectiveOutput  # noqa: E402

__all__ = ["OBJECTIVES", "BuildContext", "Objective", "ObjectiveOutput"]
