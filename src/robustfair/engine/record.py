"""A run's record of evaluations: each evaluation adds to it, none silently replaces another.

An evaluation is keyed by the settings that decide its numbers: the model file (sha256; for a
model given to the Python API, of its state dict), which weights of it (``raw``, ``ema``,
``averaged``, or ``as saved``/``as given``), the dataset, split and images (sha256 of the subset), ε, norm, seed and batch size (the attacks'
random draws are seeded per batch), and the precision when some attack ran in bf16
(``eval.precision``). Its rows (one per attack) live in one matrix.

- A new evaluation with the key of ``eval/summary.json`` (the run's main evaluation) adds its
  rows to it: an attack not there yet becomes a new row, an attack already there is recomputed
  (with the same key its draws are the same, so only a changed model could change it; the number
  of changed images is logged).
- A new evaluation with another key is saved beside it, in ``eval/<KEY>/summary.json`` (e.g.
  ``eval/linf-eps0.2-n200-seed0-1a2b3c4d/``), merging the same way with what is there.
- Training's final evaluation is the run's main evaluation: when the checkpoint changed (a resumed
  run), the previous main evaluation moves into its own folder first.

``eval/index.json`` lists every evaluation of the run with its key and attacks; ``report`` and
``compare`` read ``eval/summary.json`` and say so.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
import zipfile
from pathlib import Path
from typing import Any

import torch

from ..errors import UserError
from .evaluator import EvalResult
from .io import atomic_write_json
from .staged import precision_used

log = logging.getLogger("robustfair.eval")

INDEX = "index.json"
SUMMARY = "summary.json"
MATRIX = "summary_matrix.npz"
#: the settings that make two evaluations comparable row by row
KEY_FIELDS = ("sha256", "weights", "model", "dataset", "split", "images", "eps", "norm", "seed",
              "batch_size", "step_size")


def evaluation_key(settings: dict[str, Any]) -> dict[str, Any]:
    """The settings that decide an evaluation's numbers (see the module docstring)."""
    s = dict(settings)
    s["images"] = (settings.get("subset") or {}).get("sha256")
    key = {k: s.get(k) for k in KEY_FIELDS}
    precision = precision_used(settings)
    if precision != "fp32":  # absent for fp32: the keys of earlier records hold
        key["precision"] = precision
    return key


