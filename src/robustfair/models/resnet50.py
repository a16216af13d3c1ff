"""ResNet-50 from torchvision with its ``fc`` replaced for the task (He et al., "Deep Residual
Learning for Image Recognition", CVPR 2016), the model of Dr-Fairness's CelebA setting.

An ImageNet-pretrained start needs a weights file: nothing is downloaded. ``weights`` is the path
of a torchvision ResNet-50 state dict (e.g. ``resnet50-0676ba61.pth`` or ``resnet50-11ad3fa6.pth``
from torchvision's model hub); every layer but ``fc`` is loaded from it. ``resize`` resizes the
inputs inside the model (bilinear), e.g. 56 px CelebA crops to 224 as the paper's transform
does.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import UserError
from . import MODELS


class ResNet50(nn.Module):
    """torchvision's ResNet-50 with ``fc = Linear(2048, num_classes)``."""

    cam_layer = "body.layer4"

    def __init__(self, in_channels: int, num_classes: int, image_size: int,
                 weights: str | None = None, resize: int | None = None) -> None:
        super().__init__()
        from torchvision.models import resnet50

        body = resnet50(weights=None)
        if in_channels != 3:
            if weights is not None:
                raise UserError(f"model.params.weights: ImageNet weights need 3-channel inputs; "
                                f"the data has {in_channels}")
            body.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
        if weights is not None:
            load_backbone(body, weights)
        body.fc = nn.Linear(body.fc.in_features, num_classes)
        self.body = body
        self.resize = resize

    def forward(self, x: Tensor) -> Tensor:
        if self.resize is not None and x.shape[-1] != self.resize:
            x = F.interpolate(x, size=(self.resize, self.resize), mode="bilinear",
                              align_corners=False)
        return self.body(x)


def load_backbone(body: nn.Module, path: str) -> None:
    """Load a torchvision ResNet-50 state dict (all but ``fc``) from ``path``."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise UserError(f"model.params.weights {path!r} not found; give the path of a "
                        f"torchvision ResNet-50 state dict (nothing is downloaded)")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the user's to fix
        raise UserError(f"model.params.weights {path!r} cannot be read ({exc})") from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    state = {k.removeprefix("module."): v for k, v in state.items() if not
             k.removeprefix("module.").startswith("fc.")}
    missing, unexpected = body.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("fc.")]
    if missing or unexpected:
        raise UserError(f"model.params.weights {path!r} is not a ResNet-50 state dict (missing "
                        f"{missing[:2]}, unexpected {list(unexpected)[:2]})")


@MODELS.register("resnet50")
def resnet50(in_channels: int, num_classes: int, image_size: int, weights: str | None = None,
             resize: int | None = None) -> nn.Module:
    """torchvision ResNet-50, fc replaced; ImageNet start from a local weights file."""
    return ResNet50(in_channels, num_classes, image_size, weights, resize)
