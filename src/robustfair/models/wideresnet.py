"""Wide ResNets (Zagoruyko & Komodakis, arXiv:1605.07146) as in the TRADES code:
WRN-28-10 and WRN-34-10, dropout 0."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from . import MODELS


class WideBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, drop: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.drop = drop
        self.equal = cin == cout
        self.shortcut = None if self.equal else nn.Conv2d(cin, cout, 1, stride, 0, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        o = F.relu(self.bn1(x))
        y = self.conv1(o)
        y = F.relu(self.bn2(y))
        if self.drop > 0:
            y = F.dropout(y, p=self.drop, training=self.training)
        y = self.conv2(y)
        return y + (x if self.equal else self.shortcut(o))  # type: ignore[misc]


class WideResNet(nn.Module):
    cam_layer = "block3"

    def __init__(self, depth: int, widen: int, in_channels: int, num_classes: int,
                 drop: float = 0.0) -> None:
        super().__init__()
        if (depth - 4) % 6:
            raise TypeError("depth must be 6n+4")
        n = (depth - 4) // 6
        ch = [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv1 = nn.Conv2d(in_channels, ch[0], 3, 1, 1, bias=False)

        def stage(cin: int, cout: int, stride: int) -> nn.Sequential:
            return nn.Sequential(
                *[WideBlock(cin if i == 0 else cout, cout, stride if i == 0 else 1, drop)
                  for i in range(n)]
            )

        self.block1 = stage(ch[0], ch[1], 1)
        self.block2 = stage(ch[1], ch[2], 2)
        self.block3 = stage(ch[2], ch[3], 2)
        self.bn = nn.BatchNorm2d(ch[3])
        self.fc = nn.Linear(ch[3], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = F.relu(self.bn(out))
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


@MODELS.register("wrn28_10")
def wrn28_10(in_channels: int, num_classes: int, image_size: int, widen: int = 10,
             drop: float = 0.0) -> WideResNet:
    """Wide ResNet 28-10 (TRADES version)."""
    return WideResNet(28, widen, in_channels, num_classes, drop)


@MODELS.register("wrn34_10")
def wrn34_10(in_channels: int, num_classes: int, image_size: int, widen: int = 10,
             drop: float = 0.0) -> WideResNet:
    """Wide ResNet 34-10 (TRADES version), the robust model of LBGAT and PART."""
    return WideResNet(34, widen, in_channels, num_classes, drop)
