"""Class activation maps (GradCAM, XGradCAM, LayerCAM), batched.

``class_activation_maps(model, x, method="gradcam")`` computes, for a whole batch in one forward
and one backward pass, the map of the predicted class on a named layer (default: the model's last
convolutional stage, :meth:`~robustfair.models.Classifier.feature_layer_name`). The gradient is
taken with :func:`torch.autograd.grad` on the hooked activations only, so the parameters'
``.grad`` are never touched, and the hook is always removed.

Methods are registered by name in :data:`CAMS`::

    CAMS.names()      # ['gradcam', 'layercam', 'xgradcam']
"""

from __future__ import annotations

from ..registry import Registry

CAMS: Registry = Registry("CAM method", package="robustfair.cam")

from .core import CAMOutput, class_activation_maps, resolve_layer  # noqa: E402

__all__ = ["CAMS", "CAMOutput", "class_activation_maps", "resolve_layer"]
