"""The closed-form oracle of the AT-on-AD study: the best standard and the best robust *linear*
rule on a stable mixture, and the two gaps of Figure 1 they predict (Hu et al., ICML 2023,
arXiv:2211.15762).

For the rule "class 1 iff w·x + b > 0" on the mixture of :mod:`robustfair.data.stable_mixture`
(class y: mean s_y·μ, noise c_y·σ ⊙ z), the worst ε-perturbation lowers every margin by ε‖w‖_*,
so the robust margin of class y is a_y + c_y‖w ⊙ σ‖_α·z with a_y = w·μ + s_y·b − ε‖w‖_*. Two
population losses of (w, b) follow, each weighted by the class priors p_0 = R/(R + 1),
p_1 = 1/(R + 1) of the training distribution:

- ``ce`` (α = 2, what adversarial training minimises): E softplus(−(a_y + c_y√2‖w ⊙ σ‖_2·ξ)),
  ξ ~ N(0, 1), by 64-point Gauss–Hermite quadrature (for α < 2 the heavy tails make it
  infinite (α = 1) or leave no closed form);
- ``zero_one`` (any α): 1 − F_α(a_y / (c_y‖w ⊙ σ‖_α)), the robust error (F_α exact for α = 2
  and 1, interpolated from a table of scipy's ``levy_stable`` otherwise).

The ``zero_one`` optimum is that of the robust *error*, not of what training minimises: when
even the best robust rule errs more often than the minority class occurs, it is (nearly) the
constant rule "always the majority", and its AD gap approaches 100 points. Both are minimised
numerically (L-BFGS-B from the Bayes direction w = μ/σ²). With ε = 0 and equal
class scales the ``ce`` optimum is the Bayes rule. The gaps are then AD(robust) − AD(standard)
(per-class accuracies, i.e. the balanced test set) and acc(standard) − acc(robust) with the
priors of the imbalanced test set.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from ..data.stable_mixture import Mixture, stable_cdf

Loss = Literal["ce", "zero_one"]
_NODES, _WEIGHTS = np.polynomial.hermite.hermgauss(64)


def default_loss(alpha: float) -> Loss:
    """``ce`` for the Gaussian, ``zero_one`` otherwise."""
    return "ce" if alpha == 2.0 else "zero_one"


@functools.lru_cache(maxsize=8)
def _cdf_table(alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """F_α on the grid t = sinh(u), u ∈ [−8, 8] (401 points, scipy's levy_stable)."""
    t = np.sinh(np.linspace(-8.0, 8.0, 401))
    return torch.as_tensor(t), torch.as_tensor(stable_cdf(t, alpha))


def _cdf(t: torch.Tensor, alpha: float) -> torch.Tensor:
    """F_α: closed form for α = 2 and 1, else linear interpolation of a table."""
    if alpha == 2.0:
        return torch.special.ndtr(t / math.sqrt(2.0))
    if alpha == 1.0:
        return 0.5 + torch.atan(t) / math.pi
    grid, values = _cdf_table(alpha)
    tc = t.clamp(float(grid[0]), float(grid[-1]))
    i = torch.searchsorted(grid, tc.detach()).clamp(1, len(grid) - 1)
    lo, hi = grid[i - 1], grid[i]
    frac = (tc - lo) / (hi - lo)
    return values[i - 1] + frac * (values[i] - values[i - 1])


def _groups(mix: Mixture) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Coordinates with the same (μ_j, σ_j) share one weight at the optimum (the loss is
    symmetric in them, and convex for ``ce``): (μ_g, σ_g, counts n_g, group of each j)."""
    pairs, inverse, counts = np.unique(np.stack([mix.mu, mix.sigma], 1), axis=0,
                                       return_inverse=True, return_counts=True)
    return pairs[:, 0], pairs[:, 1], counts.astype(np.float64), inverse.ravel()


def population_loss(w: torch.Tensor, b: torch.Tensor, mix: Mixture, prior1: float, eps: float,
                    norm: str, loss: Loss, counts: torch.Tensor | None = None,
                    mu: np.ndarray | None = None, sigma: np.ndarray | None = None
                    ) -> torch.Tensor:
    """The prior-weighted population loss of (w, b) under the worst ε-perturbation; ``counts``
    (with ``mu``, ``sigma``): w holds one weight per group of equal coordinates."""
    n = torch.ones_like(w) if counts is None else counts
    mu_t = torch.as_tensor(mix.mu if mu is None else mu, dtype=w.dtype)
    sigma_t = torch.as_tensor(mix.sigma if sigma is None else sigma, dtype=w.dtype)
    dual = (n * w.abs()).sum() if norm == "linf" else (n * w**2).sum().sqrt()
    a = torch.stack([(n * w) @ mu_t - b, (n * w) @ mu_t + b]) - eps * dual
    c = torch.tensor(mix.class_scale, dtype=w.dtype)
    prior = torch.tensor([1.0 - prior1, prior1], dtype=w.dtype)
    ws = (w * sigma_t).abs()
    if loss == "zero_one":
        scale = c * (n * ws**mix.alpha).sum() ** (1.0 / mix.alpha)
        return (prior * (1.0 - _cdf(a / scale, mix.alpha))).sum()
    if mix.alpha != 2.0:
        raise ValueError("the cross-entropy loss has a closed form for alpha = 2 only")
    std = c * math.sqrt(2.0) * (n * ws**2).sum().sqrt()  # an α = 2 coordinate has variance 2
    nodes = torch.as_tensor(_NODES, dtype=w.dtype)
    weights = torch.as_tensor(_WEIGHTS, dtype=w.dtype) / math.sqrt(math.pi)
    m = a[:, None] + std[:, None] * math.sqrt(2.0) * nodes[None, :]
    return (prior * (F.softplus(-m) * weights).sum(1)).sum()


def optimal_linear_rule(mix: Mixture, prior1: float, eps: float = 0.0, norm: str = "linf",
                        loss: Loss = "ce", iters: int = 500) -> tuple[np.ndarray, float]:
    """(w, b) minimising :func:`population_loss`: scipy's L-BFGS-B with torch gradients in
    float64, over one weight per group of equal coordinates, from the Bayes direction
    w = μ/σ²."""
    from scipy.optimize import minimize

    mu, sigma, counts, inverse = _groups(mix)
    n = torch.as_tensor(counts)
    w0 = mu / (sigma**2 * max(mix.class_scale) ** 2)
    b0 = math.log(prior1 / (1.0 - prior1))
    if loss == "zero_one":  # scale-free loss: start at noise scale 1, so b is well conditioned
        w0 = w0 / ((counts * np.abs(w0 * sigma) ** mix.alpha).sum() ** (1.0 / mix.alpha))
        b0 = 0.0
    x0 = np.append(w0, b0)

    def value_and_grad(x: np.ndarray) -> tuple[float, np.ndarray]:
        xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
        value = population_loss(xt[:-1], xt[-1], mix, prior1, eps, norm, loss, n, mu, sigma)
        (g,) = torch.autograd.grad(value, [xt])
        return float(value.detach()), g.numpy()

    def fit(x: np.ndarray) -> np.ndarray:
        return minimize(value_and_grad, x, jac=True, method="L-BFGS-B",
                        options={"maxiter": iters, "ftol": 1e-15, "gtol": 1e-12}).x

    x = fit(x0)
    if loss == "zero_one":  # kinks (|w_j| = 0) can stop L-BFGS early: refit b alone, then again
        for _ in range(2):
            x = x / (counts * np.abs(x[:-1] * sigma) ** mix.alpha).sum() ** (1.0 / mix.alpha)
            x[-1] = _best_bias(lambda b, w=x[:-1]: value_and_grad(np.append(w, b))[0])
            x = fit(x)
    return x[:-1][inverse].copy(), float(x[-1])


def _best_bias(risk: Any) -> float:
    """The bias minimising a 1-D risk: a coarse grid over ±100 noise scales, then Brent."""
    from scipy.optimize import minimize_scalar

    grid = np.concatenate([-np.logspace(2, -3, 60), [0.0], np.logspace(-3, 2, 60)])
    k = int(np.argmin([risk(b) for b in grid]))
    lo, hi = grid[max(k - 1, 0)], grid[min(k + 1, len(grid) - 1)]
    return float(minimize_scalar(risk, bounds=(lo, hi), method="bounded").x)


def _summary(mix: Mixture, w: np.ndarray, b: float, ratio: float) -> dict[str, float]:
    acc = mix.class_accuracy(w, b)
    p1 = 1.0 / (ratio + 1.0)
    return {"acc0": float(acc[0]), "acc1": float(acc[1]), "ad": float(acc[0] - acc[1]),
            "acc": float((1.0 - p1) * acc[0] + p1 * acc[1])}


def closed_form_gaps(mix: Mixture, ratios: list[float], eps: dict[str, list[float]],
                     loss: Loss | None = None) -> dict[str, Any]:
    """Per norm and ε: the predicted AD gap and standard-accuracy gap at each R, and the
    per-class clean accuracies of the best standard and robust linear rules."""
    loss = loss or default_loss(mix.alpha)
    std = [_summary(mix, *optimal_linear_rule(mix, 1 / (r + 1), 0.0, "linf", loss), r)
           for r in ratios]
    out: dict[str, Any] = {"loss": loss, "mixture": mix.describe(), "standard": std,
                           "gaps": {}}
    for norm, grid in eps.items():
        rows = []
        for e in grid:
            rob = [_summary(mix, *optimal_linear_rule(mix, 1 / (r + 1), e, norm, loss), r)
                   for r in ratios]
            rows.append({"eps": e, "robust": rob,
                         "ad_gap": [ro["ad"] - s["ad"] for ro, s in zip(rob, std, strict=True)],
                         "acc_gap": [s["acc"] - ro["acc"] for ro, s in zip(rob, std,
                                                                           strict=True)]})
        out["gaps"][norm] = rows
    return out
