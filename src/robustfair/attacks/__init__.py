"""Attacks, one interface: ``attack(model, x, y, eps) -> x_adv``.

Images live in [0, 1]. ``eps`` is a float, a per-sample vector (N,), or a tensor shaped like
``x`` (per element, ℓ∞ only). The model's mode is restored, ``x`` is never modified, and the
parameters' gradients are left as they were.

Attack specs used on the command line and in configs are ``NAME[STEPS]``: ``clean``, ``fgsm``,
``pgd20``, ``cw20``, ``trades-kl10``…; the norm and ε come from the evaluation settings.
"""

from __future__ import annotations

import re
from typing import Any

from ..errors import UserError
from ..registry import Registry

ATTACKS: Registry = Registry("attack", package="robustfair.attacks")

from .base import Attack, as_eps, project, unknown_params  # noqa: E402

_SPEC = re.compile(r"^([a-z][a-z_-]*?[a-z])-?(\d+)?$")


def parse_attack_spec(spec: str) -> tuple[str, int | None]:
    """``'pgd20'`` → ``('pgd', 20)``; ``'clean'`` → ``('clean', None)``."""
    s = spec.strip().lower()
    if s in ATTACKS:
        return s, None
    m = _SPEC.match(s)
    if not m or m.group(1) not in ATTACKS:
        raise UserError(
            f"unknown attack {spec!r}; use NAME or NAME+STEPS (e.g. pgd20) with NAME one of: "
            f"{', '.join(ATTACKS.names())}"
        )
    return m.group(1), int(m.group(2)) if m.group(2) else None


def build_attack(
    spec: str, norm: str = "linf", step_size: float | None = None, *, bounded: bool = True,
    **params: Any
) -> Attack:
    """Build the attack named by ``spec`` for the given norm.

    ``bounded=False`` (data that are not images in [0, 1], e.g. synthetic mixtures): the attack
    must not clip to [0, 1]; attacks that always keep inputs in that box are refused."""
    name, steps = parse_attack_spec(spec)
    cls = ATTACKS.get(name)
    fields = cls.Params.model_fields
    problem = unknown_params(cls.Params, params, name)
    if problem:
        raise UserError(problem)
    kw: dict[str, Any] = dict(params)
    if not bounded:
        if "clip" in fields:
            kw["clip"] = False
        elif name != "clean":
            raise UserError(
                f"attack {spec!r} keeps inputs in [0, 1], but this dataset is unbounded (not "
                f"images in [0, 1]); use one of: clean, fgsm, pgdN, cwN, trades-klN")
    if steps is not None:
        if "steps" not in fields:
            raise UserError(f"attack {name!r} takes no step count; write {name!r}")
        kw["steps"] = steps
    if step_size is not None and "step_size" in fields:
        kw["step_size"] = step_size
    if "norm" in fields:
        kw["norm"] = norm
    elif norm not in getattr(cls, "norms", ("linf", "l2")):
        raise UserError(f"attack {name!r} does not support norm {norm!r}")
    atk = ATTACKS.build({"name": name, **kw})
    atk.spec = spec
    return atk


__all__ = ["ATTACKS", "Attack", "as_eps", "build_attack", "parse_attack_spec", "project"]
