"""ResNet-18 (CIFAR variant: 3×3 stride-1 stem) and PreAct ResNet-18.

He et al., "Deep Residual Learning", arXiv:1512.03385; "Identity Mappings", arXiv:1603.05027.
Global average pooling adapts to any input size (32, 64, 96 px)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from . import MODELS


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class PreActBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(x))
        sc = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + sc


class ResNet(nn.Module):
    cam_layer = "layer4"

    def __init__(
        self, block: type[nn.Module], num_blocks: list[int], in_channels: int, num_classes: int,
        width: int = 64, preact: bool = False,
    ) -> None:
        super().__init__()
        self.preact = preact
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width) if not preact else nn.Identity()
        cin = width
        layers = []
        for i, n in enumerate(num_blocks):
            cout = width * 2**i
            blocks = []
            for j in range(n):
                blocks.append(block(cin, cout, (1 if i == 0 else 2) if j == 0 else 1))
                cin = cout
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.bn_final = nn.BatchNorm2d(cin) if preact else nn.Identity()
        self.linear = nn.Linear(cin, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv1(x)
        if not self.preact:
            out = F.relu(self.bn1(out))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        if self.preact:
            out = F.relu(self.bn_final(out))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


@MODELS.register("resnet18")
def resnet18(in_channels: int, num_classes: int, image_size: int, width: int = 64) -> ResNet:
    """ResNet-18, CIFAR variant (3×3 stride-1 stem, no max-pool), as in the DAFA and PART code."""
    return ResNet(BasicBlock, [2, 2, 2, 2], in_channels, num_classes, width)


@MODELS.register("preact_resnet18")
def preact_resnet18(
    in_channels: int, num_classes: int, image_size: int, width: int = 64
) -> ResNet:
    """PreAct ResNet-18 (CIFAR variant), as used by FRL and CFA."""
    return ResNet(PreActBlock, [2, 2, 2, 2], in_channels, num_classes, width, preact=True)
