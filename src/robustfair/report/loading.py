"""Read what a run directory holds, tolerating every file that may be missing.

A run directory (``runs/NAME``) may hold ``config.yaml``, ``log.jsonl``, ``eval/summary.json`` and
``eval/summary_matrix.npz``, and, when other commands ran, ``eval/checks.json`` (sanity checks),
``eval/eps_curve.json`` (robust accuracy against ε), an analysis JSON with a class-similarity
matrix and class-activation-map PNGs. Each is optional; what is absent is reported as absent.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..errors import UserError

log = logging.getLogger("robustfair")

SUMMARY = "eval/summary.json"
MATRIX = "eval/summary_matrix.npz"
CHECKS = "eval/checks.json"
EPS_CURVE = "eval/eps_curve.json"
LOG = "log.jsonl"
CONFIG = "config.yaml"

#: attacks in order of strength for picking "the robust accuracy" of a run
_AUTOATTACK = re.compile(r"^(autoattack|aa)([-_].*)?$")


@dataclass
class RunFiles:
    """The contents of one run directory; ``None`` (or empty) where a file is absent."""

    run_dir: Path
    config: dict[str, Any] | None = None
    log: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] | None = None
    matrix: Any = None  # EvalResult
    checks: Any = None
    analysis: tuple[str, dict[str, Any]] | None = None  # (relative path, content)
    eps_curve: dict[str, Any] | None = None
    cam_images: list[Path] = field(default_factory=list)
    checkpoint: dict[str, Any] | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return str((self.config or {}).get("name") or self.run_dir.name)

    def class_names(self) -> list[str]:
        c = self.num_classes()
        names = (self.summary or {}).get("settings", {}).get("class_names")
        if names and len(names) == c:
            return [str(n) for n in names]
        return [str(k) for k in range(c)]

    def num_classes(self) -> int:
        if self.summary is not None:
            return int(self.summary["num_classes"])
        if self.matrix is not None:
            return int(self.matrix.num_classes)
        for line in self.log:
            pc = line.get("val", {}).get("clean", {}).get("per_class")
            if pc:
                return len(pc)
        return 0


def read_json(path: Path) -> Any:
    """Parse a JSON file; a broken file is a :class:`UserError` naming it."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"{str(path)!r} is not readable JSON ({exc}); re-create it or "
                        f"remove it") from None


def read_log(path: Path) -> list[dict[str, Any]]:
    """The lines of ``log.jsonl``; a torn last line (interrupted run) is left out, a damaged
    line before it is a one-line :class:`UserError` (see :func:`robustfair.engine.io.read_jsonl`)."""
    from ..engine.io import read_jsonl

    return read_jsonl(path) if path.exists() else []


