"""Study presets: the grids and training settings of the AT-on-AD code per dataset (Hu et al.,
ICML 2023; specs part_atad §2.3–2.4, ``process_data.py`` and ``train_*.py``)."""

from __future__ import annotations

from typing import Any

from ..data.stable_mixture import ALPHA_NAMES

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


def study_preset(dataset: str, alpha: float | None = None) -> dict[str, Any]:
    """The study settings of the official code for ``dataset`` (a raw dict for
    :class:`~robustfair.studies.disparity.DisparityStudyConfig`). Unknown datasets get the
    linear/Adam defaults and must be given an ε grid."""
    base = _PRESETS.get(dataset, {"model": "linear"})
    raw: dict[str, Any] = {"dataset": dataset, "ratios": [1, 2, 5, 10], "seeds": list(SEEDS),
                           "lrs_standard": list(LR_GRID), "lrs_robust": list(LR_GRID)}
    raw.update({k: v for k, v in base.items() if k != "eps_grid"})
    grid = base.get("eps_grid")
    if dataset == "stable-mixture":
        a = 2.0 if alpha is None else float(alpha)
        raw["data_params"] = {"alpha": a}
        grid = ALPHA_NAMES.get(a)
    if grid is not None:
        raw["eps"] = {k: list(v) for k, v in EPS_GRIDS[grid].items()}
    return raw
