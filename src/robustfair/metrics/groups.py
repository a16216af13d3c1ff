"""Group metrics: per-group and worst-group accuracy (clean and under attack), and the
demographic-parity, equalized-odds and equal-opportunity differences with fairlearn's
definitions, plus the pairwise ED of Dr-Fairness (Roh et al., TMLR 2023).

Definitions (``y`` label, ``z`` group, ``ŷ`` prediction, "range" = max − min over the groups that
have samples for that rate; all rates divide by the count of their own cell):

- binary task (2 classes, positive label 1), exactly as ``fairlearn.metrics``:
  - DP difference  = range_z P(ŷ=1 | z)  (``demographic_parity_difference``)
  - EqOdds difference = max(range_z TPR_z, range_z FPR_z)  (``equalized_odds_difference``)
  - EqOpp difference = range_z TPR_z  (``equal_opportunity_difference``)
- more than 2 classes: the same quantities one-vs-rest for each class ``c`` (ŷ=c against y=c),
  and the maximum over ``c``;
- pairwise ED (Dr-Fairness) = max_y max_{z,z'} |P(ŷ=y | y, z) − P(ŷ=y | y, z')|, the largest
  within-label accuracy gap between two groups. For a binary task it equals the EqOdds difference.

FairBatch's own evaluation code uses a different form (deviation of each group from the overall
rate); the figures here are the fairlearn ones.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "demographic_parity_difference",
    "difference_definition",
    "equal_opportunity_difference",
    "equalized_odds_difference",
    "group_accuracy",
    "group_metrics",
    "group_summary_hook",
    "group_table",
    "label_group_accuracy",
    "pairwise_ed",
]


def _range(values: Tensor) -> float:
    """max − min over the finite entries (0 when fewer than two)."""
    v = values[torch.isfinite(values)]
    return float(v.max() - v.min()) if v.numel() > 1 else 0.0


def _rate(hit: Tensor, mask: Tensor, groups: Tensor, num_groups: int) -> Tensor:
    """P(hit | mask, z) for every group z; NaN for a group with no sample in ``mask``."""
    g = groups[mask]
    n = torch.bincount(g, minlength=num_groups).double()
    k = torch.bincount(g, weights=hit[mask].double(), minlength=num_groups)
    return torch.where(n > 0, k / n.clamp_min(1), torch.full_like(n, float("nan")))


def _prep(*ts: Tensor) -> list[Tensor]:
    return [torch.as_tensor(t).long().cpu().flatten() for t in ts]


def _positives(num_classes: int, positive: int | None) -> list[int]:
    if positive is not None:
        return [positive]
    return [1] if num_classes == 2 else list(range(num_classes))


def demographic_parity_difference(pred: Tensor, groups: Tensor, num_classes: int = 2,
                                  positive: int | None = None) -> float:
    """range_z P(ŷ=c | z), for c = the positive label (binary) or the max over every class."""
    pred, groups = _prep(pred, groups)
    g_n = int(groups.max()) + 1 if len(groups) else 0
    every = torch.ones_like(pred, dtype=torch.bool)
    return max(_range(_rate(pred == c, every, groups, g_n))
               for c in _positives(num_classes, positive))


def _tpr_fpr(labels: Tensor, pred: Tensor, groups: Tensor, c: int, g_n: int
             ) -> tuple[Tensor, Tensor]:
    hit = pred == c
    return _rate(hit, labels == c, groups, g_n), _rate(hit, labels != c, groups, g_n)


def equalized_odds_difference(labels: Tensor, pred: Tensor, groups: Tensor, num_classes: int = 2,
                              positive: int | None = None) -> float:
    """max(range_z TPR_z, range_z FPR_z) (fairlearn's ``worst_case``); one-vs-rest max for C>2."""
    labels, pred, groups = _prep(labels, pred, groups)
    g_n = int(groups.max()) + 1 if len(groups) else 0
    out = 0.0
    for c in _positives(num_classes, positive):
        tpr, fpr = _tpr_fpr(labels, pred, groups, c, g_n)
        out = max(out, _range(tpr), _range(fpr))
    return out


def equal_opportunity_difference(labels: Tensor, pred: Tensor, groups: Tensor,
                                 num_classes: int = 2, positive: int | None = None) -> float:
    """range_z TPR_z (fairlearn's ``equal_opportunity_difference``); one-vs-rest max for C>2."""
    labels, pred, groups = _prep(labels, pred, groups)
    g_n = int(groups.max()) + 1 if len(groups) else 0
    return max(_range(_tpr_fpr(labels, pred, groups, c, g_n)[0])
               for c in _positives(num_classes, positive))


def label_group_accuracy(correct: Tensor, labels: Tensor, groups: Tensor, num_classes: int,
                         num_groups: int) -> tuple[Tensor, Tensor]:
    """(accuracy per (y, z) cell, count per cell), both (C, G); NaN for an empty cell."""
    correct = torch.as_tensor(correct).bool().cpu().flatten()
    labels, groups = _prep(labels, groups)
    cell = labels * num_groups + groups
    n = torch.bincount(cell, minlength=num_classes * num_groups).double()
    k = torch.bincount(cell, weights=correct.double(), minlength=num_classes * num_groups)
    acc = torch.where(n > 0, k / n.clamp_min(1), torch.full_like(n, float("nan")))
    return acc.view(num_classes, num_groups), n.long().view(num_classes, num_groups)


def group_accuracy(correct: Tensor, groups: Tensor, num_groups: int) -> tuple[Tensor, Tensor]:
    """(accuracy per group, count per group); NaN for an empty group."""
    correct = torch.as_tensor(correct).bool().cpu().flatten()
    (groups,) = _prep(groups)
    n = torch.bincount(groups, minlength=num_groups).double()
    k = torch.bincount(groups, weights=correct.double(), minlength=num_groups)
    return torch.where(n > 0, k / n.clamp_min(1), torch.full_like(n, float("nan"))), n.long()


def pairwise_ed(labels: Tensor, pred: Tensor, groups: Tensor, num_classes: int | None = None
                ) -> float:
    """Dr-Fairness's ED: max_y max_{z,z'} |P(ŷ=y | y, z) − P(ŷ=y | y, z')|."""
    labels, pred, groups = _prep(labels, pred, groups)
    c_n = num_classes or int(labels.max()) + 1
    g_n = int(groups.max()) + 1 if len(groups) else 0
    acc, _ = label_group_accuracy(pred == labels, labels, groups, c_n, g_n)
    return max((_range(acc[y]) for y in range(c_n)), default=0.0)


def _nan_none(t: Tensor) -> list[Any]:
    return [None if math.isnan(v) else float(v) for v in t.flatten().tolist()]


def _worst(acc: Tensor) -> tuple[float, int]:
    finite = torch.isfinite(acc.flatten())
    if not bool(finite.any()):
        return float("nan"), -1
    flat = torch.where(finite, acc.flatten(), torch.full_like(acc.flatten(), float("inf")))
    i = int(torch.argmin(flat))
    return float(flat[i]), i


def group_metrics(correct: Tensor, pred: Tensor | None, labels: Tensor, groups: Tensor,
                  num_classes: int, num_groups: int | None = None) -> dict[str, Any]:
    """Every group figure for one row of the evaluation matrix (one attack).

    ``correct`` (N,) bool, ``pred`` (N,) predicted labels (None: accuracy figures only)."""
    labels, groups = _prep(labels, groups)
    g_n = num_groups or (int(groups.max()) + 1 if len(groups) else 0)
    acc_g, _ = group_accuracy(correct, groups, g_n)
    acc_yz, _ = label_group_accuracy(correct, labels, groups, num_classes, g_n)
    worst_g, wg = _worst(acc_g)
    worst_yz, wyz = _worst(acc_yz)
    out: dict[str, Any] = {
        "per_group": _nan_none(acc_g),
        "worst_group": worst_g,
        "worst_group_index": wg,
        "group_gap": _range(acc_g),
        "per_label_group": [_nan_none(r) for r in acc_yz],
        "worst_label_group": worst_yz,
        "worst_label_group_index": [wyz // g_n, wyz % g_n] if wyz >= 0 else None,
    }
    if pred is not None:
        (pred,) = _prep(pred)
        out.update({
            "dp_diff": demographic_parity_difference(pred, groups, num_classes),
            "eqodds_diff": equalized_odds_difference(labels, pred, groups, num_classes),
            "eopp_diff": equal_opportunity_difference(labels, pred, groups, num_classes),
            "ed_pairwise": pairwise_ed(labels, pred, groups, num_classes),
        })
    return out


def group_summary_hook(result: Any, summary: dict[str, Any]) -> None:
    """Add ``summary["groups"]`` (every attack's group figures) when the samples have groups.

    Registered in :data:`robustfair.engine.evaluator.SUMMARY_HOOKS`."""
    groups = getattr(result, "groups", None)
    if groups is None or len(groups) == 0:
        return
    groups = groups.long().cpu()
    settings = getattr(result, "settings", {}) or {}
    names = list(settings.get("group_names") or [])
    g_n = max(int(groups.max()) + 1, len(names))
    _, counts = group_accuracy(torch.ones_like(groups, dtype=torch.bool), groups, g_n)
    _, cell = label_group_accuracy(torch.ones_like(groups, dtype=torch.bool), result.labels,
                                   groups, result.num_classes, g_n)
    block: dict[str, Any] = {
        "num_groups": g_n,
        "names": names or [str(i) for i in range(g_n)],
        "counts": counts.tolist(),
        "label_group_counts": cell.tolist(),
        "differences": difference_definition(result.num_classes),
        "attacks": {},
    }
    for i, a in enumerate(result.attacks):
        block["attacks"][a] = group_metrics(result.correct[i], result.pred[i], result.labels,
                                            groups, result.num_classes, g_n)
    adv = [i for i, a in enumerate(result.attacks) if a != "clean"]
    if len(adv) > 1:
        block["worst_case"] = group_metrics(result.correct[adv].all(0), None, result.labels,
                                            groups, result.num_classes, g_n)
    summary["groups"] = block


def difference_definition(num_classes: int) -> str:
    """How the DP / EqOdds / EqOpp differences are defined for ``num_classes`` labels, in the
    words every table and report uses."""
    if num_classes <= 2:
        return "fairlearn definitions, positive label 1"
    return ("the maximum over classes of the one-vs-rest differences (fairlearn defines them "
            "for binary labels only)")


def _pct(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "  -  "
    return f"{100 * v:5.1f}"


def group_table(summary: dict[str, Any]) -> str:
    """A text table of the group figures of a summary (empty string when it has none)."""
    block = summary.get("groups")
    if not block:
        return ""
    cols = list(block["attacks"])
    data = dict(block["attacks"])
    if "worst_case" in block:
        cols.append("worst-case")
        data["worst-case"] = block["worst_case"]
    names = block["names"]
    class_names = summary.get("settings", {}).get("class_names") or [
        str(i) for i in range(summary.get("num_classes", 0))]
    w = max(8, *(len(c) + 1 for c in cols))
    nw = max(20, *(len(str(n)) + 1 for n in names))
    multi = summary.get("num_classes", 2) > 2
    lines = [f"group accuracy (%) and fairness differences (%; "
             f"{difference_definition(summary.get('num_classes', 2))})",
             f"{'group':<{nw}} {'count':>6} " + " ".join(f"{c:>{w}}" for c in cols)]
    for k, name in enumerate(names):
        lines.append(f"{str(name):<{nw}} {block['counts'][k]:>6} " + " ".join(
            f"{_pct(data[c]['per_group'][k]):>{w}}" for c in cols))
    lines.append("-" * (nw + 8 + (w + 1) * len(cols)))
    rows = [("worst group", "worst_group"), ("worst (y,z) cell", "worst_label_group"),
            ("DP difference", "dp_diff"), ("EqOdds difference", "eqodds_diff"),
            ("EqOpp difference", "eopp_diff"), ("ED (pairwise)", "ed_pairwise")]
    if multi:  # one-vs-rest maxima: say so in the row label too
        rows = [(f"{lbl[:-11]} max-OvR diff" if lbl.endswith(" difference") else lbl, key)
                for lbl, key in rows]
    for label, key in rows:
        lines.append(f"{label:<{nw}} {'':>6} " + " ".join(
            f"{_pct(data[c].get(key)):>{w}}" for c in cols))
    first = data[cols[0]].get("worst_label_group_index")
    if first is not None:
        y, z = first
        yn = class_names[y] if y < len(class_names) else str(y)
        lines.append(f"worst (y,z) cell under {cols[0]}: label {yn}, group {names[z]}")
    return "\n".join(lines)
