"""Evaluation: a list of attacks → one boolean matrix ``correct[attack, sample]`` plus labels,
predictions and groups; every figure is derived from it, and it is saved beside the summary."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..attacks import Attack, build_attack
from ..attacks.base import eval_mode
from ..metrics import class_summary
from .io import atomic_write_bytes, atomic_write_json, pending_path, write_error


@dataclass
class EvalResult:
    attacks: list[str]
    correct: Tensor  # (A, N) bool
    pred: Tensor  # (A, N) int
    labels: Tensor  # (N,)
    num_classes: int
    groups: Tensor | None = None
    settings: dict[str, Any] = field(default_factory=dict)

    def row(self, attack: str) -> Tensor:
        return self.correct[self.attacks.index(attack)]

    def worst_case(self) -> Tensor:
        """Per-sample worst case over every attack (clean included)."""
        return self.correct.all(0)

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"settings": self.settings, "n": int(len(self.labels)),
                               "num_classes": self.num_classes, "attacks": {}}
        # a row "PARENT/STAGE" is the cumulative result of an ensemble (AutoAttack) after STAGE
        main = [i for i, a in enumerate(self.attacks) if "/" not in a]
        for i in main:
            out["attacks"][self.attacks[i]] = class_summary(self.correct[i], self.labels,
                                                            self.num_classes)
        adv = [i for i in main if self.attacks[i] != "clean"]
        if len(adv) > 1:
            out["worst_case"] = class_summary(self.correct[adv].all(0), self.labels,
                                              self.num_classes)
            out["worst_case"]["over"] = [self.attacks[i] for i in adv]
        for i, a in enumerate(self.attacks):
            if "/" in a:
                parent, stage = a.split("/", 1)
                out.setdefault("stages", {}).setdefault(parent, {})[stage] = class_summary(
                    self.correct[i], self.labels, self.num_classes)
        out["confusion"] = {self.attacks[i]: self.confusion(self.attacks[i]).tolist()
                            for i in main}
        for hook in SUMMARY_HOOKS:
            hook(self, out)
        return out

    def confusion(self, attack: str) -> Tensor:
        """Confusion matrix (true × predicted) under ``attack``."""
        i = self.attacks.index(attack)
        c = self.num_classes
        flat = self.labels.long() * c + self.pred[i].long()
        return torch.bincount(flat, minlength=c * c).reshape(c, c)

    def save(self, folder: str | Path, name: str = "summary") -> dict[str, Any]:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        summ = self.summary()
        import io

        buf = io.BytesIO()
        arrays = {
            "attacks": np.array(self.attacks),
            "correct": self.correct.cpu().numpy(),
            "pred": self.pred.cpu().numpy().astype(np.int32),
            "labels": self.labels.cpu().numpy().astype(np.int32),
            "num_classes": np.array(self.num_classes),
        }
        if self.groups is not None:
            arrays["groups"] = self.groups.cpu().numpy().astype(np.int32)
        np.savez_compressed(buf, **arrays)
        # the pair or neither: the matrix waits beside the old one until the summary is written
        matrix = folder / f"{name}_matrix.npz"
        pending = pending_path(matrix)
        atomic_write_bytes(pending, buf.getvalue(), shown=matrix)
        try:
            atomic_write_json(folder / f"{name}.json", summ)
        except BaseException:
            pending.unlink(missing_ok=True)
            raise
        try:
            os.replace(pending, matrix)
        except OSError as exc:
            raise write_error(matrix, exc) from None
        return summ

    @classmethod
    def load(cls, path: str | Path, settings: dict[str, Any] | None = None) -> EvalResult:
        with np.load(path, allow_pickle=False) as z:
            groups = torch.from_numpy(z["groups"]).long() if "groups" in z else None
            return cls(
                [str(a) for a in z["attacks"]],
                torch.from_numpy(z["correct"]),
                torch.from_numpy(z["pred"]).long(),
                torch.from_numpy(z["labels"]).long(),
                int(z["num_classes"]),
                groups,
                settings or {},
            )


#: functions ``hook(result, summary_dict)`` that add figures (e.g. group metrics) to a summary
SUMMARY_HOOKS: list[Callable[[EvalResult, dict[str, Any]], None]] = []


def predict(model: nn.Module, x: Tensor, batch_size: int = 1000) -> Tensor:
    with eval_mode(model), torch.no_grad():
        return torch.cat([model(x[i : i + batch_size]).argmax(1) for i in
                          range(0, len(x), batch_size)]) if len(x) else torch.zeros(0).long()


def evaluate(
    model: nn.Module,
    data: Any,
    attacks: Sequence[str | Attack],
    eps: float,
    norm: str = "linf",
    num_classes: int | None = None,
    batch_size: int = 500,
    step_size: float | None = None,
    device: torch.device | str | None = None,
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
    bounded: bool = True,
) -> EvalResult:
    """Run every attack on every sample of ``data`` (an :class:`ArrayData`); ``bounded``:
    inputs are images in [0, 1] (attacks clip), else unbounded (``DataBundle.bounded``).
    torch's generator is seeded with ``seed``; a stochastic attack's own generator (APGD, FAB,
    Square, AutoAttack) with a seed per (seed, attack, first image of the batch) unless the
    attack was given its own ``seed``."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    built: list[Attack] = [
        a if isinstance(a, Attack) else build_attack(a, norm, step_size, bounded=bounded)
        for a in attacks
    ]
    names = [a.name for a in built]
    n = len(data)
    correct = torch.zeros(len(built), n, dtype=torch.bool)
    pred = torch.zeros(len(built), n, dtype=torch.long)
    num_classes = num_classes or int(data.y.max()) + 1
    from . import distributed

    order = torch.arange(n)
    if distributed.active():  # each process attacks its share; the matrix is summed after
        order = order[distributed.rank() :: distributed.world_size()]
    from .staged import attack_seeded, batch_seed, derives_seed, describe_seeded

    derive = [derives_seed(a) for a in built]
    gen_state = torch.get_rng_state()
    torch.manual_seed(seed + distributed.rank())
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            x = data.images(idx).to(device)
            y = data.y[idx.to(data.y.device)].to(device)
            for i, atk in enumerate(built):
                # a private generator (APGD, FAB, Square): seeded per batch
                with attack_seeded(atk, batch_seed(seed, atk.name, int(order[start])),
                                   derive[i]):
                    x_adv = atk(model, x, y, eps) if atk.name != "clean" else x
                with eval_mode(model), torch.no_grad():
                    p = model(x_adv).argmax(1)
                pred[i, idx] = p.cpu()
                correct[i, idx] = (p == y).cpu()
            if progress is not None:
                progress(len(idx))
    finally:
        torch.set_rng_state(gen_state)
    if distributed.active():
        both = torch.cat([correct.long(), pred]).to(device)
        distributed.all_reduce_sum(both)
        both = both.cpu()
        correct, pred = both[: len(built)].bool(), both[len(built) :]
    settings = {
        "eps": eps, "norm": norm, "seed": seed, "n": n,
        "attacks": [describe_seeded(a, seed) for a in built],
    }
    groups = data.group.cpu() if getattr(data, "group", None) is not None else None
    return EvalResult(names, correct, pred, data.y.cpu(), num_classes, groups, settings)


# group figures (per-group accuracy, DP / EqOdds / EqOpp differences) in every summary with groups
from ..metrics.groups import group_summary_hook  # noqa: E402

SUMMARY_HOOKS.append(group_summary_hook)
