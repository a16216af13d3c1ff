"""In-memory splits, the seeded train/validation split, imbalance, and on-device augmentation."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from ..errors import UserError

SPLIT_SEED = 20240101  # fixed: the train/validation/test split does not depend on the run seed


@dataclass
class ArrayData:
    """One split. ``x`` is uint8 (N, C, H, W) in [0, 255] or float in [0, 1]."""

    x: Tensor
    y: Tensor
    group: Tensor | None = None
    source: Tensor | None = None

    def __post_init__(self) -> None:
        self.y = self.y.long()
        n = len(self.y)
        if len(self.x) != n:
            raise ValueError("x and y differ in length")
        for name in ("group", "source"):
            v = getattr(self, name)
            if v is not None:
                v = v.long()
                setattr(self, name, v)
                if len(v) != n:
                    raise ValueError(f"{name} and y differ in length")

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, idx: Tensor) -> ArrayData:
        idx = torch.as_tensor(idx, dtype=torch.long)
        return ArrayData(
            self.x[idx],
            self.y[idx],
            None if self.group is None else self.group[idx],
            None if self.source is None else self.source[idx],
        )

    def to(self, device: torch.device | str) -> ArrayData:
        return ArrayData(
            self.x.to(device),
            self.y.to(device),
            None if self.group is None else self.group.to(device),
            None if self.source is None else self.source.to(device),
        )

    def images(self, idx: Tensor | None = None) -> Tensor:
        """Float images in [0, 1] for the given indices (all when None)."""
        x = self.x if idx is None else self.x[idx.to(self.x.device)]
        if x.dtype == torch.uint8:
            return x.float().div_(255.0)
        return x.float()

    def concat(self, other: ArrayData) -> ArrayData:
        def cat(a: Tensor | None, b: Tensor | None, n_a: int, n_b: int) -> Tensor | None:
            if a is None and b is None:
                return None
            a = a if a is not None else torch.zeros(n_a, dtype=torch.long)
            b = b if b is not None else torch.zeros(n_b, dtype=torch.long)
            return torch.cat([a, b])

        x_b = other.x if other.x.dtype == self.x.dtype else other.images().mul(255).round().to(
            self.x.dtype
        )
        return ArrayData(
            torch.cat([self.x, x_b]),
            torch.cat([self.y, other.y]),
            cat(self.group, other.group, len(self), len(other)),
            cat(self.source, other.source, len(self), len(other)),
        )


@dataclass
class DataBundle:
    name: str
    train: ArrayData
    val: ArrayData
    test: ArrayData
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: str = "none"
    class_names: list[str] = field(default_factory=list)
    group_names: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def in_channels(self) -> int:
        return int(self.train.x.shape[1])

    @property
    def image_size(self) -> int:
        return int(self.train.x.shape[-1])

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.train.x.shape[1:])

    @property
    def num_groups(self) -> int:
        g = [d.group for d in (self.train, self.val, self.test) if d.group is not None and len(d)]
        return int(max(int(t.max()) for t in g) + 1) if g else 0

    def split(self, name: str) -> ArrayData:
        return {"train": self.train, "val": self.val, "test": self.test}[name]

    @property
    def bounded(self) -> bool:
        """Whether inputs live in [0, 1] (images), so that attacks clip to that box; synthetic
        mixtures say ``extra['bounded'] = False``."""
        return bool(self.extra.get("bounded", True))


def class_names_default(c: int) -> list[str]:
    return [str(i) for i in range(c)]


def stratified_holdout(
    data: ArrayData, size: float, seed: int = SPLIT_SEED
) -> tuple[ArrayData, ArrayData]:
    """Split off a held-out part, stratified by label, with a fixed seed.

    ``size`` < 1 is a fraction, ``size`` >= 1 a count."""
    n = len(data)
    n_hold = int(round(size * n)) if size < 1 else int(size)
    if n_hold <= 0:
        return data, data.subset(torch.zeros(0, dtype=torch.long))
    if n_hold >= n:
        raise UserError(f"data.val_size={size} leaves no training images; use a smaller value")
    keep_idx, hold_idx = stratified_indices(data.y, n_hold, seed)
    return data.subset(keep_idx), data.subset(hold_idx)


def stratified_indices(labels: Tensor, n_hold: int, seed: int = SPLIT_SEED
                       ) -> tuple[Tensor, Tensor]:
    """(kept, held-out) indices, both sorted: ``n_hold`` indices drawn per class in proportion to
    the class's size (the remainder to the largest classes), each class shuffled with ``seed``."""
    labels = labels.cpu()
    n = len(labels)
    g = torch.Generator().manual_seed(seed)
    hold: list[Tensor] = []
    keep: list[Tensor] = []
    classes = labels.unique()
    # quota per class proportional to class size, the remainder to the largest classes
    counts = torch.stack([(labels == c).sum() for c in classes]).double()
    quota = torch.floor(counts / n * n_hold).long()
    rest = n_hold - int(quota.sum())
    order = torch.argsort(counts, descending=True)
    for i in range(rest):
        quota[order[i % len(order)]] += 1
    for c, q in zip(classes, quota, strict=True):
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        hold.append(idx[:q])
        keep.append(idx[q:])
    return torch.sort(torch.cat(keep)).values, torch.sort(torch.cat(hold)).values


