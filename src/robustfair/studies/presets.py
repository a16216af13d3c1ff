"""Study presets: the grids and training settings of the AT-on-AD code per dataset (Hu et al.,
ICML 2023; specs part_atad §2.3–2.4, ``process_data.py`` and ``train_*.py``).

``official`` keeps the official grids on the scalar mixture ±μ·1 + σz. There the ℓ2- and
ℓ∞-robust linear rules point in the Bayes direction and only the bias moves, so the second row of
Figure 1 (AT lowers standard accuracy) is ≈ 0. ``figure1`` keeps the grids and training settings but
draws the stable mixture from two groups of coordinates, 20 with small means and small noise and
80 with large means and large noise, so that the robust direction differs from the best one
(per α, closed-form standard-accuracy gap at R = 1, ε high→low, from
:mod:`robustfair.studies.oracle`):

========= ===================== ====================== ====== ================= =================
α         μ                     σ                      best   ℓ2 gap (points)   ℓ∞ gap (points)
========= ===================== ====================== ====== ================= =================
2         0.8 ×20, 2 ×80        2 ×20, 10 ×80          96.3%  3.7, 2.7, 1.3     6.6, 4.6, 0.8
1.5       0.4 ×20, 1 ×80        0.3 ×20, 1.5 ×80       97.1%  1.9, 1.6, 1.2     2.7, 2.7, 0.9
1         9 ×20, 20 ×80         1 ×20, 3 ×80           96.5%  1.1, 1.0, 0.7     1.2, 1.2, 1.2
========= ===================== ====================== ====== ================= =================
"""

from __future__ import annotations

import copy
from typing import Any

from ..data.stable_mixture import ALPHA_NAMES
from ..errors import UserError

#: learning rates tried for every cell; the one with the lowest clean validation loss is kept
LR_GRID = [0.1, 0.05, 0.01, 0.005, 0.001, 5e-4, 2e-4, 1e-4]
#: the CIFAR-10 adversarial-training grid
LR_GRID_CIFAR_AT = [5e-3, 1e-3, 5e-4, 2e-4, 1e-4]
SEEDS = [2, 22, 42, 62, 82]

#: ε per norm (largest first), as in the official analysis script
EPS_GRIDS: dict[str, dict[str, list[float]]] = {
    "gaussian": {"l2": [5.0, 3.75, 2.5], "linf": [1.0, 0.75, 0.5]},
    "cauchy": {"l2": [23.425, 17.5688, 11.7125], "linf": [14.403, 10.8023, 7.2015]},
    "cauchy_2": {"l2": [70.0, 52.5, 35.0], "linf": [53.0, 39.75, 26.5]},
    "holtsmark": {"l2": [2.94, 2.205, 1.47], "linf": [0.555, 0.4163, 0.2775]},
    "mnist": {"l2": [2.6956, 2.0217, 1.3478], "linf": [0.4341, 0.3256, 0.2171]},
    "fashion-mnist": {"l2": [3.2306, 2.4230, 1.6153], "linf": [0.2889, 0.2166, 0.1444]},
    "cifar10": {"l2": [0.9778, 0.8800, 0.7822], "linf": [0.0305, 0.0228, 0.0152]},
}

def _profile(*runs: tuple[float, int]) -> list[dict[str, float]]:
    return [{"value": v, "count": n} for v, n in runs]


#: the ``figure1`` data per α (d = 100), see the module docstring
FIGURE1_DATA: dict[float, dict[str, Any]] = {
    2.0: {"mu": _profile((0.8, 20), (2.0, 80)), "sigma": _profile((2.0, 20), (10.0, 80))},
    1.5: {"mu": _profile((0.4, 20), (1.0, 80)), "sigma": _profile((0.3, 20), (1.5, 80))},
    1.0: {"mu": _profile((9.0, 20), (20.0, 80)), "sigma": _profile((1.0, 20), (3.0, 80))},
}
PRESETS = ("official", "figure1")

_LINEAR_SGD = {"model": "linear", "train": {"optimizer": "sgd", "momentum": 0.0}}
_PRESETS: dict[str, dict[str, Any]] = {
    "stable-mixture": {"model": "linear", "train": {"optimizer": "adam"},
                       "ratios": [1, 2, 5, 10, 20]},
    "mnist-binary": {**_LINEAR_SGD, "eps_grid": "mnist"},
    "mnist5k-binary": {**_LINEAR_SGD, "eps_grid": "mnist"},
    "fashion-mnist-binary": {**_LINEAR_SGD, "eps_grid": "fashion-mnist"},
    "cifar10-binary": {"model": "mlp", "model_params": {"hidden": [200]},
                       "train": {"optimizer": "sgd", "momentum": 0.9},
                       "eps_grid": "cifar10", "lrs_robust": LR_GRID_CIFAR_AT},
}


def preset_names() -> list[str]:
    return sorted(_PRESETS)


def study_preset(dataset: str, alpha: float | None = None, preset: str = "official"
                 ) -> dict[str, Any]:
    """The study settings of the official code for ``dataset`` (a raw dict for
    :class:`~robustfair.studies.disparity.DisparityStudyConfig`). Unknown datasets get the
    linear/Adam defaults and must be given an ε grid. ``preset="figure1"``: the stable mixture
    whose robust direction differs from the best one (module docstring)."""
    if preset not in PRESETS:
        raise UserError(f"--preset: unknown preset {preset!r}; use one of {', '.join(PRESETS)}")
    if preset == "figure1" and dataset != "stable-mixture":
        raise UserError("--preset figure1 applies to --dataset stable-mixture only")
    base = _PRESETS.get(dataset, {"model": "linear"})
    raw: dict[str, Any] = {"dataset": dataset, "ratios": [1, 2, 5, 10], "seeds": list(SEEDS),
                           "lrs_standard": list(LR_GRID), "lrs_robust": list(LR_GRID),
                           "preset": preset}
    raw.update(copy.deepcopy({k: v for k, v in base.items() if k != "eps_grid"}))
    grid = base.get("eps_grid")
    if dataset == "stable-mixture":
        a = 2.0 if alpha is None else float(alpha)
        raw["data_params"] = {"alpha": a}
        if preset == "figure1":
            if a not in FIGURE1_DATA:
                raise UserError(f"--preset figure1 has data for alpha 2, 1.5 and 1, not {a:g}")
            raw["data_params"].update(copy.deepcopy(FIGURE1_DATA[a]))
        grid = ALPHA_NAMES.get(a)
    if grid is not None:
        raw["eps"] = {k: list(v) for k, v in EPS_GRIDS[grid].items()}
    return raw
