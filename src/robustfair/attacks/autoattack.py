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

``autoattack-fast`` is *not* standard AutoAttack: APGD-CE, then APGD-T on the 3 targets that MALT
(Melamed, Yehudai & Shamir 2024, arXiv:2407.02240) ranks nearest; then, only on the robust points
that can still change the result, the remaining components: APGD-T on the other targets and FAB-T
on MALT's 3 targets for the points whose nearest class boundary, linearised at the natural image,
lies within ``near``·ε or whose logit gradients vanish; Square with its full budget on the points
whose gradients vanish (gradient attacks are blind there, only the black-box Square can see), and
with ``fast_queries`` (1,000) on the other near points.
It reports which version ran in its name and settings.
"""

from __future__ import annotations

from collections.abc import Callable
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from . import ATTACKS
from ._helpers import clean_correct, eps_rows
from .base import Attack, AttackParams
from .malt import malt_parts

#: the components of each version: (attack name, parameters besides norm/seed/steps)
VERSIONS: dict[str, list[tuple[str, dict[str, Any]]]] = {
    "standard": [("apgd-ce", {}), ("apgd-t", {}), ("fab-t", {}), ("square", {})],
    "plus": [("apgd-ce", {"restarts": 5}), ("apgd-dlr", {"restarts": 5}),
             ("fab", {"restarts": 5}), ("square", {}), ("apgd-t", {}), ("fab-t", {})],
    "rand": [("apgd-ce", {"eot": True}), ("apgd-dlr", {"eot": True})],
    "fast": [("apgd-ce", {}),
             ("apgd-t-malt", {"attack": "apgd-t", "targeting": "malt", "malt_first": True}),
             ("apgd-t-rest", {"attack": "apgd-t", "targeting": "malt", "malt_rest": True,
                              "gate": True}),
             ("fab-t", {"targeting": "malt", "gate": True, "malt_first": True}),
             ("square-blind", {"attack": "square", "gate": "blind"}),
             ("square-near", {"attack": "square", "gate": "near", "fast_queries": True})],
}


class AutoAttackParams(AttackParams):
    norm: Literal["linf", "l2"] = "linf"
    version: Literal["standard", "plus", "rand", "fast"] = "standard"
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
    malt_targets: int = Field(3, ge=1, description="fast version: APGD-T targets ranked by MALT "
                                                   "in the first pass")
    near: float = Field(1.0, ge=0.0, description="fast version: the remaining components attack "
                                                  "the points whose linearised nearest boundary "
                                                  "is within near·ε (or whose gradient vanishes)")
    fast_queries: int = Field(1000, ge=1, description="fast version: Square's query budget on "
                                                       "the points near a boundary (at most "
                                                       "n_queries; blind points get n_queries)")
    layout: Literal["auto", "channels_last", "unchanged"] = Field(
        "auto", description="memory order of a convolutional model's weights during the run "
                            "(auto: channels-last on the CPU; the logits are the same)")
    fold_batchnorm: bool = Field(
        True, description="the attacks pass a copy of the model with each BatchNorm after a "
                          "convolution folded into it (the same function, faster passes); "
                          "verdicts on the model itself")


@dataclass
class AutoAttackOutcome:
    """``robust[stage]`` is the cumulative robustness after that stage (N,) bool; ``x_adv`` holds
    the first adversarial point found per sample (the natural image where none was)."""

    x_adv: Tensor
    robust: dict[str, Tensor]
    clean: Tensor
    stage_time: dict[str, dict[str, float]] = field(default_factory=dict)
    layout: str = "unchanged"
    folded_batchnorm: int = 0


@ATTACKS.register("autoattack")
class AutoAttack(Attack):
    """AutoAttack standard: APGD-CE, APGD-T, FAB-T, Square, each on the points still robust; the
    per-sample worst case (Croce & Hein, ICML 2020, arXiv:2003.01690).

    Example::

        x_adv = build_attack("autoattack", norm="linf")(model, x, y, eps=8 / 255)
        stages = AutoAttack(norm="linf").run(model, x, y, 8 / 255).robust  # per stage
    """

    Params = AutoAttackParams

    @property
    def name(self) -> str:
        """The spec (e.g. ``autoattack``), with ``-custom-…`` added when the components, their
        iterations, queries or targets differ from the version's (not the standard protocol)."""
        from . import parse_attack_spec

        base = self.spec or getattr(self, "registered_name", "autoattack")
        fields = type(self.params).model_fields
        parts = []
        if self.attacks:
            parts.append("+".join(self.attacks))
        spec_steps = parse_attack_spec(self.spec)[1] if self.spec else None
        if self.steps != fields["steps"].default and self.steps != spec_steps:
            parts.append(f"{self.steps}it")
        if self.n_queries != fields["n_queries"].default:
            parts.append(f"{self.n_queries}q")
        if self.n_target_classes is not None:
            parts.append(f"{self.n_target_classes}t")
        if self.version == "fast" and self.fast_queries != fields["fast_queries"].default:
            parts.append(f"{self.fast_queries}fq")
        return f"{base}-custom-{'-'.join(parts)}" if parts else base

    def component_names(self) -> list[str]:
        if self.attacks:
            return list(self.attacks)
        return [name for name, _ in VERSIONS[self.version]]

    def stages(self) -> list[tuple[str, Attack]]:
        """The components in order, built for this norm, seed and budget."""
        from . import build_attack, parse_attack_spec

        extra = dict(VERSIONS[self.version]) if not self.attacks else {}
        out: list[tuple[str, Attack]] = []
        for name in self.component_names():
            ex = extra.get(name, {})
            base = ex.get("attack", name)
            kw = _component_params(base, {**self.params.model_dump(), "seed": self.seed}, ex)
            fields = ATTACKS.get(parse_attack_spec(base)[0]).Params.model_fields
            kw = {k: v for k, v in kw.items() if k in fields}  # e.g. no seed for PGD
            atk = build_attack(base, self.norm, **kw)
            atk.spec = name
            out.append((name, atk))
        return out

    def gate(self, stage: str, model: nn.Module, x: Tensor, y: Tensor,
             eps: Tensor) -> Tensor | None:
        """The points (of ``x``, all still robust) that ``stage`` attacks; None: all of them.
        Only the fast version's remaining components are gated (see the module docstring)."""
        kind = None if self.attacks else dict(VERSIONS[self.version]).get(stage, {}).get("gate")
        if not kind:
            return None
        near, blind = boundary_gates(model, x, y, eps, self.norm, self.near)
        if kind == "blind":
            return blind
        if kind == "near":
            return near & ~blind
        return near | blind

    def run(self, model: nn.Module, x: Tensor, y: Tensor, eps: float | Tensor,
            progress: Callable[[str, Tensor], None] | None = None) -> AutoAttackOutcome:
        """Run every stage on the points still robust; report robustness after each stage."""
        from .base import as_eps, fold_batchnorm, inference_layout

        attacker, folded = fold_batchnorm(model, x) if self.fold_batchnorm else (model, 0)
        with inference_layout(attacker, x, self.layout) as layout:
            out = self._run(model, x, y, as_eps(eps, x), progress, attacker)
        out.layout, out.folded_batchnorm = layout, folded
        return out

    def _run(self, model: nn.Module, x: Tensor, y: Tensor, e: Tensor,
             progress: Callable[[str, Tensor], None] | None,
             attacker: nn.Module) -> AutoAttackOutcome:
        """The stages; ``attacker`` is the model the attacks pass (``model`` with BatchNorm
        folded, or ``model``), verdicts are taken on ``model``."""
        from .base import eval_mode

        with eval_mode(model):
            clean = clean_correct(model, x, y)
        robust = clean.clone()
        x_adv = x.clone()
        after: dict[str, Tensor] = {}
        times: dict[str, dict[str, float]] = {}
        for name, atk in self.stages():
            t0 = time.perf_counter()
            idx = robust.nonzero().flatten()
            if len(idx):
                with eval_mode(attacker):
                    sel = self.gate(name, attacker, x[idx], y[idx], eps_rows(e, idx, len(x)))
                if sel is not None:
                    idx = idx[sel]
            if len(idx):
                xa = atk(attacker, x[idx], y[idx], eps_rows(e, idx, len(x)))
                with eval_mode(model), torch.no_grad():
                    broke = model(xa).argmax(1) != y[idx]
                x_adv[idx[broke]] = xa[broke]
                robust[idx[broke]] = False
            after[name] = robust.clone()
            times[name] = {"seconds": round(time.perf_counter() - t0, 3), "points": len(idx)}
            if progress is not None:
                progress(name, robust)
        return AutoAttackOutcome(x_adv, after, clean, times)

    def perturb(self, model, x, y, eps, step_size):  # type: ignore[override]
        return self.run(model, x, y, eps).x_adv


