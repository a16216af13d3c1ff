"""The normalization layer and the classifier wrapper that owns it."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class Normalize(nn.Module):
    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std


class Classifier(nn.Module):
    """``net(normalize(x))``: takes images in [0, 1], returns logits."""

    def __init__(self, net: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        return self.net(self.normalize(x))

    def feature_layer_name(self) -> str | None:
        """Name of the last convolutional stage (for class activation maps), if any."""
        name = getattr(self.net, "cam_layer", None)
        return f"net.{name}" if name else None
