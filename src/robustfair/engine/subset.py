"""Which images an evaluation uses: the whole split, or a class-stratified subset of ``n``.

Every evaluation path (``robustfair eval`` with any attack, ``--resume``, ``--checks``,
``analyze``, the report's ε curve, the leaderboard, the Python API and training's final
evaluation) takes its ``n`` images with :func:`eval_subset`, so the same ``n`` gives the same
images everywhere. The rule: each class gets a share of ``n`` proportional to its size (the
remainder goes to the largest classes), drawn with a fixed seed, independent of the run's seed
(so runs with different seeds are measured on the same images). The record (rule, seed, count,
sha256 of the indices and the indices themselves) is saved in ``eval/summary.json``.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..data.core import SPLIT_SEED, ArrayData, stratified_indices
from ..errors import UserError

RULE = ("class-stratified: each class gets a share of n proportional to its size (remainder to "
        "the largest classes), drawn with a fixed seed; indices sorted")


def subset_indices(labels: Tensor, n: int | None, seed: int = SPLIT_SEED) -> Tensor:
    """Sorted indices of the class-stratified subset of ``n`` (all indices when ``n`` is None
    or not smaller than the split); ``n`` below 1 is refused."""
    if n is not None and int(n) < 1:
        raise UserError(f"the number of images must be at least 1 (got {n})")
    total = len(labels)
    if n is None or n >= total:
        return torch.arange(total)
    return stratified_indices(labels, int(n), seed)[1]


def indices_sha256(idx: Tensor) -> str:
    """sha256 of the indices as little-endian int64 (the same on every platform)."""
    return hashlib.sha256(np.asarray(idx.cpu(), dtype="<i8").tobytes()).hexdigest()


def subset_record(idx: Tensor, total: int, n: int | None, seed: int = SPLIT_SEED,
                  split: str = "test") -> dict[str, Any]:
    """What ``eval/summary.json`` records about the images: rule, seed, count and indices."""
    whole = n is None or n >= total
    return {
        "split": split, "of": int(total), "n": int(len(idx)),
        "rule": "the whole split" if whole else RULE, "seed": None if whole else seed,
        "sha256": indices_sha256(idx), "indices": None if whole else [int(i) for i in idx],
    }


def eval_subset(split: ArrayData, n: int | None, seed: int = SPLIT_SEED,
                name: str = "test") -> tuple[ArrayData, dict[str, Any]]:
    """The images to evaluate (see the module docstring) and their record."""
    idx = subset_indices(split.y, n, seed)
    data = split if len(idx) == len(split) else split.subset(idx)
    return data, subset_record(idx, len(split), n, seed, name)


__all__ = ["RULE", "eval_subset", "indices_sha256", "subset_indices", "subset_record"]