def load_run(run_dir: str | Path) -> RunFiles:
    """Read a run directory (see the module docstring); at least one of ``config.yaml``,
    ``log.jsonl`` and ``eval/summary.json`` must exist."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run directory {str(run_dir)!r} not found; give the folder that "
                        f"'robustfair train' created")
    if not any((run_dir / p).exists() for p in (CONFIG, LOG, SUMMARY)):
        raise UserError(f"{str(run_dir)!r} is not a run directory (no config.yaml, log.jsonl "
                        f"or eval/summary.json); give the folder that 'robustfair train' created")
    rf = RunFiles(run_dir)
    if (run_dir / CONFIG).exists():
        rf.config = yaml.safe_load((run_dir / CONFIG).read_text(encoding="utf-8")) or {}
    if (run_dir / LOG).exists():
        # a JSON line log: each line is one JSON document, the pointer's first token is the line
        rf.log = read_log(run_dir / LOG)
    if (run_dir / SUMMARY).exists():
        rf.summary = read_json(run_dir / SUMMARY)
    if (run_dir / MATRIX).exists():
        rf.matrix = _load_matrix(run_dir / MATRIX, rf)
    if (run_dir / CHECKS).exists():
        rf.checks = read_json(run_dir / CHECKS)
    if (run_dir / EPS_CURVE).exists():
        rf.eps_curve = read_json(run_dir / EPS_CURVE)
    if (run_dir / "checkpoints" / "last.json").exists():
        rf.checkpoint = read_json(run_dir / "checkpoints" / "last.json")
    rf.analysis = find_similarity_json(run_dir, rf.num_classes())
    rf.cam_images = find_cam_images(run_dir)
    return rf


def _load_matrix(path: Path, rf: RunFiles) -> Any:
    from ..engine.evaluator import EvalResult
    from ..engine.record import MATRIX_ERRORS

    try:
        return EvalResult.load(path, (rf.summary or {}).get("settings"))
    except MATRIX_ERRORS as exc:
        text = str(exc).strip().splitlines()
        raise UserError(f"{path} is damaged ({(text[0] if text else type(exc).__name__)[:160]}); "
                        f"restore it from a copy, or evaluate the run again after moving "
                        f"eval/summary.json and it out of the folder") from None


def find_similarity_json(run_dir: Path, num_classes: int) -> tuple[str, dict[str, Any]] | None:
    """An analysis JSON holding a C×C class-similarity matrix, if ``robustfair analyze`` wrote
    one: any ``*.json`` under ``analysis/`` or ``eval/`` (or ``analysis*.json`` in the run
    folder) with a square numeric matrix of side C under a key naming similarity."""
    if num_classes <= 0:
        return None
    candidates = sorted((run_dir / "analysis").glob("**/*.json")) if (
        run_dir / "analysis").is_dir() else []
    candidates += sorted(run_dir.glob("analysis*.json"))
    candidates += [p for p in sorted((run_dir / "eval").glob("*.json"))
                   if re.search(r"class|distance|simil|analy", p.name)]
    for path in candidates:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if similarity_pointer(data, num_classes) is not None:
            return str(path.relative_to(run_dir)), data
    return None


#: key names of a class-similarity matrix, most specific first
_SIM_KEYS = (r"simil", r"^p$", r"confusion", r"matrix")


def similarity_pointer(data: Any, c: int) -> tuple[str, ...] | None:
    """Path of keys to a C×C numeric matrix under a key that names a similarity (tried in the
    order of :data:`_SIM_KEYS`; a matrix under a key naming a distance is never taken)."""
    found = _square_paths(data, c, ())
    for pattern in _SIM_KEYS:
        for path in found:
            if re.search(pattern, path[-1], re.I) and not re.search("dist", path[-1], re.I):
                return path
    return None


def _square_paths(data: Any, c: int, path: tuple[str, ...]) -> list[tuple[str, ...]]:
    if not isinstance(data, dict):
        return []
    out = []
    for k, v in data.items():
        if _square(v, c):
            out.append((*path, str(k)))
        elif isinstance(v, dict):
            out += _square_paths(v, c, (*path, str(k)))
    return out


def _square(v: Any, c: int) -> bool:
    return (isinstance(v, list) and len(v) == c and all(
        isinstance(r, list) and len(r) == c and all(
            x is None or isinstance(x, int | float) for x in r) for r in v))


def find_cam_images(run_dir: Path) -> list[Path]:
    """PNG files whose name mentions CAM or mask (e.g. what ``robustfair analyze --cam``
    saves), at most 6, not the report's own output."""
    found = [p for p in sorted(run_dir.glob("**/*.png"))
             if re.search(r"cam|mask", p.name, re.I) and "compare" not in p.parts]
    return found[:6]


def strongest_attack(attacks: list[str], summary: dict[str, Any] | None = None,
                     allow_worst_case: bool = True) -> str | None:
    """The attack whose accuracy counts as "robust": AutoAttack, else the per-sample worst case
    over the attacks (when present and allowed), else the PGD/CW (or other) attack with the
    lowest average accuracy, else ``None``."""
    adv = [a for a in attacks if a != "clean"]
    for a in adv:
        if _AUTOATTACK.match(a):
            return a
    if allow_worst_case and summary is not None and "worst_case" in summary:
        return "worst_case"
    if not adv:
        return None
    if summary is not None:
        return min(adv, key=lambda a: summary["attacks"].get(a, {}).get("avg", 1.0))
    return adv[0]
