"""VGG with batch normalization for small images (the CIFAR variant: 3×3 convolutions, a single
linear classifier on the 512 pooled features), as used by AT-on-AD (Hu et al., ICML 2023) for
its CIFAR-10 binary task.

Simonyan & Zisserman, "Very Deep Convolutional Networks for Large-Scale Image Recognition",
arXiv:1409.1556; Ioffe & Szegedy, batch normalization, arXiv:1502.03167.
"""

from __future__ import annotations

from torch import Tensor, nn

from . import MODELS

#: channel plans ('M' = 2×2 max pooling)
VGG_PLANS: dict[str, list[int | str]] = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg13": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
              512, 512, 512, "M"],
}


class VGGBN(nn.Module):
    """VGG with conv–BN–ReLU blocks and one linear classifier.

    On 32×32 inputs the five poolings leave 1×1×512 features, so the network equals the CIFAR
    VGG of the AT-on-AD code. A pooling is skipped when the feature map is already 1 pixel wide
    (28×28 MNIST, 8×8 digits), and a global average pool makes any remaining map 1×1.
    ``width`` scales every channel count (for quick CPU tests).
    """

    def __init__(self, plan: list[int | str], in_channels: int, num_classes: int,
                 image_size: int, width: float = 1.0) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c, side = in_channels, image_size
        for item in plan:
            if item == "M":
                if side >= 2:
                    layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
                    side //= 2
                continue
            out = max(1, int(round(int(item) * width)))
            layers += [nn.Conv2d(c, out, 3, padding=1), nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
            c = out
            last_relu = len(layers) - 1
        self.features = nn.Sequential(*layers)
        self.cam_layer = f"features.{last_relu}"  # the last conv stage, for class activation maps
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.pool(self.features(x)).flatten(1))


def _factory(plan: str, doc: str):  # noqa: ANN202 - returns a registered factory
    def build(in_channels: int, num_classes: int, image_size: int, width: float = 1.0) -> VGGBN:
        return VGGBN(VGG_PLANS[plan], in_channels, num_classes, image_size, width)

    build.__doc__ = doc
    return build


MODELS.register("vgg11_bn")(_factory(
    "vgg11", "VGG11 with batch normalization (8 conv layers, linear head; width: channel scale)."))
MODELS.register("vgg13_bn")(_factory(
    "vgg13", "VGG13 with batch normalization (10 conv layers, linear head; width: channel scale)."))
MODELS.register("vgg16_bn")(_factory(
    "vgg16", "VGG16 with batch normalization (13 conv layers, linear head; width: channel scale)."))
