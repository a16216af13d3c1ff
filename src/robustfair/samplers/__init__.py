"""Samplers: which samples form a batch. ``sampler.epoch_batches(epoch)`` returns the epoch's
list of index tensors; adaptive samplers update from an :class:`EpochContext` or every k steps."""

from __future__ import annotations

from ..registry import Registry

SAMPLERS: Registry = Registry("sampler", package="robustfair.samplers")

from .base import Sampler  # noqa: E402

__all__ = ["SAMPLERS", "Sampler"]
