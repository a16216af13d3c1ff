"""Tolerances of the suite's numeric comparisons, each derived from the arithmetic it allows for.

A comparison is exact (``torch.equal``, ``==``) where both sides do the same operations in the
same order on the same inputs, or count things. Otherwise the two sides round differently, and
the tolerance is what that rounding can amount to, never what one CPU happened to produce:
kernels differ between CPUs (AVX2, AVX-512, no vector unit) and between thread counts in the
order in which they sum, so a test run under ``ATEN_CPU_CAPABILITY=default`` or ``=avx2`` must
pass with the same bounds.

Unit roundoff: u = 2^-24 ≈ 6.0e-8 in float32 and 2^-53 ≈ 1.1e-16 in float64. A sum of K terms
computed in another order differs by at most K·u·Σ|terms| (about √K·u·Σ|terms| in practice);
a chain of layers adds its layers' errors.
"""

from __future__ import annotations

import math

U32 = 2.0**-24
U64 = 2.0**-53

#: float64 closed forms against a hand or reference computation of at most a few hundred
#: operations on values of order 1: a few hundred · u64 ≈ 1e-14; 1e-12 leaves a margin of 100
FP64_FORMULA = 1e-12

#: float32 values of order 1 from a handful of elementwise operations (a softmax, a KL term,
#: a clamp or a step), computed by two codes: a few u32 each, ≈ 5e-7; 1e-6 is 17 u32
FP32_ELEMENTWISE = 1e-6

#: float32 means of one batch (up to ~1,000 terms of order 1) summed in another order:
#: √1000 · u32 · 1 ≈ 2e-6; 1e-5 covers the worst-case order too for the means used here
FP32_BATCH_MEAN = 1e-5

#: figures that are ratios of counts (accuracies, shares), stored as float64 or JSON and
#: compared with pytest.approx's default (relative 1e-6): a count ratio is exact to u64, so
#: this only allows for the decimal round trip of JSON
COUNT_RATIO_REL = 1e-6


def fp32_sum(k: int, scale: float = 1.0) -> float:
    """Absolute tolerance for float32 sums of ``k`` terms whose magnitudes add up to ``scale``,
    summed in any order: the worst-case bound k·u·scale (at least 4 u)."""
    return max(k, 4) * U32 * scale


def fp32_network(accumulations: list[int], scale: float) -> float:
    """Absolute tolerance for the output of a float32 network computed in two summation orders
    (another kernel, another layout, another process): each layer of K accumulations moves its
    output by about √K·u of its size, and the layers' errors add; × 4 for the terms' magnitudes
    exceeding their sum (cancellation)."""
    return 4 * sum(math.sqrt(k) for k in accumulations) * U32 * max(scale, 1.0)


def fp32_training(steps: int, scale: float = 1.0) -> float:
    """Absolute tolerance for weights after ``steps`` SGD steps computed in two summation orders
    (one process against two, a resumed run): each step's gradient carries one batch mean's
    rounding (:data:`FP32_BATCH_MEAN`), and the differences grow at most linearly when the
    steps are small, so steps · FP32_BATCH_MEAN · scale."""
    return steps * FP32_BATCH_MEAN * max(scale, 1.0)
