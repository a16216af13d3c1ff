"""Settings changed when a run is resumed: refused when they would make the run's record false,
otherwise written into the run.

``robustfair train RUN --resume --set train.optimizer.lr=0.05`` continues a run with other
settings. Those that the checkpoint does not fix (learning rate and schedule, number of epochs,
the training attack, validation, evaluation, logging, device) take effect at the checkpoint's
position; ``config.yaml`` then holds the new values, so a later plain ``--resume`` keeps them,
and ``config_history.jsonl`` holds one line per change: the old and new value of each key and the
epoch and step from which it applies. Settings that the checkpoint's weights, optimizer or data
order were built with (dataset, model, method, seed, batch size, optimizer type...) cannot change
in a resumed run: the command refuses them and suggests a new run.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import yaml

from ..config import RunConfig, build_config, dump_config
from ..errors import UserError
from .io import atomic_write_text

HISTORY = "config_history.jsonl"
CONFIG = "config.yaml"

#: keys (and key prefixes) a resumed run may change
CHANGEABLE = (
    "description", "device", "deterministic", "logging.", "eval.", "validation.", "attack.",
    "train.epochs", "train.optimizer.lr", "train.schedule.", "train.grad_clip",
    "train.checkpoint_every_steps", "train.precision", "train.channels_last", "train.compile",
    "train.ema.evaluate",
)

#: top-level keys that say where the run is: never changed on resume
WHERE = ("name", "output_dir")
#: top-level keys that do not change what a run computes, besides its seed (shared with
#: :mod:`robustfair.report.compare`, which groups runs by the rest)
NOT_SETTINGS = ("seed", *WHERE, "description", "device", "logging")


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """A nested mapping as ``{"a.b.c": value}``."""
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def config_changes(old: dict[str, Any], new: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``{key: (old, new)}`` for every dotted key whose value differs."""
    a, b = flatten(old), flatten(new)
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def _changeable(key: str) -> bool:
    return any(key == c or (c.endswith(".") and key.startswith(c)) for c in CHANGEABLE)


def _position(run_dir: Path) -> dict[str, int]:
    """Where the run stands: its last checkpoint's epoch, step in the epoch and global step."""
    try:
        meta = json.loads((run_dir / "checkpoints" / "last.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        meta = {}
    return {k: int(meta.get(k, 0) or 0) for k in ("epoch", "step_in_epoch", "global_step")}


def stored_config(run_dir: Path) -> dict[str, Any]:
    """The run's ``config.yaml``, with the defaults of this version filled in."""
    raw = yaml.safe_load((run_dir / CONFIG).read_text(encoding="utf-8")) or {}
    return build_config(raw).model_dump(mode="json")


def record_resume_changes(cfg: RunConfig, run_dir: str | Path) -> dict[str, tuple[Any, Any]]:
    """Compare ``cfg`` with the run's ``config.yaml``; refuse a change the checkpoint cannot
    follow (any change is allowed before the first checkpoint), else write the new config and a
    history line. Return the changes (may be empty)."""
    run_dir = Path(run_dir)
    if not (run_dir / CONFIG).exists():
        return {}
    changes = config_changes(stored_config(run_dir), cfg.model_dump(mode="json"))
    if not changes:
        return {}
    started = (run_dir / "checkpoints" / "last.pt").exists()
    fixed = [k for k in changes if not _changeable(k) and (started or k in WHERE)]
    if fixed:
        shown = ", ".join(f"{k} ({_short(changes[k][0])} → {_short(changes[k][1])})"
                          for k in fixed[:4]) + (", …" if len(fixed) > 4 else "")
        raise UserError(f"--resume cannot change {shown}: the checkpoint was made with the old "
                        f"value, so the run's record would be false; drop these overrides, or "
                        f"start a new run with --set name=OTHER")
    pos = _position(run_dir)
    entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "from": pos,
             "changes": {k: {"old": o, "new": n} for k, (o, n) in changes.items()}}
    hist = run_dir / HISTORY
    before = hist.read_text(encoding="utf-8") if hist.exists() else ""
    atomic_write_text(hist, before + json.dumps(entry) + "\n")
    where = f"epoch {pos['epoch'] + 1} step {pos['step_in_epoch'] + 1}"
    header = (f"# changed on --resume (latest from {where}: "
              + ", ".join(f"{k}={_short(n)}" for k, (_, n) in changes.items())
              + f"); every change and the step it took effect: {HISTORY}\n")
    atomic_write_text(run_dir / CONFIG, header + dump_config(cfg))
    return changes


def read_history(run_dir: str | Path) -> list[dict[str, Any]]:
    """The lines of ``config_history.jsonl`` (empty when the run was never changed)."""
    path = Path(run_dir) / HISTORY
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def _short(v: Any) -> str:
    text = json.dumps(v) if not isinstance(v, str) else v
    return text if len(text) <= 40 else text[:39] + "…"
