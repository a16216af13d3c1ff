"""Models by name. Inputs are images in [0, 1]; normalization is a layer inside the model
(the RobustBench convention), so every attack works in pixel space."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..errors import UserError
from ..registry import Registry

MODELS: Registry = Registry("model", package="robustfair.models")

from .normalize import Classifier, Normalize  # noqa: E402


def build_model(
    name: str,
    in_channels: int,
    num_classes: int,
    image_size: int,
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
    **params: Any,
) -> Classifier:
    """Build a registered network wrapped with its input normalization."""
    factory = MODELS.get(name)
    try:
        net: nn.Module = factory(
            in_channels=in_channels, num_classes=num_classes, image_size=image_size, **params
        )
    except TypeError as exc:
        raise UserError(f"model.params for '{name}': {exc}") from None
    mean = mean if mean is not None else (0.0,) * in_channels
    std = std if std is not None else (1.0,) * in_channels
    return Classifier(net, mean, std)


__all__ = ["MODELS", "Classifier", "Normalize", "build_model"]
