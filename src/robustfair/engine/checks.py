"""Sanity checks of a robustness evaluation: signs that the reported robust accuracy is not to be
trusted (gradient masking, randomness, probabilities instead of logits).

The checks follow Carlini et al., "On evaluating adversarial robustness" (arXiv:1902.06705, §5)
and the flags of AutoAttack (Croce & Hein, arXiv:2003.01690):

- ``logits``: the model returns logits, not softmax probabilities;
- ``deterministic``: repeated forward passes agree (otherwise use ``autoattack-rand``, EOT);
- ``zero_gradients``: the fraction of points whose input gradient is exactly zero;
- ``eps_zero``: an attack with ε = 0 gives exactly the clean predictions;
- ``monotone_eps``: robust accuracy does not rise with ε;
- ``monotone_steps``: robust accuracy does not rise with more attack steps;
- ``unbounded``: an attack without a bound reaches about 0%;
- ``square_vs_whitebox``: the black-box Square attack does not beat the white-box attacks.

On unbounded data (``bounded=False``: synthetic mixtures, not images in [0, 1]) the attacks do
not clip, "unbounded" means an ε as wide as the points' range, and ``square_vs_whitebox`` is
left out (Square and APGD work inside the [0, 1] box).

Each check returns a :class:`CheckResult` with a one-line verdict and, when it fails, the fix.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..attacks import build_attack
from ..attacks._helpers import margin
from ..attacks.base import eval_mode


@dataclass
class CheckResult:
    """The outcome of one check: ``passed``, a one-line ``verdict``, the ``fix`` when failed."""

    name: str
    passed: bool
    verdict: str
    fix: str = ""
    details: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "passed": self.passed, "verdict": self.verdict,
                "fix": self.fix, "details": self.details}


def _logits(model: nn.Module, x: Tensor, batch_size: int = 500) -> Tensor:
    with eval_mode(model), torch.no_grad():
        return torch.cat([model(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])


def _robust_acc(model: nn.Module, spec: str, x: Tensor, y: Tensor, eps: float, norm: str,
                seed: int = 0, bounded: bool = True, **params: Any) -> float:
    atk = build_attack(spec, norm, bounded=bounded, **params)
    if "seed" in type(atk.params).model_fields and "seed" not in params:
        atk.seed = seed  # the private generator of APGD, FAB, Square
    rng = torch.get_rng_state()
    torch.manual_seed(seed)
    try:
        x_adv = atk(model, x, y, eps)
    finally:
        torch.set_rng_state(rng)
    return float((_logits(model, x_adv).argmax(1) == y).float().mean())


def _pct(v: float) -> str:
    return f"{100 * v:.1f}%"


def check_logits(model: nn.Module, x: Tensor, tol: float = 1e-3) -> CheckResult:
    """The outputs are logits: not all in [0, 1] with rows summing to 1 (AutoAttack's
    ``check_range_output``)."""
    z = _logits(model, x)
    in_unit = bool(((z >= -tol) & (z <= 1 + tol)).all())
    sums_one = bool(((z.sum(1) - 1).abs() <= tol).all())
    d = {"min": float(z.min()), "max": float(z.max()),
         "max_row_sum_error": float((z.sum(1) - 1).abs().max())}
    if in_unit and sums_one:
        return CheckResult("logits", False, "the outputs are probabilities (in [0, 1], rows sum "
                           "to 1)", "return the logits: remove the final softmax; the attacks' "
                           "losses (CE, DLR, margins) assume logits", d)
    return CheckResult("logits", True, f"outputs are logits (range {d['min']:.3g} to "
                       f"{d['max']:.3g})", details=d)


def check_deterministic(model: nn.Module, x: Tensor, passes: int = 5,
                        tol: float = 1e-5) -> CheckResult:
    """Repeated forward passes in eval mode give the same outputs (AutoAttack's
    ``check_randomized``)."""
    outs = [_logits(model, x) for _ in range(passes)]
    scale = max(float(outs[0].abs().max()), 1e-12)
    diff = max(float((o - outs[0]).abs().max()) for o in outs[1:]) / scale
    flips = max(int((o.argmax(1) != outs[0].argmax(1)).sum()) for o in outs[1:])
    d = {"max_relative_difference": diff, "prediction_flips": flips, "passes": passes}
    if diff > tol:
        return CheckResult("deterministic", False, f"the model is randomised: outputs differ "
                           f"between passes (relative {diff:.2g}; up to {flips} predictions "
                           f"flip)", "evaluate with --attack autoattack-rand (gradients averaged "
                           "over 20 passes, EOT) or make the model deterministic", d)
    return CheckResult("deterministic", True, f"{passes} forward passes agree", details=d)


def check_zero_gradients(model: nn.Module, x: Tensor, y: Tensor,
                         max_fraction: float = 0.0) -> CheckResult:
    """The fraction of points whose input gradient of the margin z_y − max_{j≠y} z_j is exactly
    zero (AutoAttack's ``check_zero_gradients``)."""
    with eval_mode(model), torch.enable_grad():
        xr = x.detach().clone().requires_grad_(True)
        (g,) = torch.autograd.grad(margin(model(xr), y).sum(), [xr])
    frac = float((g.flatten(1).abs().amax(1) == 0).float().mean())
    d = {"fraction_zero": frac}
    if frac > max_fraction:
        return CheckResult("zero_gradients", False, f"{_pct(frac)} of the points have an input "
                           f"gradient of exactly zero", "gradients are masked (a non-"
                           "differentiable step such as quantization or thresholding, or a "
                           "saturated output): attack through a differentiable approximation "
                           "(BPDA) and rely on the black-box Square attack", d)
    return CheckResult("zero_gradients", True, f"{_pct(frac)} of the points have a zero input "
                       "gradient", details=d)


def check_eps_zero(model: nn.Module, x: Tensor, y: Tensor, norm: str = "linf",
                   attack: str = "pgd10", bounded: bool = True, seed: int = 0) -> CheckResult:
    """An attack with ε = 0 gives exactly the clean predictions."""
    clean = _logits(model, x).argmax(1)
    outside = bounded and (float(x.min()) < 0 or float(x.max()) > 1)
    # the attacks refuse inputs outside [0, 1]; what clipping them would do is what is checked
    if outside:
        adv = _logits(model, x.clamp(0, 1)).argmax(1)
    else:
        rng = torch.get_rng_state()
        torch.manual_seed(seed)
        try:
            adv = _logits(model, build_attack(attack, norm, bounded=bounded)(model, x, y, 0.0)
                          ).argmax(1)
        finally:
            torch.set_rng_state(rng)
    acc_c, acc_a = float((clean == y).float().mean()), float((adv == y).float().mean())
    changed = int((clean != adv).sum())
    d = {"clean": acc_c, "eps0": acc_a, "changed_predictions": changed}
    if changed == 0:
        return CheckResult("eps_zero", True, f"ε = 0 gives the clean accuracy ({_pct(acc_c)})",
                           details=d)
    fix = ("give images in [0, 1] and put the normalization inside the model (the attacks "
           "clip to [0, 1])" if outside else
           "the model's predictions change between calls or modes (randomness, BatchNorm or "
           "dropout in train mode, hidden state): make it deterministic in eval mode, or use "
           "autoattack-rand")
    return CheckResult("eps_zero", False, f"ε = 0 changes {changed} predictions (clean "
                       f"{_pct(acc_c)}, attack {_pct(acc_a)})", fix, d)


def check_monotone_eps(model: nn.Module, x: Tensor, y: Tensor, eps: float, norm: str = "linf",
                       attack: str = "pgd20", factors: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0),
                       tol: float = 0.01, bounded: bool = True, seed: int = 0) -> CheckResult:
    """Robust accuracy does not rise with ε (by more than ``tol``)."""
    grid = [eps * f for f in factors]
    accs = [_robust_acc(model, attack, x, y, e, norm, seed, bounded) for e in grid]
    return _monotone("monotone_eps", "ε", grid, accs, tol, attack)


