"""The PART pixel budget: a per-element ε map from a class activation map.

PART (Zhang, Liu, Zhou, Zhang, Liu, "Improving Accuracy-robustness Trade-off via Pixel
Reweighted Adversarial Training", ICML 2024, arXiv:2406.00685) keeps the full ε on the pixels
that matter to the classifier (by CAM) and the smaller ε_low elsewhere:
ε_map = ε_low + (ε − ε_low)·w, with w from :mod:`robustfair.cam.pixel_weights`.
It starts after a warm-up of the plain method (``warmup`` epochs with the uniform ε).

Where the mask comes from (``mask_source``):

- ``current`` (default, the paper's method): the CAM of the very batch being attacked, computed
  in eval mode after augmentation, in one batched forward and backward pass.
- ``stale`` (the official code's behaviour, to reproduce its numbers): the official code stores
  one mask per batch *position* from a separate shuffled, augmented pass over the training set
  and applies it to whatever batch comes at that position, so every image gets the mask of a
  random other image. Here each batch gets the masks of the next images of an independent
  shuffled pass of the same epoch (seeded by run seed and epoch, augmented independently). The
  CAM is taken with the current weights rather than those of the start of the epoch; that keeps
  the state to two integers and a resumed run exact.

The attack's start follows the official code: PART (objective ``pgd_at``, ``start: auto``) takes
its first gradient at x + U(−ε, ε) with the scalar ε, neither clamped to [0, 1] nor confined to
the ε_low entries of the map, which only the first projection brings back; PART-T and PART-M
(``trades``, ``mart``) start at the raw x + 0.001·N(0, I). A difference from the official code that
does not change the method: a constant CAM (all zero) gives full ε to that image instead of
NaN → ε_low.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field, field_validator
from torch import Tensor, nn

from ..cam import CAMOutput, class_activation_maps
from ..cam.pixel_weights import Upsampler, jet_lut, pixel_weights
from ..data import augment_batch
from ..errors import UserError
from ..units import parse_eps
from . import BUDGETS
from .base import Budget, BudgetParams


class PixelParams(BudgetParams):
    """Parameters of the ``pixel`` budget (defaults: the official PART code)."""

    eps_low: float = Field(7 / 255, ge=0.0, description="ε_low, the budget of unimportant "
                           "pixels (accepts 7/255)")
    mask: Literal["jet", "threshold", "continuous"] = Field(
        "jet", description="jet: the official per-channel jet z-score mask; threshold: ε where "
        "the CAM > threshold; continuous: ε_low + (ε − ε_low)·CAM")
    threshold: float = Field(0.5, ge=0.0, le=1.0, description="τ of the threshold mask")
    cam: Literal["gradcam", "xgradcam", "layercam"] = "gradcam"
    layer: str | None = Field(None, description="module to hook (None: the model's last "
                              "convolutional stage, e.g. net.layer4)")
    warmup: int = Field(0, ge=0, description="epochs of uniform ε before PART starts")
    mask_source: Literal["current", "stale"] = Field(
        "current", description="current: CAM of the attacked batch; stale: CAM of other images "
        "of the same epoch (the official code's behaviour)")
    grey: Literal["mean", "any"] = Field(
        "mean", description="jet mask on non-RGB images: mean or any of the 3 channel masks")

    _eps = field_validator("eps_low", mode="before")(lambda cls, v: parse_eps(v))


@BUDGETS.register("pixel")
class Pixel(Budget):
    """PART's per-pixel ε map from a class activation map (Zhang et al., ICML 2024).

    Full ε where the CAM marks a pixel as important, ε_low elsewhere; uniform ε during the first
    ``warmup`` epochs. See :mod:`robustfair.budgets.pixel` for the mask modes and sources.

    Example:
        ``method.budget: {name: pixel, eps_low: 7/255, cam: gradcam, mask: jet, warmup: 20}``
    """

    Params = PixelParams

    def __init__(self, params: PixelParams, ctx: Any = None) -> None:
        super().__init__(params, ctx)
        if ctx is not None:
            if getattr(ctx, "norm", "linf") != "linf":
                raise UserError("method.budget: the pixel budget needs attack.norm=linf (an l2 "
                                "ball has no per-pixel radius); use budget uniform for l2")
            if self.eps_low > float(ctx.eps) + 1e-12:
                raise UserError(f"method.budget.eps_low={self.eps_low:.5f} exceeds attack.eps="
                                f"{float(ctx.eps):.5f}; ε_low must be at most ε")
        self.seed = int(ctx.extra.get("seed", 0)) if ctx is not None else 0
        self.epoch = 0
        self.offset = 0
        self._upsample = Upsampler()
        self._lut = jet_lut()
        self._perm: tuple[int, Tensor] | None = None
        self.last_full_fraction: float | None = None

    # ------------------------------------------------------------------ schedule and state
    @property
    def active(self) -> bool:
        """True once the warm-up is over (epochs are numbered from 1)."""
        return self.epoch > self.warmup

    def on_epoch_start(self, epoch: int, model: nn.Module) -> None:
        """Start ``epoch``; a resumed epoch keeps its position in the stale-mask pass."""
        if epoch != self.epoch:
            self.epoch = int(epoch)
            self.offset = 0

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "offset": self.offset}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state.get("epoch", 0))
        self.offset = int(state.get("offset", 0))

    # ------------------------------------------------------------------ the ε map
    def __call__(self, model: nn.Module, x: Tensor, y: Tensor, eps: float) -> Tensor:
        """ε for every element of ``x``: (B, C, H, W) once active, (B, 1, 1, 1) before."""
        if not self.active:
            return super().__call__(model, x, y, eps)
        source = x if self.mask_source == "current" else self._stale_images(x)
        w = self.weights(model, source)
        self.last_full_fraction = float((w >= 1).float().mean())
        lo = torch.full_like(x, self.eps_low)
        hi = torch.full_like(x, float(eps))
        return torch.lerp(lo, hi, w.to(x.dtype))

    def weights(self, model: nn.Module, x: Tensor) -> Tensor:
        """Weights w ∈ [0, 1] of shape x.shape: 1 keeps ε, 0 gives ε_low."""
        return self.cam_weights(model, x)[2]

    def cam_weights(self, model: nn.Module, x: Tensor) -> tuple[CAMOutput, Tensor, Tensor]:
        """The CAMs of ``x``, upsampled to (B, H, W), and the weights w (B, C, H, W).

        A constant CAM (no information) gives w = 1, the uniform ε, for that image."""
        out = class_activation_maps(model, x, self.cam, self.layer)
        u = self._upsample(out.cam, (x.shape[-2], x.shape[-1]))
        w = pixel_weights(u, x.shape[1], self.mask, self.threshold, self.grey, self._lut)
        if bool(out.flat.any()):
            w = torch.where(out.flat.view(-1, 1, 1, 1), torch.ones_like(w), w)
        return out, u, w

    def eps_map(self, model: nn.Module, x: Tensor, eps: float) -> Tensor:
        """The ε map of ``x`` itself (whatever the mask source and the warm-up); for analysis."""
        w = self.weights(model, x)
        return torch.lerp(torch.full_like(x, self.eps_low), torch.full_like(x, float(eps)),
                          w.to(x.dtype))

    # ------------------------------------------------------------------ stale masks
    def _stale_images(self, x: Tensor) -> Tensor:
        """The next ``len(x)`` images of this epoch's independent shuffled, augmented pass."""
        data = self.ctx.extra.get("data") if self.ctx is not None else None
        if data is None:
            raise UserError("method.budget.mask_source=stale needs the training data; it is "
                            "only available inside a training run (use mask_source: current)")
        train = data.train
        n = len(train)
        if self._perm is None or self._perm[0] != self.epoch:
            g = torch.Generator().manual_seed(self._stream_seed(0))
            self._perm = (self.epoch, torch.randperm(n, generator=g))
        perm = self._perm[1]
        pos = (self.offset + torch.arange(len(x))) % n
        g = torch.Generator().manual_seed(self._stream_seed(self.offset + 1))
        self.offset += len(x)
        imgs = train.images(perm[pos]).to(x.device, x.dtype)
        return augment_batch(imgs, data.augment, g)

    def _stream_seed(self, k: int) -> int:
        return (self.seed * 1_000_003 + self.epoch * 7_919 + k * 104_729 + 77) % (2**63 - 1)
