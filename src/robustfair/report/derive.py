"""Figures derived for the report from the saved evaluation matrix and the training log.

Everything here is recomputed from ``eval/summary_matrix.npz`` (no attack is re-run) or read
from ``log.jsonl``, and is saved to ``report_data.json`` so that each number on the page can be
traced to a JSON file.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from ..metrics.classwise import class_summary


def confusion(result: Any, attack: str) -> dict[str, Any]:
    """Confusion matrix (rows: true class, columns: predicted class) under ``attack``.

    ``counts`` are sample counts; ``rows`` are the counts divided by their row sum, i.e. the
    class-``i`` mean of the one-hot prediction: the argmax form of DAFA's class similarity
    P[i, j] = E_{x ∈ class i} p_j(x_adv) (Lee et al., "DAFA", ICLR 2024, arXiv 2401.12532).
    """
    counts = result.confusion(attack)
    total = counts.sum(1, keepdim=True)
    rows = torch.where(total > 0, counts.double() / total.clamp_min(1).double(),
                       torch.full(counts.shape, float("nan"), dtype=torch.double))
    return {
        "attack": attack,
        "counts": counts.tolist(),
        "rows": [[None if math.isnan(v) else float(v) for v in r] for r in rows.tolist()],
    }


def group_accuracy(result: Any) -> dict[str, Any] | None:
    """Accuracy per group under every attack (and the per-sample worst case), from the
    matrix's ``groups``; ``None`` when the data has no groups."""
    if result.groups is None:
        return None
    g = result.groups.long()
    num_groups = int(g.max()) + 1 if len(g) else 0
    out: dict[str, Any] = {"num_groups": num_groups, "attacks": {}}
    rows = {a: result.row(a) for a in result.attacks}
    adv = [a for a in result.attacks if a != "clean"]
    if len(adv) > 1:
        rows["worst_case"] = result.correct[[result.attacks.index(a) for a in adv]].all(0)
    for a, correct in rows.items():
        s = class_summary(correct, g, num_groups)
        out["attacks"][a] = {k: s[k] for k in ("avg", "per_class", "counts", "worst",
                                               "worst_class", "gap") if k in s}
    return out


def _flatten(d: dict[str, Any], prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    out: dict[tuple[str, ...], Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, (*prefix, str(k))))
        else:
            out[(*prefix, str(k))] = v
    return out


def _is_num(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def _numbers(v: Any) -> tuple[list[float], list[tuple[int, ...]]] | None:
    """A scalar, a list or a rectangular list of lists of numbers, flattened, with the index
    of each entry; ``None`` for anything else."""
    if _is_num(v):
        return [float(v)], [()]
    if isinstance(v, list) and v and all(_is_num(x) for x in v):
        return [float(x) for x in v], [(i,) for i in range(len(v))]
    if (isinstance(v, list) and v and all(isinstance(r, list) and r for r in v)
            and len({len(r) for r in v}) == 1 and all(_is_num(x) for r in v for x in r)):
        return ([float(x) for r in v for x in r],
                [(i, j) for i in range(len(v)) for j in range(len(v[0]))])
    return None


def method_state(log_lines: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Numbers the method's policy and sampler logged over epochs.

    Each ``log.jsonl`` line may hold ``"policy"`` and ``"sampler"`` dicts (e.g. DAFA's class
    weights, FRL's class-wise ε, Dr-Fairness' λ and μ per label and group). Every numeric scalar,
    list of numbers or rectangular list of lists found there (nested dicts are walked) becomes
    one series ``{"part", "path", "epochs", "lines", "index", "shape", "values"}``: ``values[e]``
    is the flattened entry logged at ``epochs[e]`` (``log.jsonl`` line ``lines[e]``) and
    ``index[k]`` the position of its ``k``-th number. Keys whose shape changes are skipped.
    """
    series: dict[tuple[str, ...], dict[str, Any]] = {}
    for i, line in enumerate(log_lines):
        for part in ("policy", "sampler"):
            d = line.get(part)
            if not isinstance(d, dict):
                continue
            for path, v in _flatten(d).items():
                found = _numbers(v)
                if found is None:
                    continue
                nums, index = found
                s = series.setdefault((part, *path), {
                    "part": part, "path": list(path), "epochs": [], "lines": [],
                    "index": index, "values": [], "consistent": True,
                    "shape": [len(v), len(v[0])] if index and len(index[0]) == 2 else
                    [len(v)] if index and len(index[0]) == 1 else []})
                s["consistent"] &= s["index"] == index
                s["epochs"].append(int(line.get("epoch", i + 1)))
                s["lines"].append(i)
                s["values"].append(nums)
    return [s for s in series.values() if s.pop("consistent")]


def as_array(values: list[list[float]]) -> np.ndarray:
    return np.array(values, dtype=float)