def check_monotone_steps(model: nn.Module, x: Tensor, y: Tensor, eps: float, norm: str = "linf",
                         attack: str = "pgd", steps: tuple[int, ...] = (10, 50),
                         tol: float = 0.01, bounded: bool = True, seed: int = 0) -> CheckResult:
    """Robust accuracy does not rise with more attack steps (by more than ``tol``)."""
    accs = [_robust_acc(model, f"{attack}{k}", x, y, eps, norm, seed, bounded) for k in steps]
    return _monotone("monotone_steps", "steps", list(steps), accs, tol, attack)


def _monotone(name: str, what: str, grid: list[Any], accs: list[float], tol: float,
              attack: str) -> CheckResult:
    shown = ", ".join(f"{_fmt(g)}: {_pct(a)}" for g, a in zip(grid, accs, strict=True))
    d = {"grid": grid, "accuracy": accs, "attack": attack}
    for i in range(1, len(accs)):
        if accs[i] > accs[i - 1] + tol:
            return CheckResult(name, False, f"accuracy rises with {what} ({shown})",
                               "the attack does not converge: the model masks gradients, is "
                               "randomised or keeps state; use more restarts, EOT "
                               "(autoattack-rand) and adaptive attacks before trusting the "
                               "numbers", d)
    return CheckResult(name, True, f"accuracy does not rise with {what} ({shown})", details=d)


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def check_unbounded(model: nn.Module, x: Tensor, y: Tensor, norm: str = "linf",
                    attack: str = "pgd50", max_acc: float = 0.02, bounded: bool = True,
                    seed: int = 0) -> CheckResult:
    """An attack whose ε covers the whole image box (unbounded data: the points' range)
    reaches about 0% accuracy."""
    width = 1.0 if bounded else float(x.max() - x.min())
    big = width if norm == "linf" else width * math.sqrt(x[0].numel())
    acc = _robust_acc(model, attack, x, y, big, norm, seed, bounded)
    d = {"eps": big, "accuracy": acc, "attack": attack}
    if acc > max_acc:
        return CheckResult("unbounded", False, f"an unbounded attack leaves {_pct(acc)} correct",
                           "gradients do not lead the attack (masking, quantization, a "
                           "saturated softmax): attack a differentiable approximation (BPDA) "
                           "and check with the black-box Square attack", d)
    return CheckResult("unbounded", True, f"an unbounded attack leaves {_pct(acc)} correct",
                       details=d)


