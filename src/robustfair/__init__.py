"""robustfair: train and evaluate image classifiers that are adversarially robust and fair.

A training method is four parts chosen by name: an objective (what loss), a budget (how large a
perturbation, per sample and per pixel), weights or an adaptive policy (how much each sample
counts), and a sampler (which samples form a batch).

The Python API (the same routines as the command line)::

    import robustfair as rf
    res = rf.evaluate(model, x, y, eps=8/255, norm="linf", attacks=["clean", "autoattack"])
    print(res.table())                    # accuracy per class under each attack
    res.save("my-eval")                   # summary.json + summary_matrix.npz
    config, model, data, path = rf.load_run("runs/NAME")
    path = rf.train("mnist5k-trades")     # a recipe, a YAML file or a dict of settings
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = ["Evaluation", "Run", "__version__", "evaluate", "load_run", "train"]


def __getattr__(name: str) -> Any:
    """The API is imported on first use, so that ``import robustfair`` stays light."""
    if name in ("Evaluation", "Run", "evaluate", "load_run", "train"):
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'robustfair' has no attribute {name!r}")
