"""Models of the RobustBench zoo (Croce et al., "RobustBench: a standardized adversarial
robustness benchmark", NeurIPS 2021 Datasets and Benchmarks, arXiv:2010.09670), loaded offline.

The architecture comes from the ``robustbench`` package (``pip install robustfair[robustbench]``),
the weights from its usual local layout ``MODEL_DIR/DATASET/THREAT/NAME.pt`` (``models/`` by
default, e.g. ``models/cifar10/Linf/Carmon2019Unlabeled.pt``), read with ``weights_only`` (no
code in the file runs) and loaded strictly (only normalization buffers that the file lacks keep
the values the constructor gave them). A zoo model takes images in [0, 1] and normalizes
inside, so it is evaluated like any robustfair model.

Only ``robustbench.model_zoo`` is imported: the package's top level also imports its data
loaders (``pkg_resources``, gone from recent setuptools) and the ``autoattack`` package, which
the zoo does not need.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from difflib import get_close_matches
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import UserError

THREATS = {"linf": "Linf", "l2": "L2"}
#: the RobustBench leaderboards' budgets
DEFAULT_EPS = {"linf": 8 / 255, "l2": 0.5}
INSTALL = "pip install 'robustfair[robustbench]'"


def zoo_module() -> Any:
    """``robustbench.model_zoo`` (see the module docstring); a :class:`UserError` naming the
    install command when the package is absent."""
    if "robustbench.model_zoo" in sys.modules:
        return sys.modules["robustbench.model_zoo"]
    spec = importlib.util.find_spec("robustbench")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"--robustbench needs the robustbench package; {INSTALL}")
    had_parent = "robustbench" in sys.modules
    if not had_parent:  # a bare parent package, so that robustbench/__init__.py does not run
        parent = importlib.util.module_from_spec(spec)
        sys.modules["robustbench"] = parent
    try:
        return importlib.import_module("robustbench.model_zoo")
    except ImportError as exc:
        raise UserError(f"the robustbench model zoo cannot be imported ({exc}); "
                        f"{INSTALL}") from None
    finally:
        if not had_parent:
            sys.modules.pop("robustbench", None)  # a later `import robustbench` runs its own


def weights_path(name: str, dataset: str, threat: str, model_dir: str | Path = "models") -> Path:
    """``MODEL_DIR/DATASET/THREAT/NAME.pt``, RobustBench's layout."""
    return Path(model_dir) / dataset / THREATS[threat] / f"{name}.pt"


def zoo_entry(name: str, dataset: str, threat: str) -> dict[str, Any]:
    """The zoo's record of ``name`` (its ``model`` constructor among others)."""
    zoo = zoo_module()
    from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel

    datasets = [d.value for d in BenchmarkDataset]
    if dataset not in datasets:
        raise UserError(f"RobustBench has no dataset {dataset!r}; use one of "
                        f"{', '.join(datasets)}")
    if threat not in THREATS:
        raise UserError(f"unknown threat {threat!r}; use one of {', '.join(THREATS)}")
    models = zoo.model_dicts[BenchmarkDataset(dataset)].get(ThreatModel(THREATS[threat]), {})
    if name not in models:
        close = get_close_matches(name, list(models), n=3)
        hint = f"did you mean {', '.join(close)}?" if close else \
            f"{len(models)} models exist for {dataset} {threat}"
        raise UserError(f"RobustBench has no model {name!r} for {dataset} {threat}; {hint}")
    return dict(models[name])


def load_zoo_model(name: str, dataset: str, threat: str,
                   model_dir: str | Path = "models") -> tuple[nn.Module, Path]:
    """The zoo model ``name`` with its weights from ``model_dir`` (see the module docstring),
    in eval mode; and the weights file."""
    from ..engine.io import load_checkpoint
    from .loading import load_strict, state_dict_of

    entry = zoo_entry(name, dataset, threat)
    path = weights_path(name, dataset, threat, model_dir)
    if not path.exists():
        raise UserError(f"no weights for {name} at {str(path)!r}; download them where internet "
                        f"is available (robustbench.utils.load_model({name!r}, "
                        f"dataset={dataset!r}, threat_model={THREATS[threat]!r})) and copy the "
                        f"file there, or give --model-dir DIR")
    if not callable(entry.get("model")):
        raise UserError(f"RobustBench model {name!r} is an ensemble or has no architecture "
                        f"entry; it cannot be loaded from a single file")
    with torch.device("cpu"):
        model = entry["model"]()
    state = load_checkpoint(path, map_location="cpu")
    if isinstance(state.get("last"), dict):  # a few zoo files keep {'last': …, 'best': …}
        state = state["last"]
    state = with_normalization_buffers(model, state_dict_of(state))
    load_strict(model, state, f"RobustBench model {name!r}",
                f"check that {str(path)!r} holds the weights of {name}")
    return model.eval(), path


_NORM_BUFFERS = ("mu", "sigma", "mean", "std")


def with_normalization_buffers(model: nn.Module, state: dict[str, torch.Tensor]
                               ) -> dict[str, torch.Tensor]:
    """``state`` with the normalization buffers it lacks (``mu``/``sigma``, ``mean``/``std``,
    ``normalize.*``) taken from ``model``, whose constructor set them: RobustBench's files omit
    them for some models (RobustBench itself loads with ``strict=False``). Every other missing
    key is left missing, so strict loading still names it."""
    buffers = dict(model.named_buffers())
    extra = {k: v for k, v in buffers.items() if k not in state and (
        k.rsplit(".", 1)[-1] in _NORM_BUFFERS or k.startswith("normalize.")
        or ".normalize." in k)}
    return {**state, **extra} if extra else state


__all__ = ["DEFAULT_EPS", "THREATS", "load_zoo_model", "weights_path",
           "with_normalization_buffers", "zoo_entry", "zoo_module"]
