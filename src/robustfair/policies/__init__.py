"""Policies: adaptive methods that own per-class ε and/or loss weights and update them from the
statistics the engine measures (on training batches, or on the validation split)."""

from __future__ import annotations

from ..registry import Registry

POLICIES: Registry = Registry("policy", package="robustfair.policies")

from .base import EpochContext, Policy  # noqa: E402

__all__ = ["POLICIES", "EpochContext", "Policy"]
