"""Batched class activation maps: hook, one forward, one ``autograd.grad``, weighting.

Reference: PART (Zhang et al., "Improving Accuracy-robustness Trade-off via Pixel Reweighted
Adversarial Training", ICML 2024, arXiv:2406.00685) computes a CAM per image with torchcam, for
the *predicted* class, in eval mode. Here the whole batch is done at once: in eval mode the
samples are independent, so the gradient of Σ_i s_{i, c_i} with respect to the activations is,
image by image, the gradient of that image's own score.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..attacks.base import eval_mode
from ..errors import UserError
from . import CAMS


@dataclass
class CAMOutput:
    """Maps of a batch.

    Attributes:
        cam: (B, h, w) maps, min-max normalised to [0, 1] per image when ``normalize`` was set.
        logits: (B, num_classes) logits of the clean forward pass.
        class_idx: (B,) the class each map explains.
        flat: (B,) True where a map is constant (e.g. all zero): it carries no information and
            is returned as zeros after normalisation.
        layer: the name of the hooked module.
    """

    cam: Tensor
    logits: Tensor
    class_idx: Tensor
    flat: Tensor
    layer: str


def resolve_layer(model: nn.Module, layer: str | None = None) -> tuple[str, nn.Module]:
    """Find the module to hook.

    Args:
        model: the classifier (a :class:`~robustfair.models.Classifier` or any module).
        layer: a dotted module name; ``None`` takes ``model.feature_layer_name()``. A name of
            the inner network (``layer4``) is also found inside a Classifier (``net.layer4``).

    Returns:
        The full name and the module.

    Raises:
        UserError: the model has no such layer (or no default one).
    """
    if layer is None:
        getter = getattr(model, "feature_layer_name", None)
        layer = getter() if callable(getter) else None
        if layer is None:
            raise UserError(f"model {type(model).__name__} has no convolutional feature layer "
                            f"for a class activation map; name one with method.budget.layer")
    for name in (layer, f"net.{layer}"):
        try:
            return name, model.get_submodule(name)
        except AttributeError:
            continue
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)][-3:]
    raise UserError(f"CAM layer {layer!r} is not a module of the model; use a module name such "
                    f"as {', '.join(convs) or 'net.layer4'}")


@contextlib.contextmanager
def capture_output(module: nn.Module) -> Iterator[dict[str, Tensor]]:
    """Keep the output of ``module`` during the forward pass; the hook is always removed.

    The module's output tensor is stored and a clone is passed on, so that an in-place operation
    further down the network cannot change the stored activations or their gradient.
    """
    store: dict[str, Tensor] = {}

    def hook(_m: nn.Module, _inp: tuple, out: object) -> Tensor:
        if not isinstance(out, Tensor):
            raise UserError(f"the CAM layer returns {type(out).__name__}, not a tensor; choose "
                            f"a convolutional stage")
        store["activations"] = out
        return out.clone()

    handle = module.register_forward_hook(hook)
    try:
        yield store
    finally:
        handle.remove()


def normalize_maps(cam: Tensor) -> tuple[Tensor, Tensor]:
    """Min-max normalise each (h, w) map to [0, 1], as torchcam does.

    torchcam divides by max(L − min L) without a guard, so a constant map becomes NaN; here a
    constant map becomes zeros and is flagged.

    Returns:
        The normalised maps and a (B,) boolean "map is constant".
    """
    flat = cam.flatten(1)
    lo = flat.min(1).values.view(-1, 1, 1)
    shifted = cam - lo
    hi = shifted.flatten(1).max(1).values.view(-1, 1, 1)
    is_flat = hi.view(-1) <= 0
    out = torch.where(hi > 0, shifted / hi.clamp_min(torch.finfo(cam.dtype).tiny),
                      torch.zeros_like(cam))
    return out, is_flat


def class_activation_maps(
    model: nn.Module,
    x: Tensor,
    method: str = "gradcam",
    layer: str | None = None,
    class_idx: Tensor | int | None = None,
    normalize: bool = True,
) -> CAMOutput:
    """Class activation maps of a batch in one forward and one backward pass.

    The model is put in eval mode (and its modes restored afterwards); only the hooked
    activations receive a gradient (``torch.autograd.grad``), so no parameter's ``.grad`` is
    written and BatchNorm statistics do not move.

    Args:
        model: the classifier; inputs in [0, 1].
        x: (B, C, H, W) images.
        method: ``gradcam``, ``xgradcam`` or ``layercam`` (see :data:`~robustfair.cam.CAMS`).
        layer: module to hook; ``None`` for the model's last convolutional stage.
        class_idx: class to explain, per image (B,) or one int; ``None``: the predicted class
            (as PART does).
        normalize: min-max normalise each map to [0, 1].

    Returns:
        A :class:`CAMOutput` with maps at the layer's resolution (h, w).

    Example:
        >>> out = class_activation_maps(model, x, "gradcam")   # doctest: +SKIP
        >>> out.cam.shape                                      # (B, h, w)
    """
    weigh = CAMS.get(method)
    name, module = resolve_layer(model, layer)
    x_in = x.detach().clone().requires_grad_(True)  # keeps every layer connected to the graph
    with eval_mode(model), torch.enable_grad(), capture_output(module) as store:
        logits = model(x_in)
        if "activations" not in store:
            raise UserError(f"CAM layer {name!r} was not used in the forward pass; choose "
                            f"another layer")
        acts = store["activations"]
        if acts.dim() != 4:
            raise UserError(f"CAM layer {name!r} gives a tensor of shape {tuple(acts.shape)}, "
                            f"not (B, K, h, w); choose a convolutional stage")
        if class_idx is None:
            c = logits.argmax(1)
        else:
            c = torch.as_tensor(class_idx, device=logits.device).long().expand(len(x))
        score = logits.gather(1, c.view(-1, 1)).sum()
        (grads,) = torch.autograd.grad(score, [acts])
    cam = weigh(acts.detach(), grads.detach())
    if normalize:
        cam, is_flat = normalize_maps(cam)
    else:
        is_flat = cam.flatten(1).amax(1) == cam.flatten(1).amin(1)
    return CAMOutput(cam, logits.detach(), c.detach(), is_flat, name)
