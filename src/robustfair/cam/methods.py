"""The three CAM weightings that PART offers, as defined in torchcam (the library PART calls).

Each takes the hooked activations ``A`` and the gradients ``G = ∂s_c/∂A`` of the class score,
both (B, K, h, w), and returns the map ReLU(Σ_k w_k ⊙ A_k) of shape (B, h, w), not normalised.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import CAMS


@CAMS.register("gradcam")
def gradcam(activations: Tensor, grads: Tensor) -> Tensor:
    """Grad-CAM (Selvaraju et al., arXiv:1610.02391): w_k = mean_ij G_k(i, j).

    Args:
        activations: A, (B, K, h, w).
        grads: G = ∂s_c/∂A, (B, K, h, w).

    Returns:
        L = ReLU(Σ_k w_k A_k), (B, h, w).
    """
    w = grads.mean(dim=(2, 3), keepdim=True)
    return torch.relu((w * activations).sum(1))


@CAMS.register("xgradcam")
def xgradcam(activations: Tensor, grads: Tensor, eps: float = 1e-8) -> Tensor:
    """XGrad-CAM (Fu et al., arXiv:2008.02312): w_k = Σ_ij G_k A_k / (Σ_ij A_k + 1e-8).

    Args:
        activations: A, (B, K, h, w).
        grads: G = ∂s_c/∂A, (B, K, h, w).
        eps: added to the denominator, as torchcam does.

    Returns:
        L = ReLU(Σ_k w_k A_k), (B, h, w).
    """
    w = (grads * activations).sum(dim=(2, 3), keepdim=True) / (
        activations.sum(dim=(2, 3), keepdim=True) + eps
    )
    return torch.relu((w * activations).sum(1))


@CAMS.register("layercam")
def layercam(activations: Tensor, grads: Tensor) -> Tensor:
    """Layer-CAM (Jiang et al., IEEE TIP 2021): per-position weights ReLU(G_k(i, j)).

    Args:
        activations: A, (B, K, h, w).
        grads: G = ∂s_c/∂A, (B, K, h, w).

    Returns:
        L = ReLU(Σ_k ReLU(G_k) ⊙ A_k), (B, h, w).
    """
    return torch.relu((torch.relu(grads) * activations).sum(1))