def key_slug(key: dict[str, Any]) -> str:
    """A folder name that a person can read: ``linf-eps0.031-n200-seed0-<8 hex>``."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()
    eps = key.get("eps")
    eps_s = f"{float(eps):.4g}" if eps is not None else "na"
    n = key.get("n_images", "")
    return f"{key.get('norm')}-eps{eps_s}{f'-n{n}' if n else ''}-seed{key.get('seed')}-" \
           f"{digest[:8]}"


#: what reading a damaged ``summary_matrix.npz`` raises (numpy: a torn zip, a missing array)
MATRIX_ERRORS = (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile)


def damaged(path: Path, why: str, fix: str) -> UserError:
    return UserError(f"{path} is damaged ({why}); {fix}")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:160]


def check_record(eval_dir: Path) -> None:
    """Before an evaluation is added to the record in ``eval_dir``: every ``summary.json`` and
    ``summary_matrix.npz`` there (and in its evaluation folders) reads, else a one-line
    :class:`UserError` naming the file (the evaluation would replace what it holds). A damaged
    ``index.json`` is no obstacle: it is rebuilt from the folders."""
    eval_dir = Path(eval_dir)
    if not eval_dir.is_dir():
        return
    folders = [eval_dir] + sorted(p for p in eval_dir.iterdir() if p.is_dir())
    fix = ("restore it from a copy, or move it (and the other file of its pair) out of the "
           "folder to evaluate again")
    for folder in folders:
        summary, matrix = folder / SUMMARY, folder / MATRIX
        if summary.exists():
            try:
                settings = json.loads(summary.read_text(encoding="utf-8"))["settings"]
                if not isinstance(settings, dict):
                    raise ValueError("its settings are not a mapping")
            except (OSError, ValueError, KeyError, TypeError) as exc:
                why = "no settings" if isinstance(exc, KeyError | TypeError) else \
                    _first_line(exc)
                raise damaged(summary, why, fix) from None
        if matrix.exists():
            try:
                EvalResult.load(matrix)
            except MATRIX_ERRORS as exc:
                raise damaged(matrix, _first_line(exc), fix) from None


def _read_settings(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((folder / SUMMARY).read_text(encoding="utf-8")).get("settings", {})
    except (OSError, ValueError):
        return None


def merge(old: EvalResult, new: EvalResult) -> tuple[EvalResult, list[str]]:
    """``old`` with the rows of ``new`` added (same images); returns the attacks recomputed."""
    if not torch.equal(old.labels, new.labels):
        raise ValueError("the two evaluations have different images")
    names = list(old.attacks)
    rows_c = {a: old.correct[i] for i, a in enumerate(old.attacks)}
    rows_p = {a: old.pred[i] for i, a in enumerate(old.attacks)}
    again = []
    for i, a in enumerate(new.attacks):
        if a in rows_c:
            changed = int((rows_c[a] != new.correct[i]).sum())
            again.append(a)
            if changed:
                log.warning("%s: recomputed; %d images changed", a, changed)
        else:
            names.append(a)
        rows_c[a], rows_p[a] = new.correct[i], new.pred[i]
    names = ["clean"] + [a for a in names if a != "clean"] if "clean" in names else names
    settings = _merge_settings(old.settings, new.settings)
    merged = EvalResult(names, torch.stack([rows_c[a] for a in names]),
                        torch.stack([rows_p[a] for a in names]), new.labels, new.num_classes,
                        new.groups, settings)
    return merged, again


def _merge_settings(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    out = {**old, **new}
    by_name = {a["attack"]: a for a in old.get("attacks", [])}
    by_name.update({a["attack"]: a for a in new.get("attacks", [])})
    out["attacks"] = list(by_name.values())
    for k in ("stages", "timing_s", "stage_time"):
        if k in old or k in new:
            out[k] = {**old.get(k, {}), **new.get(k, {})}
    out["history"] = list(old.get("history", [])) + list(new.get("history", []))
    return out


def record_evaluation(eval_dir: Path, result: EvalResult, primary: bool = False
                      ) -> tuple[dict[str, Any], Path]:
    """Save ``result`` into ``eval_dir`` by the rules of the module docstring; return the saved
    summary and the folder it went to."""
    eval_dir = Path(eval_dir)
    result.settings.setdefault("history", [
        {"attacks": [a for a in result.attacks if "/" not in a],
         "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
         "by": "train" if primary else "eval"}])
    key = evaluation_key(result.settings)
    main = _read_settings(eval_dir)
    if main is None or evaluation_key(main) == key:
        folder = eval_dir
    elif primary:
        old_key = {**evaluation_key(main), "n_images": main.get("n")}
        aside = eval_dir / key_slug(old_key)
        aside.mkdir(parents=True, exist_ok=True)
        for name in (SUMMARY, MATRIX):
            if (eval_dir / name).exists():
                shutil.move(str(eval_dir / name), str(aside / name))
        log.info("the previous main evaluation (other settings) moved to %s", aside)
        folder = eval_dir
    else:
        folder = eval_dir / key_slug({**key, "n_images": result.settings.get("n")})
    here = _read_settings(folder)
    if here is not None and (folder / MATRIX).exists():
        try:
            old = EvalResult.load(folder / MATRIX, here)
            result, _ = merge(old, result)
        except MATRIX_ERRORS:
            log.warning("%s could not be merged; it is kept as %s", folder / MATRIX,
                        folder / "summary_previous.json")
            shutil.copy(folder / SUMMARY, folder / "summary_previous.json")
    summary = result.save(folder)
    _update_index(eval_dir, folder, summary)
    return summary, folder


def _read_index(eval_dir: Path) -> dict[str, Any] | None:
    """``index.json``, or None when it is missing or damaged (not JSON, not an index)."""
    try:
        index = json.loads((eval_dir / INDEX).read_text(encoding="utf-8"))
        entries = index["evaluations"]
        if not all(isinstance(e, dict) and isinstance(e["summary"], str) for e in entries):
            return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return index


def _entry(eval_dir: Path, summary_path: Path) -> dict[str, Any]:
    """The index entry of an evaluation, from its ``summary.json``."""
    st = _read_settings(summary_path.parent) or {}
    return {"summary": str(summary_path.relative_to(eval_dir)), "key": evaluation_key(st),
            "n": st.get("n"), "attacks": [a["attack"] for a in st.get("attacks", [])]}


def _entries(eval_dir: Path, index: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    """The index's entries whose summary exists, plus every evaluation found in the folders
    that it does not list (a main evaluation moved aside; all of them when the index is
    missing or damaged)."""
    known = {e["summary"]: e for e in (index or {}).get("evaluations", []) if
             (eval_dir / e["summary"]).exists()}
    for sub in [eval_dir / SUMMARY, *sorted(eval_dir.glob(f"*/{SUMMARY}"))]:
        r = str(sub.relative_to(eval_dir))
        if r not in known and sub.exists():
            known[r] = _entry(eval_dir, sub)
    return known


def _ordered(known: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(known.values(), key=lambda e: (e["summary"] != SUMMARY, e["summary"]))


def _update_index(eval_dir: Path, folder: Path, summary: dict[str, Any]) -> None:
    path = eval_dir / INDEX
    index = _read_index(eval_dir)
    if index is None and path.exists():
        log.warning("%s was damaged; rebuilt from the evaluations in %s", path, eval_dir)
    rel = str((folder / SUMMARY).relative_to(eval_dir))
    s = summary.get("settings", {})
    entry = {"summary": rel, "key": evaluation_key(s), "n": summary.get("n"),
             "attacks": list(summary.get("attacks", {})),
             "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    known = _entries(eval_dir, index)
    known[rel] = entry
    out = {"main": SUMMARY, **(index or {})}
    out["evaluations"] = _ordered(known)
    atomic_write_json(path, out)


def describe_evaluation(settings: dict[str, Any], where: str = "eval/summary.json") -> str:
    """One line naming an evaluation: its file, ε, norm, images, seed and checkpoint (and its
    EMA or averaged weights)."""
    sub = settings.get("subset") or {}
    imgs = (f"{sub.get('n')} of {sub.get('of')} {sub.get('split', '')} images"
            + (" (class-stratified)" if sub.get("indices") else "")) if sub else \
        f"{settings.get('n')} images"
    eps = settings.get("eps")
    ck = settings.get("checkpoint")
    w = settings.get("weights")
    return (f"{where}: eps {float(eps):.4g} ({settings.get('norm')}), {imgs}, seed "
            f"{settings.get('seed')}" + (f", checkpoint {Path(str(ck)).name}" if ck else "")
            + (f" ({w} weights)" if w in ("ema", "averaged") else "")
            + (", attacks partly in bf16" if precision_used(settings) == "bf16" else "")
            if eps is not None else where)


def list_evaluations(eval_dir: Path) -> list[dict[str, Any]]:
    """The entries of ``eval/index.json``; when it is missing or damaged, those found in the
    evaluation folders (empty when there are none)."""
    eval_dir = Path(eval_dir)
    index = _read_index(eval_dir)
    if index is not None:
        return list(index["evaluations"])
    if (eval_dir / INDEX).exists():
        log.warning("%s is damaged; the evaluations are listed from the folders (the next "
                    "'robustfair eval' rewrites it)", eval_dir / INDEX)
    return _ordered(_entries(eval_dir, None)) if eval_dir.is_dir() else []


__all__ = ["check_record", "describe_evaluation", "evaluation_key", "list_evaluations", "merge",
           "record_evaluation"]
