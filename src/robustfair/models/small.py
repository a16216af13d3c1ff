"""Small models: linear, MLP, and the 4-conv MNIST CNN of TRADES."""

from __future__ import annotations

from torch import Tensor, nn

from . import MODELS


@MODELS.register("linear")
class Linear(nn.Module):
    """A linear classifier on the flattened image."""

    def __init__(self, in_channels: int, num_classes: int, image_size: int, bias: bool = True):
        super().__init__()
        self.fc = nn.Linear(in_channels * image_size * image_size, num_classes, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(x.flatten(1))


@MODELS.register("mlp")
class MLP(nn.Module):
    """A multi-layer perceptron on the flattened image (hidden: list of widths, default [200])."""

    def __init__(
        self, in_channels: int, num_classes: int, image_size: int, hidden: list[int] | None = None
    ):
        super().__init__()
        hidden = [200] if hidden is None else list(hidden)
        dims = [in_channels * image_size * image_size, *hidden]
        layers: list[nn.Module] = []
        for a, b in zip(dims[:-1], dims[1:], strict=True):
            layers += [nn.Linear(a, b), nn.ReLU()]
        layers.append(nn.Linear(dims[-1], num_classes))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x.flatten(1))


@MODELS.register("smallcnn")
class SmallCNN(nn.Module):
    """The 4-conv MNIST CNN of TRADES (32-32-pool-64-64-pool, fc 200-200); padded for tiny
    inputs (< 20 px) so that it also runs on 8×8 digits. ``width`` scales the channels."""

    cam_layer = "features.6"

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        image_size: int,
        width: float = 1.0,
        dropout: float = 0.5,
    ):
        super().__init__()
        c1, c2, f = max(1, int(32 * width)), max(1, int(64 * width)), max(1, int(200 * width))
        pad = 0 if image_size >= 20 else 1
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c1, 3, padding=pad), nn.ReLU(),
            nn.Conv2d(c1, c1, 3, padding=pad), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=pad), nn.ReLU(),
            nn.Conv2d(c2, c2, 3, padding=pad), nn.ReLU(),
            nn.MaxPool2d(2),
        )
        s = image_size
        for _ in range(2):
            s = (s - 4 * (1 - pad)) // 2 if pad == 0 else s // 2
        side = max(1, s)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(c2 * side * side, f), nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(f, f), nn.ReLU(),
            nn.Linear(f, num_classes),
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                nn.init.zeros_(m.bias)
        nn.init.zeros_(self.classifier[-1].weight)
        nn.init.zeros_(self.classifier[-1].bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))
