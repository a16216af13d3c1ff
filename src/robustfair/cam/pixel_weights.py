"""From a class activation map to per-element weights w ∈ [0, 1] of the PART ε map.

The ε map is ε_map = ε_low + (ε − ε_low)·w (PART, Zhang et al., ICML 2024, arXiv:2406.00685).
Three ways to get w from a normalised CAM L of shape (B, h, w), all batched:

- ``jet`` — the official formula (``utils.py: process_overlay``, ``generate_weighted_eps``):
  U = bicubic upsample of L to H×W (Pillow's filter, reproduced exactly here), V = U², RGB =
  jet colormap of V (matplotlib's 256-entry LUT), Z = (RGB − mean) / std with one mean and one
  std (ddof 0) over all H·W·3 entries of the image, and w = 1 where Z > 1, else 0 — per colour
  channel. This selects the blue channel for moderate CAM values and the red channel for high
  ones: a colormap artefact, kept because it is what the published numbers used.
- ``threshold`` — w = 1 where U > τ, the same for every channel.
- ``continuous`` — w = clamp(U, 0, 1), the same for every channel.

Images that are not RGB (one grey channel) have no per-colour mask: ``grey="mean"`` gives each
pixel the mean of its three jet-channel weights (the same average budget as an RGB image with
that CAM), ``grey="any"`` gives full ε where any of the three channels would.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

# matplotlib's ``_jet_data``: (x, y0, y1) breakpoints of each channel, piecewise linear.
_JET_SEGMENTS = {
    "red": ((0.0, 0.0, 0.0), (0.35, 0.0, 0.0), (0.66, 1.0, 1.0), (0.89, 1.0, 1.0),
            (1.0, 0.5, 0.5)),
    "green": ((0.0, 0.0, 0.0), (0.125, 0.0, 0.0), (0.375, 1.0, 1.0), (0.64, 1.0, 1.0),
              (0.91, 0.0, 0.0), (1.0, 0.0, 0.0)),
    "blue": ((0.0, 0.5, 0.5), (0.11, 1.0, 1.0), (0.34, 1.0, 1.0), (0.65, 0.0, 0.0),
             (1.0, 0.0, 0.0)),
}
JET_N = 256


def jet_lut(n: int = JET_N) -> Tensor:
    """The jet colormap as an (n, 3) float64 lookup table (matplotlib's ``colormaps['jet']``).

    Entry i is the colour at i/(n−1); a value v maps to entry clamp(floor(v·n), 0, n−1).
    """
    xs = np.linspace(0.0, 1.0, n)
    cols = []
    for ch in ("red", "green", "blue"):
        seg = np.asarray(_JET_SEGMENTS[ch])
        cols.append(np.interp(xs, seg[:, 0], seg[:, 1]))
    return torch.from_numpy(np.stack(cols, axis=1))


def jet(v: Tensor, lut: Tensor | None = None) -> Tensor:
    """Jet colours of the values ``v`` (any shape) → shape ``v.shape + (3,)``, float64.

    Values below 0 take the first colour and above 1 the last, as matplotlib does.
    """
    lut = jet_lut() if lut is None else lut
    n = lut.shape[0]
    idx = torch.floor(v.float() * n).clamp(0, n - 1).long()
    return lut.to(v.device)[idx]


def _pil_bicubic(t: float, a: float = -0.5) -> float:
    t = abs(t)
    if t < 1.0:
        return ((a + 2.0) * t - (a + 3.0)) * t * t + 1.0
    if t < 2.0:
        return (((t - 5.0) * t + 8.0) * t - 4.0) * a
    return 0.0


def pil_bicubic_matrix(in_size: int, out_size: int) -> Tensor:
    """The (out_size, in_size) matrix of Pillow's bicubic resampling along one axis.

    Pillow (``Resample.c: precompute_coeffs``) uses the cubic kernel with a = −0.5, support
    2·max(1, scale), a window clipped to the image and weights normalised to sum 1; resizing an
    image is this matrix applied to the rows and then to the columns.
    """
    scale = in_size / out_size
    fscale = max(scale, 1.0)
    support = 2.0 * fscale
    m = torch.zeros(out_size, in_size, dtype=torch.float64)
    for xx in range(out_size):
        center = (xx + 0.5) * scale
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), in_size)
        w = [_pil_bicubic((x - center + 0.5) / fscale) for x in range(lo, hi)]
        total = math.fsum(w)
        for k, x in enumerate(range(lo, hi)):
            m[xx, x] = w[k] / total if total != 0.0 else w[k]
    return m


class Upsampler:
    """Pillow-exact bicubic upsampling of (B, h, w) maps to (H, W), batched (matrices cached)."""

    def __init__(self) -> None:
        self._mats: dict[tuple[int, int, str], Tensor] = {}

    def _mat(self, n_in: int, n_out: int, device: torch.device) -> Tensor:
        key = (n_in, n_out, str(device))
        if key not in self._mats:
            self._mats[key] = pil_bicubic_matrix(n_in, n_out).to(device)
        return self._mats[key]

    def __call__(self, cam: Tensor, size: tuple[int, int]) -> Tensor:
        """Return the upsampled maps (B, H, W) in float32 (values may overshoot [0, 1])."""
        h, w = cam.shape[-2:]
        rows = self._mat(h, size[0], cam.device)
        cols = self._mat(w, size[1], cam.device)
        out = rows @ cam.double() @ cols.T
        return out.float()


def jet_channel_weights(u: Tensor, z_threshold: float = 1.0, lut: Tensor | None = None
                        ) -> Tensor:
    """The official PART mask: 1 where the z-scored jet colour of U² exceeds ``z_threshold``.

    Args:
        u: upsampled CAMs (B, H, W), float32.
        z_threshold: 1 in the official code (``torch.where(weight_matrix > 1, eps, low_eps)``).
        lut: jet lookup table (default :func:`jet_lut`).

    Returns:
        (B, 3, H, W) float weights in {0, 1}, channels R, G, B.
    """
    rgb = jet(u * u, lut).permute(0, 3, 1, 2)  # (B, 3, H, W) float64
    flat = rgb.flatten(1)
    mean = flat.mean(1).view(-1, 1, 1, 1)
    std = flat.std(1, unbiased=False).view(-1, 1, 1, 1)
    z = torch.where(std > 0, (rgb - mean) / std.clamp_min(1e-300), torch.zeros_like(rgb))
    return (z > z_threshold).to(u.dtype)


def pixel_weights(
    u: Tensor,
    channels: int,
    mode: str = "jet",
    threshold: float = 0.5,
    grey: str = "mean",
    lut: Tensor | None = None,
) -> Tensor:
    """Weights w (B, C, H, W) in [0, 1] from upsampled CAMs ``u`` (B, H, W).

    Args:
        u: upsampled normalised CAMs.
        channels: C, the image's channel count.
        mode: ``jet`` (official, per colour channel), ``threshold`` or ``continuous``.
        threshold: τ of the ``threshold`` mode.
        grey: for ``jet`` on images that are not RGB: ``mean`` or ``any`` of the three
            channel weights.
        lut: jet lookup table.
    """
    b, h, w = u.shape
    if mode == "jet":
        wts = jet_channel_weights(u, lut=lut)
        if channels == 3:
            return wts
        pooled = wts.mean(1, keepdim=True) if grey == "mean" else wts.amax(1, keepdim=True)
        return pooled.expand(b, channels, h, w)
    if mode == "threshold":
        wts = (u > threshold).to(u.dtype)
    elif mode == "continuous":
        wts = u.clamp(0.0, 1.0)
    else:
        raise ValueError(f"unknown mask mode {mode!r}")
    return wts[:, None].expand(b, channels, h, w)
