"""Standard datasets read from their standard file formats under ``data.root``.

The readers are our own (no checksum of the whole file is required, so subsets and test files in the
same format load too); with ``data.download: true`` torchvision fetches the files first where
internet is available. Layouts (as torchvision writes them):

- ``mnist``: ``ROOT/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]``
- ``fashion-mnist``: the same under ``ROOT/FashionMNIST/raw/``
- ``cifar10``: ``ROOT/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}``
- ``cifar100``: ``ROOT/cifar-100-python/{train,test,meta}``
- ``svhn``: ``ROOT/{train,test}_32x32.mat``
- ``stl10``: ``ROOT/stl10_binary/{train,test}_{X,y}.bin``
"""

from __future__ import annotations

import gzip
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import UserError
from . import DATASETS
from .core import ArrayData, DataBundle

MEANS = {
    "mnist": ((0.1307,), (0.3081,)),
    "fashion-mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "svhn": ((0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)),
    "stl10": ((0.4467, 0.4398, 0.4066), (0.2603, 0.2566, 0.2713)),
}
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck"]
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                   "Sneaker", "Bag", "Ankle boot"]
TV_CLASS = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST", "cifar10": "CIFAR10",
            "cifar100": "CIFAR100", "svhn": "SVHN", "stl10": "STL10"}


def _root(cfg: Any, name: str) -> Path:
    if not cfg.root:
        raise UserError(
            f"data.root is not set: dataset '{name}' is read from disk; set data.root=DIR "
            f"(and data.download=true to fetch it where internet is available)"
        )
    root = Path(cfg.root).expanduser()
    if not cfg.download and not root.is_dir():
        raise UserError(f"data.root {str(root)!r} does not exist; check the path")
    return root


def _need(path: Path, name: str, cfg: Any) -> Path:
    if path.exists():
        return path
    raise UserError(
        f"dataset '{name}': {str(path)!r} not found; put the standard files under data.root "
        f"or set data.download=true"
    )


def _download(name: str, root: Path, **kw: Any) -> None:
    import torchvision.datasets as tvd

    cls = getattr(tvd, TV_CLASS[name])
    try:
        cls(str(root), download=True, **kw)
    except Exception as exc:  # noqa: BLE001 - network errors come in many types
        raise UserError(f"downloading '{name}' into {str(root)!r} failed ({exc}); download the "
                        f"files by hand") from None