def boundary_gates(model: nn.Module, x: Tensor, y: Tensor, eps: Tensor, norm: str,
                   near: float) -> tuple[Tensor, Tensor]:
    """(near, blind), both (N,) bool: the points whose nearest class boundary, linearised at
    ``x`` (MALT's d_t), is within ``near``·ε, and those whose logit-difference gradient
    vanishes for some class (where gradient attacks are blind and only Square can see)."""
    gap, dual = malt_parts(model, x, y, eps, norm)
    others = torch.ones_like(gap, dtype=torch.bool).scatter(1, y[:, None], False)
    d = torch.where(others, gap / dual.clamp_min(1e-12), torch.full_like(gap, float("inf")))
    blind = (others & (dual <= 1e-12)).any(1)
    return d.amin(1) <= near, blind


def near_queries(aa: dict[str, Any]) -> int:
    """The fast version's Square budget on near points (``fast_queries``, at most the full
    ``n_queries``), from AutoAttack's parameters or their record in a summary."""
    return min(aa["fast_queries"], aa["n_queries"])


def _component_params(name: str, aa: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """Parameters of one component from AutoAttack's own (steps, queries, targets, seed, EOT)."""
    kw: dict[str, Any] = {"seed": aa["seed"]}
    if name.startswith(("apgd", "fab")):
        kw["steps"] = aa["steps"]
    if name in ("apgd-t", "fab-t"):
        kw["n_target_classes"] = aa["n_target_classes"]
        kw["max_batch"] = aa["max_batch"]
        if "targeting" in extra:
            kw["targeting"] = extra["targeting"]
    if extra.get("malt_first"):
        kw["n_target_classes"] = aa["malt_targets"]
    if extra.get("malt_rest"):
        kw["skip_targets"] = aa["malt_targets"]
    if name == "square":
        kw["n_queries"] = near_queries(aa) if extra.get("fast_queries") else aa["n_queries"]
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
        version: Literal["standard", "plus", "rand", "fast"] = "plus"


@ATTACKS.register("autoattack-rand")
class AutoAttackRand(AutoAttack):
    """AutoAttack rand, for randomised models: APGD-CE and APGD-DLR with EOT over 20 passes
    (Croce & Hein, arXiv:2003.01690)."""

    class Params(AutoAttackParams):
        version: Literal["standard", "plus", "rand", "fast"] = "rand"


@ATTACKS.register("autoattack-fast")
class AutoAttackFast(AutoAttack):
    """Not standard AutoAttack: APGD-CE, APGD-T on the 3 targets MALT ranks nearest (Melamed et
    al., arXiv:2407.02240), then APGD-T on the other targets, FAB-T (MALT's 3 targets) and Square
    (1,000 queries; 5,000 where the gradients vanish) only on the robust points near a class
    boundary or with vanishing gradients. Much faster; its robust accuracy is an upper bound
    that standard AutoAttack may lower.

    Example::

        x_adv = build_attack("autoattack-fast")(model, x, y, eps=8 / 255)
    """

    class Params(AutoAttackParams):
        version: Literal["standard", "plus", "rand", "fast"] = "fast"


__all__ = ["VERSIONS", "AutoAttack", "AutoAttackFast", "AutoAttackOutcome", "AutoAttackPlus",
           "AutoAttackRand", "boundary_gates", "near_queries"]