def imbalance(
    data: ArrayData, kind: str, ratio: float, num_classes: int, seed: int = SPLIT_SEED
) -> ArrayData:
    """Subsample classes: ``step`` keeps 1/R of the last half of the classes; ``exp`` keeps
    n·R^(-c/(C-1)) of class c (long tail)."""
    if kind == "none" or ratio == 1:
        return data
    g = torch.Generator().manual_seed(seed + 1)
    keep: list[Tensor] = []
    for c in range(num_classes):
        idx = torch.nonzero(data.y == c).flatten()
        if kind == "step":
            frac = 1.0 / ratio if c >= num_classes - num_classes // 2 else 1.0
        else:
            frac = ratio ** (-c / max(num_classes - 1, 1))
        k = max(1, int(math.floor(len(idx) * frac + 1e-9)))
        keep.append(idx[torch.randperm(len(idx), generator=g)[:k]])
    return data.subset(torch.sort(torch.cat(keep)).values)


def augment_batch(x: Tensor, mode: str, generator: torch.Generator | None = None) -> Tensor:
    """Random crop (zero padding 4, or 1/8 of the side) and horizontal flip, on x's device."""
    if mode in ("none", "auto"):
        return x
    b, c, h, w = x.shape
    pad = max(1, h // 8)
    dev = x.device
    oy = torch.randint(0, 2 * pad + 1, (b,), generator=generator).to(dev)
    ox = torch.randint(0, 2 * pad + 1, (b,), generator=generator).to(dev)
    xp = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    rows = (oy[:, None] + torch.arange(h, device=dev)[None, :])[:, None, :, None]
    cols = (ox[:, None] + torch.arange(w, device=dev)[None, :])[:, None, None, :]
    bi = torch.arange(b, device=dev)[:, None, None, None]
    ci = torch.arange(c, device=dev)[None, :, None, None]
    out = xp[bi, ci, rows, cols]
    if mode == "crop_flip":
        flip = (torch.rand(b, generator=generator) < 0.5).to(dev)
        out = torch.where(flip[:, None, None, None], out.flip(-1), out)
    return out


def finish_bundle(bundle: DataBundle, cfg: Any) -> DataBundle:
    """Apply the configuration's imbalance, limits and validation split to a loaded bundle."""
    train = bundle.train
    if cfg.imbalance.kind != "none":
        train = imbalance(train, cfg.imbalance.kind, cfg.imbalance.ratio, bundle.num_classes)
    val = bundle.val
    if val is None or len(val) == 0:
        train, val = stratified_holdout(train, cfg.val_size)
    if cfg.train_limit is not None and cfg.train_limit < len(train):
        train, _ = stratified_holdout(train, len(train) - cfg.train_limit)
    test = bundle.test
    if cfg.test_limit is not None and cfg.test_limit < len(test):
        _, test = stratified_holdout(test, cfg.test_limit)
    augment = bundle.augment if cfg.augment == "auto" else cfg.augment
    return replace(bundle, train=train, val=val, test=test, augment=augment)


def load_data(cfg: Any) -> DataBundle:
    """Load the dataset named by a :class:`~robustfair.config.DataConfig`."""
    from . import DATASETS

    loader = DATASETS.get(cfg.name)
    try:
        bundle = loader(cfg)
    except UserError:
        raise
    except (FileNotFoundError, RuntimeError, OSError) as exc:
        raise UserError(f"data '{cfg.name}': {exc}") from None
    return finish_bundle(bundle, cfg)
