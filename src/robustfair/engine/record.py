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
from pathlib import Path
from typing import Any

import torch

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
        except (OSError, ValueError, KeyError):
            log.warning("%s could not be merged; it is kept as %s", folder / MATRIX,
                        folder / "summary_previous.json")
            shutil.copy(folder / SUMMARY, folder / "summary_previous.json")
    summary = result.save(folder)
    _update_index(eval_dir, folder, summary)
    return summary, folder


def _update_index(eval_dir: Path, folder: Path, summary: dict[str, Any]) -> None:
    path = eval_dir / INDEX
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        index = {"main": SUMMARY, "evaluations": []}
    rel = str((folder / SUMMARY).relative_to(eval_dir))
    s = summary.get("settings", {})
    entry = {"summary": rel, "key": evaluation_key(s), "n": summary.get("n"),
             "attacks": list(summary.get("attacks", {})),
             "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    known = {e["summary"]: e for e in index.get("evaluations", []) if
             (eval_dir / e["summary"]).exists()}
    known[rel] = entry
    for sub in eval_dir.glob(f"*/{SUMMARY}"):  # a main evaluation moved aside
        r = str(sub.relative_to(eval_dir))
        if r not in known:
            st = _read_settings(sub.parent) or {}
            known[r] = {"summary": r, "key": evaluation_key(st), "n": st.get("n"),
                        "attacks": [a["attack"] for a in st.get("attacks", [])]}
    index["evaluations"] = sorted(known.values(), key=lambda e: (e["summary"] != SUMMARY,
                                                                 e["summary"]))
    atomic_write_json(path, index)


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
    """The entries of ``eval/index.json`` (empty when there is none)."""
    try:
        return list(json.loads((Path(eval_dir) / INDEX).read_text(encoding="utf-8"))
                    .get("evaluations", []))
    except (OSError, ValueError):
        return []


__all__ = ["describe_evaluation", "evaluation_key", "list_evaluations", "merge",
           "record_evaluation"]
