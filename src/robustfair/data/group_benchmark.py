"""Offline group-fairness benchmarks built from embedded or synthetic data (no download).

- ``mnist5k-groups``: the embedded MNIST subset with a visual group attribute (inverted,
  thickened or red-tinted digits) that is unevenly represented within the labels: in the
  training and validation splits each label has a majority group (label index even: group 0,
  odd: group 1) and a minority group of share ``minority``; the test split has share
  ``test_minority`` (0.5: balanced), so per-group and worst-group accuracy are measured on equal
  footing. Optional generated data per (label, group) cell, from a folder that
  ``robustfair generate`` wrote or fitted in memory (``generated: auto``), with a generated
  validation hold-out as in Dr-Fairness.
- ``fairbatch-synthetic``: FairBatch's synthetic setting (Roh et al., ICLR 2021), built like
  Zafar et al. (AISTATS 2017): two Gaussian classes, x|y=1 ~ N([2, 2], [[5, 1], [1, 5]]),
  x|y=0 ~ N([−2, −2], [[10, 1], [1, 3]]), and a group z drawn with probability
  p(x'|y=1)/(p(x'|y=1)+p(x'|y=0)) of the features rotated by π/4; the features are (x1, x2, z)
  stored as a 3×1×1 "image" (for the ``linear`` model = logistic regression). FairBatch's own
  files are not shipped; this is the same construction, so figures are comparable in kind.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import Tensor

from ..errors import UserError
from ..registry import format_validation_error
from . import DATASETS
from .core import SPLIT_SEED, ArrayData, DataBundle
from .generated import holdout_indices, load_group_folders

LABELS = {"large": ["small", "large"], "odd": ["even", "odd"],
          "digit": [str(i) for i in range(10)]}
GROUPS = {"invert": ["plain", "inverted"], "thick": ["thin", "thick"], "tint": ["white", "red"]}


class GroupBenchmarkParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    label: Literal["large", "odd", "digit"] = "large"
    group: Literal["invert", "thick", "tint"] = "invert"
    minority: float = Field(0.1, gt=0.0, le=0.5, description="minority share in train/val")
    test_minority: float = Field(0.5, gt=0.0, le=0.5, description="minority share in test")
    generated: str | None = Field(None, description="folder from 'robustfair generate', or auto")
    quality: float = Field(1.0, ge=0.0, le=1.0, description="generator quality (auto)")
    per_cell: int = Field(400, ge=2, description="generated images per (label, group) (auto)")
    gen_val: float = Field(0.2, ge=0.0, description="generated hold-out: fraction or count")


def _params(model: type[BaseModel], cfg: Any) -> Any:
    try:
        return model(**(cfg.params or {}))
    except ValidationError as exc:
        raise UserError(format_validation_error(exc, "data.params")) from None


def _labels(digits: Tensor, label: str) -> Tensor:
    if label == "large":
        return (digits >= 5).long()
    if label == "odd":
        return (digits % 2).long()
    return digits.long()


def assign_groups(y: Tensor, minority: float, seed: int) -> Tensor:
    """Group of each sample: the label's majority group (y mod 2) except with probability
    ``minority``."""
    g = torch.Generator().manual_seed(seed)
    flip = torch.rand(len(y), generator=g) < minority
    return torch.where(flip, 1 - y % 2, y % 2)


def apply_group_look(x: Tensor, z: Tensor, group: str) -> Tensor:
    """Render group 1 visibly: inverted, thickened (3×3 dilation) or red-tinted digits."""
    if group == "tint":
        x3 = x.expand(-1, 3, -1, -1).clone()
        red = z == 1
        x3[red, 1:] = (x3[red, 1:].float() * 0.3).round().to(torch.uint8)
        return x3
    out = x.clone()
    m = z == 1
    if group == "invert":
        out[m] = 255 - out[m]
    else:
        out[m] = F.max_pool2d(out[m].float(), 3, stride=1, padding=1).to(torch.uint8)
    return out


def holdout_by_cell(data: ArrayData, size: float, num_groups: int, seed: int = SPLIT_SEED
                    ) -> tuple[ArrayData, ArrayData]:
    """Hold out ``size`` (fraction < 1 or count) of the data, stratified by (label, group)."""
    n = len(data)
    n_hold = int(round(size * n)) if size < 1 else int(size)
    if n_hold >= n:
        raise UserError(f"data.val_size={size} leaves no training images; use a smaller value")
    g = torch.Generator().manual_seed(seed + 3)
    key = data.y * num_groups + data.group
    hold = []
    for c in key.unique().tolist():
        idx = torch.nonzero(key == c).flatten()
        k = int(round(len(idx) * n_hold / n))
        hold.append(idx[torch.randperm(len(idx), generator=g)[:k]])
    mask = torch.zeros(n, dtype=torch.bool)
    if hold:
        mask[torch.cat(hold)] = True
    return data.subset(torch.nonzero(~mask).flatten()), data.subset(torch.nonzero(mask).flatten())


def _stats(x: Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    f = x.float().div(255)
    mean = f.mean((0, 2, 3))
    std = f.std((0, 2, 3)).clamp_min(1e-3)
    return tuple(round(float(v), 4) for v in mean), tuple(round(float(v), 4) for v in std)


def _generated(p: GroupBenchmarkParams, real: ArrayData, c_names: list[str],
               g_names: list[str]) -> ArrayData:
    if p.generated == "auto":
        from ..generate import generated_for

        return generated_for(real, len(c_names), len(g_names), p.per_cell, p.quality)
    gen = load_group_folders(p.generated, c_names, g_names, int(real.x.shape[1]))  # type: ignore
    if tuple(gen.x.shape[1:]) != tuple(real.x.shape[1:]):
        raise UserError(f"generated images are {tuple(gen.x.shape[1:])} but the data is "
                        f"{tuple(real.x.shape[1:])}; generate them for this dataset's settings")
    return gen


@DATASETS.register("mnist5k-groups")
def mnist5k_groups(cfg: Any) -> DataBundle:
    """The embedded MNIST subset with a visual group (inverted / thick / tinted digits) unevenly
    represented within labels, optional generated data per (label, group): offline group
    fairness."""
    p = _params(GroupBenchmarkParams, cfg)
    base = DATASETS.get("mnist5k")(cfg)
    c_names, g_names = LABELS[p.label], GROUPS[p.group]

    def build(d: ArrayData, minority: float, salt: int) -> ArrayData:
        y = _labels(d.y, p.label)
        z = assign_groups(y, minority, SPLIT_SEED + salt)
        return ArrayData(apply_group_look(d.x, z, p.group), y, z,
                         torch.zeros(len(y), dtype=torch.long))

    train = build(base.train, p.minority, 1)
    test = build(base.test, p.test_minority, 2)
    train, val = holdout_by_cell(train, cfg.val_size, len(g_names))
    extra: dict[str, Any] = {"minority": p.minority, "group_look": p.group}
    if p.generated:
        gen = _generated(p, train, c_names, g_names)
        tr_idx, va_idx = holdout_indices(len(gen), p.gen_val, seed=0)
        train = train.concat(gen.subset(tr_idx))
        extra["gen_val"] = gen.subset(va_idx)
        extra["generated"] = {"source": p.generated, "quality": p.quality,
                              "train": len(tr_idx), "val": len(va_idx)}
    mean, std = _stats(train.x[train.source == 0])
    return DataBundle("mnist5k-groups", train, val, test, len(c_names), mean, std, "none",
                      list(c_names), list(g_names), extra)


class SyntheticParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    n_train: int = Field(2000, ge=10)
    n_val: int = Field(200, ge=0)
    n_test: int = Field(1000, ge=10)
    rotation: float = Field(math.pi / 4, description="φ of the rotated features that set z")
    z_feature: bool = Field(True, description="give z to the model as a third feature")
    seed: int = Field(0, ge=0)


def _gauss_pdf(x: np.ndarray, mu: np.ndarray, cov: np.ndarray) -> np.ndarray:
    d = x - mu
    inv = np.linalg.inv(cov)
    return np.exp(-0.5 * np.einsum("ni,ij,nj->n", d, inv, d)) / (
        2 * math.pi * math.sqrt(np.linalg.det(cov)))


def zafar_synthetic(n: int, rotation: float, seed: int) -> tuple[np.ndarray, ...]:
    """(x (n, 2), y ∈ {0, 1}, z ∈ {0, 1}) as in Zafar et al. (2017), y=1 ↔ their +1."""
    rng = np.random.RandomState(seed)
    mu1, cov1 = np.array([2.0, 2.0]), np.array([[5.0, 1.0], [1.0, 5.0]])
    mu0, cov0 = np.array([-2.0, -2.0]), np.array([[10.0, 1.0], [1.0, 3.0]])
    n1 = n // 2
    x = np.concatenate([rng.multivariate_normal(mu1, cov1, n1),
                        rng.multivariate_normal(mu0, cov0, n - n1)])
    y = np.concatenate([np.ones(n1, np.int64), np.zeros(n - n1, np.int64)])
    perm = rng.permutation(n)
    x, y = x[perm], y[perm]
    c, s = math.cos(rotation), math.sin(rotation)
    x_rot = x @ np.array([[c, -s], [s, c]])
    p1, p0 = _gauss_pdf(x_rot, mu1, cov1), _gauss_pdf(x_rot, mu0, cov0)
    z = (rng.uniform(size=n) < p1 / (p1 + p0)).astype(np.int64)
    return x, y, z


@DATASETS.register("fairbatch-synthetic")
def fairbatch_synthetic(cfg: Any) -> DataBundle:
    """FairBatch's synthetic setting: two Gaussian classes and a correlated binary group
    (Zafar et al. 2017 construction), features (x1, x2, z) as 3×1×1 inputs."""
    p = _params(SyntheticParams, cfg)
    n = p.n_train + p.n_val + p.n_test
    x, y, z = zafar_synthetic(n, p.rotation, p.seed)
    feats = np.concatenate([x, z[:, None].astype(np.float64)], 1) if p.z_feature else x
    xt = torch.from_numpy(feats).float()[:, :, None, None]
    full = ArrayData(xt, torch.from_numpy(y), torch.from_numpy(z))
    parts = np.split(np.arange(n), [p.n_train, p.n_train + p.n_val])
    train, val, test = (full.subset(torch.from_numpy(ix)) for ix in parts)
    mean = tuple(float(v) for v in train.x.mean((0, 2, 3)))
    std = tuple(float(v) for v in train.x.std((0, 2, 3)).clamp_min(1e-3))
    return DataBundle("fairbatch-synthetic", train, val, test, 2, mean, std, "none",
                      ["negative", "positive"], ["z0", "z1"],
                      {"rotation": p.rotation, "bounded": False})
