"""Standard datasets in their standard file formats under ``data.root`` (torchvision readers).

Nothing is downloaded unless ``data.download: true``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import UserError
from . import DATASETS
from .core import ArrayData, DataBundle

CIFAR10_CLASSES = [
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
]
MEANS = {
    "mnist": ((0.1307,), (0.3081,)),
    "fashion-mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "svhn": ((0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)),
    "stl10": ((0.4467, 0.4398, 0.4066), (0.2603, 0.2566, 0.2713)),
}


def _root(cfg: Any, name: str) -> str:
    if not cfg.root:
        raise UserError(
            f"data.root is not set: dataset '{name}' is read from disk; set data.root=DIR "
            f"(and data.download=true to fetch it where internet is available)"
        )
    root = Path(cfg.root).expanduser()
    if not cfg.download and not root.exists():
        raise UserError(f"data.root {str(root)!r} does not exist; check the path")
    return str(root)


def _open(cls: Any, name: str, cfg: Any, **kw: Any) -> Any:
    root = _root(cfg, name)
    try:
        return cls(root, download=cfg.download, **kw)
    except RuntimeError as exc:
        raise UserError(
            f"dataset '{name}' not found or corrupted under {root!r} ({exc}); put the standard "
            f"files there or set data.download=true"
        ) from None


def _empty(x: torch.Tensor) -> ArrayData:
    return ArrayData(x[:0], torch.zeros(0, dtype=torch.long))


def _hwc(data: Any) -> torch.Tensor:
    arr = torch.as_tensor(np.asarray(data))
    return arr.permute(0, 3, 1, 2).contiguous()


def _mnist_like(cls_name: str, name: str, cfg: Any) -> DataBundle:
    import torchvision.datasets as tvd

    cls = getattr(tvd, cls_name)
    tr = _open(cls, name, cfg, train=True)
    te = _open(cls, name, cfg, train=False)
    train = ArrayData(tr.data[:, None].contiguous(), torch.as_tensor(tr.targets))
    test = ArrayData(te.data[:, None].contiguous(), torch.as_tensor(te.targets))
    mean, std = MEANS[name]
    return DataBundle(name, train, _empty(train.x), test, 10, mean, std, "none",
                      [str(c) for c in tr.classes])


@DATASETS.register("mnist")
def mnist(cfg: Any) -> DataBundle:
    """MNIST from its IDX files under data.root (MNIST/raw/), 28×28 grey, 10 classes."""
    return _mnist_like("MNIST", "mnist", cfg)


@DATASETS.register("fashion-mnist")
def fashion_mnist(cfg: Any) -> DataBundle:
    """Fashion-MNIST from its IDX files under data.root (FashionMNIST/raw/), 28×28, 10 classes."""
    return _mnist_like("FashionMNIST", "fashion-mnist", cfg)


def _cifar(cls_name: str, name: str, c: int, cfg: Any) -> DataBundle:
    import torchvision.datasets as tvd

    cls = getattr(tvd, cls_name)
    tr = _open(cls, name, cfg, train=True)
    te = _open(cls, name, cfg, train=False)
    train = ArrayData(_hwc(tr.data), torch.as_tensor(tr.targets))
    test = ArrayData(_hwc(te.data), torch.as_tensor(te.targets))
    mean, std = MEANS[name]
    return DataBundle(name, train, _empty(train.x), test, c, mean, std, "crop_flip",
                      list(tr.classes))


@DATASETS.register("cifar10")
def cifar10(cfg: Any) -> DataBundle:
    """CIFAR-10 from cifar-10-batches-py/ under data.root, 32×32 colour, 10 classes."""
    return _cifar("CIFAR10", "cifar10", 10, cfg)


@DATASETS.register("cifar100")
def cifar100(cfg: Any) -> DataBundle:
    """CIFAR-100 from cifar-100-python/ under data.root, 32×32 colour, 100 classes."""
    return _cifar("CIFAR100", "cifar100", 100, cfg)


@DATASETS.register("svhn")
def svhn(cfg: Any) -> DataBundle:
    """SVHN from train_32x32.mat / test_32x32.mat under data.root, 32×32 colour, 10 classes."""
    import torchvision.datasets as tvd

    tr = _open(tvd.SVHN, "svhn", cfg, split="train")
    te = _open(tvd.SVHN, "svhn", cfg, split="test")
    train = ArrayData(torch.as_tensor(tr.data), torch.as_tensor(tr.labels))
    test = ArrayData(torch.as_tensor(te.data), torch.as_tensor(te.labels))
    mean, std = MEANS["svhn"]
    return DataBundle("svhn", train, _empty(train.x), test, 10, mean, std, "none",
                      [str(i) for i in range(10)])


@DATASETS.register("stl10")
def stl10(cfg: Any) -> DataBundle:
    """STL-10 (labelled 5k train / 8k test) from stl10_binary/ under data.root, resized to 64×64
    as in the DAFA code (``data.params.size`` to change)."""
    import torchvision.datasets as tvd

    size = int(cfg.params.get("size", 64))
    tr = _open(tvd.STL10, "stl10", cfg, split="train")
    te = _open(tvd.STL10, "stl10", cfg, split="test")

    def resize(a: np.ndarray) -> torch.Tensor:
        t = torch.as_tensor(a)
        if t.shape[-1] == size:
            return t
        out = []
        for i in range(0, len(t), 1000):
            chunk = t[i : i + 1000].float()
            r = F.interpolate(chunk, size=(size, size), mode="bilinear", antialias=True,
                              align_corners=False)
            out.append(r.round().clamp(0, 255).to(torch.uint8))
        return torch.cat(out)

    train = ArrayData(resize(tr.data), torch.as_tensor(tr.labels))
    test = ArrayData(resize(te.data), torch.as_tensor(te.labels))
    mean, std = MEANS["stl10"]
    return DataBundle("stl10", train, _empty(train.x), test, 10, mean, std, "crop_flip",
                      list(tr.classes))