class _SafeUnpickler(pickle.Unpickler):
    """Unpickles the CIFAR batch format: plain containers and numpy arrays, nothing else."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            obj = _SafeUnpickler(f, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError) as exc:
        raise UserError(f"{str(path)!r} is not a valid CIFAR batch file ({exc}); re-download it"
                        ) from None
    if not isinstance(obj, dict):
        raise UserError(f"{str(path)!r} is not a valid CIFAR batch file; re-download it")
    return obj


def _read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (MNIST format), optionally gzipped."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:  # type: ignore[operator]
            data = f.read()
    except OSError as exc:
        raise UserError(f"cannot read {str(path)!r}: {exc}") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 8:
        raise UserError(f"{str(path)!r} is not an IDX file of unsigned bytes; re-download it")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    n = int(np.prod(dims))
    off = 4 + 4 * ndim
    if len(data) - off < n:
        raise UserError(f"{str(path)!r} is truncated; re-download it")
    return np.frombuffer(data, dtype=np.uint8, count=n, offset=off).reshape(dims)


def _idx_file(folder: Path, stem: str) -> Path:
    for cand in (folder / stem, folder / f"{stem}.gz"):
        if cand.exists():
            return cand
    return folder / stem


def _mnist_like(name: str, sub: str, cfg: Any, classes: list[str]) -> DataBundle:
    root = _root(cfg, name)
    raw = root / sub / "raw"
    if cfg.download and not (_idx_file(raw, "train-images-idx3-ubyte")).exists():
        _download(name, root, train=True)
        _download(name, root, train=False)

    def split(prefix: str) -> ArrayData:
        xi = _read_idx(_need(_idx_file(raw, f"{prefix}-images-idx3-ubyte"), name, cfg))
        yi = _read_idx(_need(_idx_file(raw, f"{prefix}-labels-idx1-ubyte"), name, cfg))
        if len(xi) != len(yi):
            raise UserError(f"dataset '{name}': image and label files of '{prefix}' differ in "
                            f"length; re-download them")
        return ArrayData(torch.from_numpy(xi.copy())[:, None], torch.from_numpy(yi.astype(
            np.int64)))

    train, test = split("train"), split("t10k")
    mean, std = MEANS[name]
    return DataBundle(name, train, _empty(train), test, 10, mean, std, "none", classes)


def _empty(d: ArrayData) -> ArrayData:
    return d.subset(torch.zeros(0, dtype=torch.long))


@DATASETS.register("mnist")
def mnist(cfg: Any) -> DataBundle:
    """MNIST from its IDX files under data.root (MNIST/raw/), 28×28 grey, 10 classes."""
    return _mnist_like("mnist", "MNIST", cfg, [str(i) for i in range(10)])


@DATASETS.register("fashion-mnist")
def fashion_mnist(cfg: Any) -> DataBundle:
    """Fashion-MNIST from its IDX files under data.root (FashionMNIST/raw/), 28×28, 10 classes."""
    return _mnist_like("fashion-mnist", "FashionMNIST", cfg, FASHION_CLASSES)


def _cifar_batch(path: Path, label_key: str) -> tuple[torch.Tensor, torch.Tensor]:
    d = _unpickle(path)
    try:
        x = np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        y = np.asarray(d[label_key], dtype=np.int64)
    except (KeyError, ValueError) as exc:
        raise UserError(f"{str(path)!r} is not a valid CIFAR batch ({exc}); re-download it"
                        ) from None
    return torch.from_numpy(x.copy()), torch.from_numpy(y)


def _cifar(name: str, cfg: Any) -> DataBundle:
    root = _root(cfg, name)
    folder = root / ("cifar-10-batches-py" if name == "cifar10" else "cifar-100-python")
    if cfg.download and not folder.exists():
        _download(name, root, train=True)
        _download(name, root, train=False)
    if name == "cifar10":
        parts = [_cifar_batch(_need(folder / f"data_batch_{i}", name, cfg), "labels")
                 for i in range(1, 6)]
        xt, yt = _cifar_batch(_need(folder / "test_batch", name, cfg), "labels")
        c, classes = 10, CIFAR10_CLASSES
        meta = folder / "batches.meta"
        if meta.exists():
            classes = list(_unpickle(meta).get("label_names", classes))
    else:
        parts = [_cifar_batch(_need(folder / "train", name, cfg), "fine_labels")]
        xt, yt = _cifar_batch(_need(folder / "test", name, cfg), "fine_labels")
        c = 100
        meta = folder / "meta"
        classes = (list(_unpickle(meta).get("fine_label_names", [])) if meta.exists() else [])
        classes = classes or [str(i) for i in range(100)]
    train = ArrayData(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))
    test = ArrayData(xt, yt)
    mean, std = MEANS[name]
    return DataBundle(name, train, _empty(train), test, c, mean, std, "crop_flip", classes)


@DATASETS.register("cifar10")
def cifar10(cfg: Any) -> DataBundle:
    """CIFAR-10 from cifar-10-batches-py/ under data.root, 32×32 colour, 10 classes."""
    return _cifar("cifar10", cfg)


@DATASETS.register("cifar100")
def cifar100(cfg: Any) -> DataBundle:
    """CIFAR-100 from cifar-100-python/ under data.root, 32×32 colour, 100 classes."""
    return _cifar("cifar100", cfg)


@DATASETS.register("svhn")
def svhn(cfg: Any) -> DataBundle:
    """SVHN from train_32x32.mat / test_32x32.mat under data.root, 32×32 colour, 10 classes."""
    import scipy.io

    root = _root(cfg, "svhn")
    if cfg.download and not (root / "train_32x32.mat").exists():
        _download("svhn", root, split="train")
        _download("svhn", root, split="test")

    def split(s: str) -> ArrayData:
        path = _need(root / f"{s}_32x32.mat", "svhn", cfg)
        try:
            m = scipy.io.loadmat(str(path))
            x = np.transpose(m["X"], (3, 2, 0, 1)).astype(np.uint8)
            y = m["y"].astype(np.int64).reshape(-1) % 10
        except (ValueError, KeyError, OSError) as exc:
            raise UserError(f"{str(path)!r} is not a valid SVHN .mat file ({exc})") from None
        return ArrayData(torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(y))

    train, test = split("train"), split("test")
    mean, std = MEANS["svhn"]
    return DataBundle("svhn", train, _empty(train), test, 10, mean, std, "none",
                      [str(i) for i in range(10)])


def _resize(t: torch.Tensor, size: int) -> torch.Tensor:
    if t.shape[-1] == size:
        return t
    out = []
    for i in range(0, len(t), 1000):
        r = F.interpolate(t[i : i + 1000].float(), size=(size, size), mode="bilinear",
                          antialias=True, align_corners=False)
        out.append(r.round().clamp(0, 255).to(torch.uint8))
    return torch.cat(out)


@DATASETS.register("stl10")
def stl10(cfg: Any) -> DataBundle:
    """STL-10 (labelled 5k train / 8k test) from stl10_binary/ under data.root, resized to 64×64
    as in the DAFA code (``data.params.size`` to change)."""
    root = _root(cfg, "stl10")
    folder = root / "stl10_binary"
    if cfg.download and not folder.exists():
        _download("stl10", root, split="train")
    size = int(cfg.params.get("size", 64))

    def split(s: str) -> ArrayData:
        xb = np.fromfile(_need(folder / f"{s}_X.bin", "stl10", cfg), dtype=np.uint8)
        yb = np.fromfile(_need(folder / f"{s}_y.bin", "stl10", cfg), dtype=np.uint8)
        if xb.size != yb.size * 3 * 96 * 96:
            raise UserError(f"stl10 {s} files are truncated or mismatched; re-download them")
        x = xb.reshape(-1, 3, 96, 96).transpose(0, 1, 3, 2)
        return ArrayData(_resize(torch.from_numpy(np.ascontiguousarray(x)), size),
                         torch.from_numpy(yb.astype(np.int64) - 1))

    train, test = split("train"), split("test")
    names_file = folder / "class_names.txt"
    names = names_file.read_text().split() if names_file.exists() else [str(i) for i in range(10)]
    mean, std = MEANS["stl10"]
    return DataBundle("stl10", train, _empty(train), test, 10, mean, std, "crop_flip", names)
