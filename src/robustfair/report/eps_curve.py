"""Robust accuracy against the perturbation radius ε, per class.

A handful of attacks (PGD by default) at radii ``factor · ε`` on a class-stratified subset of
the evaluation split (the same images as ``robustfair eval --n``). The curve shows how fast each
class loses accuracy as ε grows; a class whose accuracy does not fall towards zero for large ε hints at gradient masking (Athalye et al.,
"Obfuscated Gradients Give a False Sense of Security", ICML 2018, arXiv 1802.00420, §3.1).
The result is saved as ``eval/eps_curve.json`` and reused while the checkpoint is unchanged.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..engine.io import atomic_write_json
from ..metrics.classwise import class_summary

log = logging.getLogger("robustfair")

DEFAULT_FACTORS = (0.0, 0.25, 0.5, 1.0, 1.5, 2.0)


def load_run_model(run_dir: Path, which: str | None = None
                   ) -> tuple[Any, Any, Any, torch.device]:
    """(model, data bundle, config, device) of a trained run: the model that ``robustfair eval``
    evaluates (EMA or averaged weights where the run evaluates those) from
    ``checkpoints/WHICH.pt`` (default: the run's ``eval.checkpoint``)."""
    from ..commands.evaluate import load_run

    t = load_run(run_dir, None, which)
    return t.model, t.data, t.cfg, t.device


def compute_eps_curve(run_dir: Path, factors: Sequence[float] = DEFAULT_FACTORS,
                      attack: str = "pgd10", n: int = 200, which: str | None = None,
                      progress: Any = None) -> dict[str, Any]:
    """Accuracy per class under ``attack`` at ``factor · ε`` for each factor (ε = the run's
    evaluation ε, else its training ε), on ``n`` stratified samples of the evaluation split,
    for the model of ``checkpoints/WHICH.pt`` (default: the run's ``eval.checkpoint``).

    ``progress`` (optional) is called with the number of finished attack runs."""
    from ..engine.evaluator import evaluate

    from ..commands.evaluate import load_run
    from ..engine.protocol import eval_eps_norm
    from ..engine.subset import eval_subset

    target = load_run(run_dir, None, which)
    model, data, cfg, device = target.model, target.data, target.cfg, target.device
    which = Path(target.fingerprint["checkpoint"]).stem
    subset, images = eval_subset(data.split(cfg.eval.split), n, name=cfg.eval.split)
    base, norm = eval_eps_norm(cfg)
    eps_list = [float(f) * float(base) for f in factors]
    per_class, avg, worst = [], [], []
    for e in eps_list:
        spec = attack if e > 0 else "clean"
        res = evaluate(model, subset, [spec], e, norm, data.num_classes, cfg.eval.batch_size,
                       cfg.eval.step_size, device=device, seed=cfg.seed, bounded=data.bounded)
        s = class_summary(res.correct[0], res.labels, data.num_classes)
        per_class.append(s["per_class"])
        avg.append(s["avg"])
        worst.append(s.get("worst"))
        if progress is not None:
            progress(1)
    return {
        "attack": attack, "norm": norm, "base_eps": float(base), "factors": list(factors),
        "eps": eps_list, "n": int(len(subset)), "split": cfg.eval.split, "seed": cfg.seed,
        "subset": images,
        "checkpoint": which, "checkpoint_sha256": checkpoint_sha(run_dir, which),
        "counts": torch.bincount(subset.y.cpu(), minlength=data.num_classes).tolist(),
        "avg": avg, "worst": worst, "per_class": per_class,
    }


def checkpoint_sha(run_dir: Path, which: str = "last") -> str | None:
    """The sha256 that ``checkpoints/WHICH.json`` records (None when there is none)."""
    side = run_dir / "checkpoints" / f"{which}.json"
    if not side.exists():
        return None
    import json

    try:
        return json.loads(side.read_text(encoding="utf-8")).get("sha256")
    except (OSError, ValueError):
        return None


def is_current(curve: dict[str, Any], run_dir: Path, factors: Sequence[float], attack: str,
               n: int) -> bool:
    """Whether a saved curve was made with these settings from the present checkpoint of the
    run's ``eval.checkpoint``."""
    return (curve.get("checkpoint") == _eval_checkpoint(run_dir)
            and curve.get("checkpoint_sha256") == checkpoint_sha(run_dir, curve.get("checkpoint", "last"))
            and curve.get("attack") == attack and list(curve.get("factors", [])) == list(factors)
            and curve.get("requested_n", curve.get("n")) == n)


def _eval_checkpoint(run_dir: Path) -> str:
    """The run's ``eval.checkpoint`` ('last' when its config cannot be read)."""
    import yaml

    try:
        raw = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))
        return str(((raw or {}).get("eval") or {}).get("checkpoint") or "last")
    except (OSError, yaml.YAMLError, AttributeError):
        return "last"


def eps_curve_for_report(run_dir: Path, saved: dict[str, Any] | None, factors: Sequence[float],
                         attack: str, n: int, progress: Any = None,
                         recompute: bool = False) -> dict[str, Any]:
    """The saved curve when it is current (or was not made by this module), else a new one
    computed and saved to ``eval/eps_curve.json``."""
    if saved is not None and not recompute and (
            "checkpoint_sha256" not in saved or is_current(saved, run_dir, factors, attack, n)):
        return saved
    curve = compute_eps_curve(run_dir, factors, attack, n, progress=progress)
    curve["requested_n"] = n
    atomic_write_json(run_dir / "eval" / "eps_curve.json", curve)
    log.debug("saved %s", run_dir / "eval" / "eps_curve.json")
    return curve
