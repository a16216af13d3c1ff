"""AutoAttack: an ensemble of parameter-free attacks, each run only on the points that the
previous ones left classified correctly; a point counts as robust only if it survives them all
(the per-sample worst case). Croce & Hein, "Reliable evaluation of adversarial robustness with an
ensemble of diverse parameter-free attacks", ICML 2020, arXiv:2003.01690.

Versions (as in the reference protocol):

- ``standard``: APGD-CE, APGD-T (9 targets), FAB-T (9 targets), Square (5,000 queries); APGD and
  FAB with 100 iterations and one run each.
- ``plus``: APGD-CE and APGD-DLR with 5 restarts, FAB with 5 restarts, Square, APGD-T, FAB-T.
- ``rand``: for randomised models, APGD-CE and APGD-DLR with gradients averaged over 20 passes
  (EOT).

The number of target classes is min(9, C − 1).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from . import ATTACKS
from ._helpers import clean_correct, eps_rows
from .base import Attack, AttackParams

#: the components of each version: (attack name, parameters besides norm/seed/steps)
VERSIONS: dict[str, list[tuple[str, dict[str, Any]]]] = {
    "standard": [("apgd-ce", {}), ("apgd-t", {}), ("fab-t", {}), ("square", {})],
    "plus": [("apgd-ce", {"restarts": 5}), ("apgd-dlr", {"restarts": 5}),
             ("fab", {"restarts": 5}), ("square", {}), ("apgd-t", {}), ("fab-t", {})],
    "rand": [("apgd-ce", {"eot": True}), ("apgd-dlr", {"eot": True})],
}


class AutoAttackParams(AttackParams):
    norm: Literal["linf", "l2"] = "linf"
    version: Literal["standard", "plus", "rand"] = "standard"
    attacks: list[str] | None = Field(
        None, description="a custom list of components instead of the version's, e.g. "
                          "['apgd-ce', 'square']")
    steps: int = Field(100, ge=1, le=100_000, description="APGD and FAB iterations (reference: "
                                                          "100)")
    n_queries: int = Field(5000, ge=1, description="Square's query budget (reference: 5,000)")
    n_target_classes: int | None = Field(None, ge=1, description="None: min(9, C − 1)")
    eot_iter: int = Field(20, ge=1, description="EOT passes of the 'rand' version")
    max_batch: int = Field(500, ge=1, description="APGD-T and FAB-T attack several targets side "
                                                   "by side while points × targets ≤ max_batch")
    seed: int | None = Field(0, description="seed of every component's random draws")


@dataclass
class AutoAttackOutcome:
    """``robust[stage]`` is the cumulative robustness after that stage (N,) bool; ``x_adv`` holds
    the first adversarial point found per sample (the natural image where none was)."""

    x_adv: Tensor
    robust: dict[str, Tensor]
    clean: Tensor


@ATTACKS.register("autoattack")
class AutoAttack(Attack):
    """AutoAttack standard: APGD-CE, APGD-T, FAB-T, Square, each on the points still robust; the
    per-sample worst case (Croce & Hein, ICML 2020, arXiv:2003.01690).

    Example::

        x_adv = build_attack("autoattack", norm="linf")(model, x, y, eps=8 / 255)
        stages = AutoAttack(norm="linf").run(model, x, y, 8 / 255).robust  # per stage
    """

    Params = AutoAttackParams

    def component_names(self) -> list[str]:
        if self.attacks:
            return list(self.attacks)
        return [name for name, _ in VERSIONS[self.version]]

    def stages(self) -> list[tuple[str, Attack]]:
        """The components in order, built for this norm, seed and budget."""
        from . import build_attack

        extra = dict(VERSIONS[self.version]) if not self.attacks else {}
        out: list[tuple[str, Attack]] = []
        for name in self.component_names():
            kw = _component_params(name, self.params.model_dump(), extra.get(name, {}))
            atk = build_attack(name, self.norm, **kw)
            atk.spec = name
            out.append((name, atk))
        return out

    def run(self, model: nn.Module, x: Tensor, y: Tensor, eps: float | Tensor,
            progress: Callable[[str, Tensor], None] | None = None) -> AutoAttackOutcome:
        """Run every stage on the points still robust; report robustness after each stage."""
        from .base import as_eps, eval_mode

        e = as_eps(eps, x)
        with eval_mode(model):
            clean = clean_correct(model, x, y)
        robust = clean.clone()
        x_adv = x.clone()
        after: dict[str, Tensor] = {}
        for name, atk in self.stages():
            idx = robust.nonzero().flatten()
            if len(idx):
                xa = atk(model, x[idx], y[idx], eps_rows(e, idx, len(x)))
                with eval_mode(model), torch.no_grad():
                    broke = model(xa).argmax(1) != y[idx]
                x_adv[idx[broke]] = xa[broke]
                robust[idx[broke]] = False
            after[name] = robust.clone()
            if progress is not None:
                progress(name, robust)
        return AutoAttackOutcome(x_adv, after, clean)

    def perturb(self, model, x, y, eps, step_size):  # type: ignore[override]
        return self.run(model, x, y, eps).x_adv


def _component_params(name: str, aa: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """Parameters of one component from AutoAttack's own (steps, queries, targets, seed, EOT)."""
    kw: dict[str, Any] = {"seed": aa["seed"]}
    if name.startswith(("apgd", "fab")):
        kw["steps"] = aa["steps"]
    if name in ("apgd-t", "fab-t"):
        kw["n_target_classes"] = aa["n_target_classes"]
        kw["max_batch"] = aa["max_batch"]
    if name == "square":
        kw["n_queries"] = aa["n_queries"]
    if "restarts" in extra:
        kw["restarts"] = extra["restarts"]
    if extra.get("eot"):
        kw["eot_iter"] = aa["eot_iter"]
    return kw


@ATTACKS.register("autoattack-plus")
class AutoAttackPlus(AutoAttack):
    """AutoAttack plus: APGD-CE/DLR and FAB with 5 restarts, Square, APGD-T, FAB-T (Croce &
    Hein, arXiv:2003.01690)."""

    class Params(AutoAttackParams):
        version: Literal["standard", "plus", "rand"] = "plus"


@ATTACKS.register("autoattack-rand")
class AutoAttackRand(AutoAttack):
    """AutoAttack rand, for randomised models: APGD-CE and APGD-DLR with EOT over 20 passes
    (Croce & Hein, arXiv:2003.01690)."""

    class Params(AutoAttackParams):
        version: Literal["standard", "plus", "rand"] = "rand"


__all__ = ["VERSIONS", "AutoAttack", "AutoAttackOutcome", "AutoAttackPlus", "AutoAttackRand"]
