"""The one evaluation routine: training's final evaluation, ``robustfair eval``, the leaderboard
and the Python API all call :func:`evaluate_split`, so one checkpoint and seed give one number.

    split ─► class-stratified subset of eval.n (engine/subset.py) ─► staged attacks, each batch
    seeded from (seed, attack, batch) (engine/staged.py) ─► EvalResult + settings (images,
    ε, norm, seed, attacks, versions) ─► the run's record of evaluations (engine/record.py)
"""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .evaluator import EvalResult
from .subset import eval_subset

STATE_FILE = "eval_state.json"


def package_versions(device: torch.device | str | None = None) -> dict[str, str]:
    """The versions that decide a result: robustfair, torch, Python, and the device kind (e.g.
    ``cpu`` or ``cuda: NVIDIA H100``) when ``device`` is given."""
    from .. import __version__

    out = {"robustfair": __version__, "torch": torch.__version__,
           "python": platform.python_version()}
    if device is not None:
        device = torch.device(device)
        kind = device.type
        if device.type == "cuda" and torch.cuda.is_available():
            kind += f": {torch.cuda.get_device_name(device)}"
        out["device"] = kind
    return out


def state_sha256(model: nn.Module) -> str:
    """sha256 of a model's state dict (names, dtypes, shapes and bytes, in name order): two
    models with other weights get other fingerprints."""
    import hashlib

    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def trainer_eval_model(trainer: Any) -> tuple[nn.Module, str]:
    """The model that evaluation uses from a trainer's present state, and which weights it
    holds: ``averaged`` (the policy's, e.g. CFA), ``ema`` (``train.ema.evaluate``) or ``raw``."""
    model = trainer.policy_eval_model()
    if model is not None:
        return model, "averaged"
    if trainer.ema is not None and trainer.cfg.train.ema.evaluate:
        return trainer.ema.copy_into(trainer.model), "ema"
    return trainer.eval_model(), "raw"


def eval_eps_norm(cfg: Any) -> tuple[float, str]:
    """ε and norm of the evaluation: ``eval.eps``/``eval.norm``, else the training attack's."""
    ev = cfg.eval
    return (float(ev.eps if ev.eps is not None else cfg.attack.eps),
            ev.norm or cfg.attack.norm)


def evaluate_split(model: nn.Module, data: Any, cfg: Any, out_dir: Path | None = None, *,
                   attacks: list[str] | None = None, device: torch.device | None = None,
                   fingerprint: dict[str, Any] | None = None, resume: bool = False,
                   quiet: bool = True, primary: bool = False
                   ) -> tuple[EvalResult, Path | None]:
    """Evaluate ``model`` on ``cfg.eval``'s split and images of ``data`` (a DataBundle) with
    ``attacks`` (default ``cfg.eval.attacks``); see :func:`evaluate_images`."""
    ev = cfg.eval
    eps, norm = eval_eps_norm(cfg)
    return evaluate_images(
        model, data.split(ev.split), attacks or ev.attacks, eps, norm, n=ev.n, seed=cfg.seed,
        batch_size=ev.batch_size, step_size=ev.step_size, num_classes=data.num_classes,
        describe={"dataset": cfg.data.name, "split": ev.split, "model": cfg.model.name,
                  "class_names": data.class_names, "group_names": data.group_names},
        out_dir=out_dir, device=device, fingerprint=fingerprint, resume=resume, quiet=quiet,
        primary=primary, bounded=data.bounded, layout=ev.layout,
        precision=ev.precision, fold_bn=ev.fold_batchnorm)


def evaluate_images(model: nn.Module, split: Any, attacks: list[str], eps: float, norm: str, *,
                    n: int | None = None, seed: int = 0, batch_size: int = 500,
                    step_size: float | None = None, num_classes: int | None = None,
                    describe: dict[str, Any] | None = None, out_dir: Path | None = None,
                    device: torch.device | None = None,
                    fingerprint: dict[str, Any] | None = None, resume: bool = False,
                    quiet: bool = True, primary: bool = False, bounded: bool = True,
                    layout: str = "auto", precision: str = "fp32", fold_bn: bool = True
                    ) -> tuple[EvalResult, Path | None]:
    """Evaluate ``model`` on the class-stratified subset of ``n`` images of ``split`` (an
    ArrayData) with ``attacks``; add the result to the record in ``out_dir`` (see
    :mod:`robustfair.engine.record`) when given. Returns the :class:`EvalResult` and the
    ``summary.json`` it was added to (None without ``out_dir``)."""
    from . import distributed
    from .staged import evaluate_staged

    describe = dict(describe or {})
    split, subset = eval_subset(split, n, name=describe.get("split", "test"))
    device = device or next(model.parameters()).device
    fp = {**(fingerprint or {}), "dataset": describe.get("dataset"),
          "split": describe.get("split"), "images": subset["sha256"]}
    # a distributed evaluation is not resumable: its batches are spread over the processes
    state = Path(out_dir) / STATE_FILE if out_dir is not None and not distributed.active() \
        else None
    writes = out_dir is not None and distributed.rank() == 0  # the first process writes
    if writes:  # before the work: a folder that cannot be written, or a damaged record
        from .io import probe_writable
        from .record import check_record

        probe_writable(out_dir)
        check_record(Path(out_dir))
    from .lock import eval_lock

    with eval_lock(out_dir or ".", enabled=writes):  # one evaluation writes a folder at once
        res = evaluate_staged(model, split, attacks, eps, norm, num_classes, batch_size,
                              step_size, device, seed, state_path=state, resume=resume,
                              fingerprint=fp, quiet=quiet or distributed.rank() != 0,
                              bounded=bounded, layout=layout, precision=precision,
                              fold_bn=fold_bn)
        res.settings.update({**describe, "batch_size": batch_size, "step_size": step_size,
                             "subset": subset, "versions": package_versions(device),
                             **(fingerprint or {})})
        saved = None
        if writes:
            from .record import record_evaluation

            _, folder = record_evaluation(Path(out_dir), res, primary=primary)
            saved = folder / "summary.json"
    distributed.barrier()
    return res, saved


__all__ = ["STATE_FILE", "eval_eps_norm", "evaluate_images", "evaluate_split",
           "package_versions", "state_sha256", "trainer_eval_model"]
