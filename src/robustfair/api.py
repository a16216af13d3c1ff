"""The Python API: evaluate any PyTorch classifier per class, load a run, train a run.

    >>> import robustfair as rf
    >>> res = rf.evaluate(model, x, y, eps=8/255, norm="linf", attacks=["clean", "pgd20"])
    >>> print(res.table())          # accuracy per class under each attack
    >>> res.summary()["attacks"]["pgd20"]["worst"]
    >>> res.save("my-eval")         # the files of `robustfair eval`

Models take images in [0, 1] and return logits; normalization belongs inside the model (the
RobustBench convention). Evaluation is the routine of ``robustfair eval`` (the same images for a
given ``n``, each attack seeded from (seed, attack, batch)), so a figure from Python and one from
the command line agree.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from .errors import UserError

__all__ = ["Evaluation", "Run", "evaluate", "load_run", "train"]


class Evaluation:
    """The result of :func:`evaluate`: a per-sample matrix ``correct[attack, sample]`` and every
    figure derived from it.

    Attributes:
        result: the :class:`~robustfair.engine.evaluator.EvalResult` (matrix, predictions,
            labels, groups, settings).
    """

    def __init__(self, result: Any) -> None:
        self.result = result

    def summary(self) -> dict[str, Any]:
        """The dictionary that ``robustfair eval`` writes as ``summary.json``: per attack the
        per-class accuracy, average, worst class, gap and std; the settings (ε, norm, seed,
        attacks, images)."""
        return self.result.summary()

    def table(self) -> str:
        """The per-class table (rows: classes, columns: attacks) as ``robustfair eval`` prints
        it, and a line saying which images were evaluated."""
        from .commands.evaluate import images_line, render

        summary = self.summary()
        return render(summary, "accuracy (%) per class") + f"\nimages: {images_line(summary)}"

    def accuracy(self, attack: str = "clean") -> float:
        """Average accuracy under ``attack`` (a fraction)."""
        return float(self.result.row(attack).float().mean())

    def save(self, folder: str | Path) -> Path:
        """Write ``summary.json`` and ``summary_matrix.npz`` into ``folder`` (an evaluation with
        other settings already there is kept, as ``robustfair eval`` does); return the path of
        the summary written."""
        from .engine.record import record_evaluation

        _, where = record_evaluation(Path(folder), self.result)
        return where / "summary.json"

    def __repr__(self) -> str:
        rows = ", ".join(f"{a} {100 * self.accuracy(a):.1f}%" for a in self.result.attacks
                         if "/" not in a)
        return f"Evaluation({len(self.result.labels)} images: {rows})"


def evaluate(model: nn.Module, data: Any, y: Tensor | None = None, *, eps: float,
             norm: str = "linf", attacks: Sequence[str] = ("clean", "pgd20"),
             n: int | None = None, seed: int = 0, batch_size: int = 500,
             step_size: float | None = None, num_classes: int | None = None,
             class_names: Sequence[str] | None = None, groups: Tensor | None = None,
             data_root: str | None = None, device: torch.device | str | None = None,
             bounded: bool | None = None, quiet: bool = True,
             precision: str = "fp32") -> Evaluation:
    """Evaluate ``model`` per class under each attack.

    Args:
        model: a classifier taking images in [0, 1] (normalization inside) and returning logits.
        data: images ``x`` (N, C, H, W) float in [0, 1] or uint8, with labels ``y``; or a
            ``DataLoader`` yielding ``(x, y)`` or ``(x, y, group)``; or a dataset name (see
            ``robustfair datasets``), whose test split is used.
        y: the labels when ``data`` holds images.
        eps: the budget ε (e.g. ``8/255``).
        norm: ``"linf"`` or ``"l2"``.
        attacks: attack names, e.g. ``["clean", "pgd20", "cw20", "autoattack"]`` (see
            ``robustfair attacks``), or attack objects (an AutoAttack with other components or
            budgets is named ``autoattack-custom-…``).
        n: evaluate a class-stratified subset of ``n`` images (the same as ``robustfair eval
            --n``); default all.
        seed: seed of the attacks' random draws (per attack and batch; an attack object given
            its own ``seed`` keeps it).
        batch_size: images attacked at once.
        step_size: PGD step size (default: each attack's own).
        num_classes: number of classes (default: from the labels, or the dataset's).
        class_names: names shown in the table.
        groups: a group label per image (demographic groups): adds the group figures.
        data_root: folder of the dataset files when ``data`` is a dataset name.
        device: where to attack (default: the model's device).
        bounded: whether the inputs are images in [0, 1] that attacks keep in that box (default:
            the dataset's setting for a dataset name, else True); ``False`` for data that are
            not images (e.g. ``fairbatch-synthetic``), where only attacks that need no box run.
        quiet: no progress bars.
        precision: ``"fp32"``, ``"bf16"`` or ``"auto"`` (bf16 on CUDA with bf16 support): the
            precision of the attacks' own passes; bf16 is kept for a row only where a check on
            its first batch against fp32 agrees, and verdicts are always fp32 (see
            ``settings["precision"]`` in the summary).

    Returns:
        An :class:`Evaluation` (``.table()``, ``.summary()``, ``.save(DIR)``).
    """
    from .engine.protocol import evaluate_images, state_sha256

    split, info = _as_split(data, y, groups, data_root, bounded)
    if bounded is None:
        bounded = info.get("bounded", True)
    c = num_classes or info.get("num_classes") or int(split.y.max()) + 1
    names = list(class_names or info.get("class_names") or [str(k) for k in range(c)])
    if device is not None:
        model = model.to(device)
    res, _ = evaluate_images(
        model, split, list(attacks), float(eps), norm, n=n, seed=seed, batch_size=batch_size,
        step_size=step_size, num_classes=c, device=torch.device(device) if device else None,
        describe={"dataset": info.get("dataset", "arrays"), "split": "test",
                  "model": type(model).__name__, "class_names": names,
                  "group_names": info.get("group_names", [])}, quiet=quiet, bounded=bounded,
        fingerprint={"sha256": state_sha256(model), "weights": "as given"}, precision=precision)
    return Evaluation(res)


def _as_split(data: Any, y: Tensor | None, groups: Tensor | None, data_root: str | None,
              bounded: bool | None = None) -> tuple[Any, dict[str, Any]]:
    """An ArrayData from tensors, a DataLoader or a dataset name; and what is known about it."""
    from .data.core import ArrayData

    if isinstance(data, str):
        from .config import DataConfig
        from .data import load_data

        bundle = load_data(DataConfig(name=data, root=data_root))
        return bundle.test, {"dataset": data, "num_classes": bundle.num_classes,
                             "class_names": bundle.class_names,
                             "group_names": bundle.group_names, "bounded": bundle.bounded}
    if isinstance(data, ArrayData):
        return data, {}
    if isinstance(data, Tensor):
        if y is None:
            raise UserError("give the labels: evaluate(model, x, y, eps=...)")
        x = data.detach().cpu()
    elif isinstance(data, Iterable):
        x, y, found = _collect(data)
        groups = found if found is not None else groups
    else:
        raise UserError(f"data must be images with labels, a DataLoader or a dataset name, not "
                        f"{type(data).__name__}")
    if bounded is not False and x.dtype != torch.uint8 and len(x) and (
            float(x.min()) < 0 or float(x.max()) > 1):
        raise UserError(f"images must be in [0, 1] (found {float(x.min()):.3g} to "
                        f"{float(x.max()):.3g}); divide by 255 or undo the normalization and "
                        f"put it inside the model (or pass bounded=False for data that are "
                        f"not images)")
    return ArrayData(x, torch.as_tensor(y).cpu(),
                     None if groups is None else torch.as_tensor(groups).cpu()), {}


def _collect(loader: Iterable[Any]) -> tuple[Tensor, Tensor, Tensor | None]:
    xs, ys, gs = [], [], []
    for batch in loader:
        if not isinstance(batch, list | tuple) or len(batch) < 2:
            raise UserError("the DataLoader must yield (images, labels) or (images, labels, "
                            "groups)")
        xs.append(batch[0].detach().cpu())
        ys.append(torch.as_tensor(batch[1]).cpu())
        if len(batch) > 2:
            gs.append(torch.as_tensor(batch[2]).cpu())
    if not xs:
        raise UserError("the DataLoader yields no batch")
    return torch.cat(xs), torch.cat(ys), torch.cat(gs) if gs else None


class Run(NamedTuple):
    """A trained run: its resolved config, the model it evaluates (EMA or averaged weights
    where the run evaluates those), its data, and where it lives."""

    config: Any
    model: nn.Module
    data: Any
    run_dir: Path


def load_run(run_dir: str | Path, which: str | None = None,
             overrides: Sequence[str] = ()) -> Run:
    """Load a run directory made by ``robustfair train``: ``config, model, data, path =
    rf.load_run("runs/NAME")``. ``which`` is ``"last"`` or ``"best"`` (default: the run's
    ``eval.checkpoint``); ``overrides`` are ``KEY=VALUE`` settings as in ``--set``."""
    from .commands.evaluate import load_run as _load

    t = _load(Path(run_dir), list(overrides), which)
    return Run(t.cfg, t.model, t.data, Path(run_dir))


def train(config: Any, *, overrides: Sequence[str] = (), run_dir: str | Path | None = None,
          resume: bool = False, force: bool = False, evaluate: bool = True,
          quiet: bool = True) -> Path:
    """Train a run as ``robustfair train`` does and return its directory.

    ``config`` is a YAML file, a shipped recipe name (see ``robustfair recipes``), a dict of
    settings or a :class:`~robustfair.config.RunConfig`; ``overrides`` are ``KEY=VALUE`` as in
    ``--set``. The final evaluation (``evaluate=True``) is saved in ``RUN/eval/``."""
    from .commands.run import train_run
    from .config import RunConfig, apply_override, build_config, load_config

    if isinstance(config, RunConfig):
        raw = config.model_dump(mode="json")
    elif isinstance(config, dict):
        raw = dict(config)
    else:
        path = Path(str(config))
        cfg = load_config(str(path), None, list(overrides)) if path.suffix in (
            ".yaml", ".yml") or path.exists() else load_config(None, str(config),
                                                               list(overrides))
        overrides, raw = (), None
    if raw is not None:
        for ov in overrides:
            apply_override(raw, ov)
        cfg = build_config(raw)
    path, _ = train_run(cfg, Path(run_dir) if run_dir is not None else None, resume=resume,
                        force=force, quiet=quiet, evaluate=evaluate)
    return path