def check_square_vs_whitebox(model: nn.Module, x: Tensor, y: Tensor, eps: float,
                             norm: str = "linf", n_queries: int = 1000, steps: int = 100,
                             tol: float = 0.01, bounded: bool = True, seed: int = 0
                             ) -> CheckResult:
    """The black-box Square attack does not beat the white-box APGD-CE and APGD-T (AutoAttack's
    ``check_square_sr``)."""
    white = build_attack("autoattack", norm, attacks=["apgd-ce", "apgd-t"], steps=steps,
                         bounded=bounded, seed=seed)
    xw = white(model, x, y, eps)
    acc_w = float((_logits(model, xw).argmax(1) == y).float().mean())
    acc_s = _robust_acc(model, "square", x, y, eps, norm, seed, bounded, n_queries=n_queries)
    d = {"whitebox": acc_w, "square": acc_s, "n_queries": n_queries}
    if acc_s < acc_w - tol:
        return CheckResult("square_vs_whitebox", False, f"the black-box Square attack "
                           f"({_pct(acc_s)}) beats the white-box attacks ({_pct(acc_w)})",
                           "the gradients are misleading (gradient masking): the white-box "
                           "numbers overstate robustness; report the ensemble's worst case "
                           "and use adaptive attacks", d)
    return CheckResult("square_vs_whitebox", True, f"Square {_pct(acc_s)} ≥ white-box "
                       f"{_pct(acc_w)}", details=d)


#: name → function(model, x, y, eps, norm, quick, bounded, seed=0) running one check with its
#: default settings; ``seed`` seeds the attacks' random draws
CHECKS: dict[str, Callable[..., CheckResult]] = {
    "logits": lambda m, x, y, e, n, q, b, s=0: check_logits(m, x),
    "deterministic": lambda m, x, y, e, n, q, b, s=0: check_deterministic(m, x),
    "zero_gradients": lambda m, x, y, e, n, q, b, s=0: check_zero_gradients(m, x, y),
    "eps_zero": lambda m, x, y, e, n, q, b, s=0: check_eps_zero(m, x, y, n, bounded=b, seed=s),
    "monotone_eps": lambda m, x, y, e, n, q, b, s=0: check_monotone_eps(m, x, y, e, n,
                                                                        bounded=b, seed=s),
    "monotone_steps": lambda m, x, y, e, n, q, b, s=0: check_monotone_steps(m, x, y, e, n,
                                                                            bounded=b, seed=s),
    "unbounded": lambda m, x, y, e, n, q, b, s=0: check_unbounded(m, x, y, n, bounded=b,
                                                                  seed=s),
    "square_vs_whitebox": lambda m, x, y, e, n, q, b, s=0: check_square_vs_whitebox(
        m, x, y, e, n, n_queries=300 if q else 1000, steps=20 if q else 100, bounded=b, seed=s),
}
#: checks whose attacks only work inside the [0, 1] box
BOX_ONLY = ("square_vs_whitebox",)


def default_checks(bounded: bool = True) -> list[str]:
    """The checks that run by default: all, less :data:`BOX_ONLY` on unbounded data."""
    return [c for c in CHECKS if bounded or c not in BOX_ONLY]


def run_checks(model: nn.Module, x: Tensor, y: Tensor, eps: float, norm: str = "linf",
               names: list[str] | None = None, quick: bool = False, bounded: bool = True,
               seed: int = 0) -> list[CheckResult]:
    """Run the named checks (by default :func:`default_checks`) on the points ``x``, ``y``
    (images in [0, 1] unless ``bounded`` is False), the attacks' random draws seeded with
    ``seed``."""
    return [CHECKS[name](model, x, y, eps, norm, quick, bounded, seed)
            for name in (names or default_checks(bounded))]


__all__ = ["CHECKS", "CheckResult", "check_deterministic", "default_checks", "check_eps_zero", "check_logits",
           "check_monotone_eps", "check_monotone_steps", "check_square_vs_whitebox",
           "check_unbounded", "check_zero_gradients", "run_checks"]
