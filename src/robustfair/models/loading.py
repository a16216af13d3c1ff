"""Loading weights by the RobustBench conventions: a state dict plain or under ``state_dict``
(or a robustfair checkpoint's ``model``), ``module.``/``model.`` prefixes removed, and strict
loading whose error lists the missing and unexpected keys."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import UserError

_PREFIXES = ("module.", "model.")
#: how many keys an error message names before "and N more"
SHOWN = 4


def state_dict_of(obj: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The tensors of a model file: ``{'state_dict': …}``, a robustfair checkpoint's ``model``,
    or the plain dict; ``module.``/``model.`` prefixes removed."""
    if obj.get("format") == "robustfair-checkpoint" and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    elif isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    elif isinstance(obj.get("model"), dict) and not any(
            isinstance(v, torch.Tensor) for v in obj.values()):
        obj = obj["model"]
    out: dict[str, torch.Tensor] = {}
    for k, v in obj.items():
        if not isinstance(v, torch.Tensor):
            continue
        while k.startswith(_PREFIXES):
            k = k.split(".", 1)[1]
        out[k] = v
    if not out:
        raise UserError("the file holds no tensors; give a state dict of the model")
    return out


def _keys(keys: list[str]) -> str:
    shown = ", ".join(keys[:SHOWN])
    return f"{len(keys)} ({shown}{f', and {len(keys) - SHOWN} more' if len(keys) > SHOWN else ''})"


def load_strict(module: nn.Module, state: dict[str, torch.Tensor], what: str, fix: str) -> None:
    """``module.load_state_dict(state)``, strictly; a mismatch is one line naming the missing
    and unexpected keys (or the first tensor whose shape differs) and ``fix``."""
    try:
        result = module.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shapes differ
        lines = [ln.strip() for ln in str(exc).splitlines() if "size mismatch" in ln]
        detail = lines[0] if lines else str(exc).splitlines()[0]
        more = f" (and {len(lines) - 1} more)" if len(lines) > 1 else ""
        raise UserError(f"the weights do not fit {what}: {detail}{more}; {fix}") from None
    if result.missing_keys or result.unexpected_keys:
        parts = []
        if result.missing_keys:
            parts.append(f"missing keys {_keys(result.missing_keys)}")
        if result.unexpected_keys:
            parts.append(f"unexpected keys {_keys(result.unexpected_keys)}")
        raise UserError(f"the weights do not fit {what}: {'; '.join(parts)}; {fix}")


__all__ = ["load_strict", "state_dict_of"]
