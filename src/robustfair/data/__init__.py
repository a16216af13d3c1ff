"""Datasets by name. Each loader returns a :class:`DataBundle` of train / validation / test
splits held in memory as tensors (images in [0, 1] once batched), with optional ``group`` and
``source`` (0 real, 1 generated) per sample."""

from __future__ import annotations

from ..registry import Registry

DATASETS: Registry = Registry("dataset", package="robustfair.data")

from .core import ArrayData, DataBundle, augment_batch, load_data  # noqa: E402

__all__ = ["DATASETS", "ArrayData", "DataBundle", "augment_batch", "load_data"]
