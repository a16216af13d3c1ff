"""The AT-on-AD metrics (Hu et al., ICML 2023; definitions in specs/README.md).

- accuracy disparity AD = acc_majority − acc_minority, per-class accuracies on the *balanced* test
  set (each class divided by its own count);
- gap of AD = AD(robust model) − AD(standard model);
- gap of standard accuracy = acc(standard model) − acc(robust model), overall accuracy on the
  *imbalanced* test set (the training distribution);
- figures over seeds: mean ± standard error std/√n with the population std (ddof = 0), as the
  official analysis script computes it.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ..metrics.classwise import per_class_accuracy


def accuracy_disparity(correct: Tensor, labels: Tensor, majority: int) -> float:
    """acc_majority − acc_minority for a two-class problem (per-class accuracy)."""
    acc, counts = per_class_accuracy(torch.as_tensor(correct), torch.as_tensor(labels), 2)
    if int(counts.min()) == 0:
        raise ValueError("accuracy disparity needs samples of both classes")
    return float(acc[majority] - acc[1 - majority])


def ad_gap(ad_robust: float, ad_standard: float) -> float:
    """Gap of accuracy disparity: AD(robust) − AD(standard); > 0 means robustness widens AD."""
    return ad_robust - ad_standard


def standard_accuracy_gap(acc_standard: float, acc_robust: float) -> float:
    """Gap of standard accuracy: acc(standard) − acc(robust); > 0 means robustness costs accuracy."""
    return acc_standard - acc_robust


def mean_se(values: np.ndarray, axis: int = -1) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard error std/√n (population std, ddof = 0) along ``axis``."""
    v = np.asarray(values, dtype=np.float64)
    n = v.shape[axis]
    return v.mean(axis=axis), v.std(axis=axis, ddof=0) / np.sqrt(n)
