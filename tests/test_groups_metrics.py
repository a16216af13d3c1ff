"""Group metrics: parity with fairlearn on random predictions, hand-checked worst groups, and the
group block that every evaluation summary of a dataset with groups carries."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from robustfair.engine.evaluator import EvalResult
from robustfair.metrics.groups import (
    demographic_parity_difference,
    equal_opportunity_difference,
    equalized_odds_difference,
    group_metrics,
    group_table,
    pairwise_ed,
)

fm = pytest.importorskip("fairlearn.metrics")


def _random(n: int, c: int, g: int, seed: int) -> tuple[torch.Tensor, ...]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, c, n)
    z = rng.integers(0, g, n)
    # predictions that depend on the group, so that the differences are far from zero
    p_right = 0.5 + 0.4 * z / max(g - 1, 1)
    pred = np.where(rng.random(n) < p_right, y, (z + rng.integers(0, 2, n)) % c)
    return torch.from_numpy(y), torch.from_numpy(pred), torch.from_numpy(z)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("groups", [2, 3])
def test_binary_metrics_equal_fairlearn(seed: int, groups: int) -> None:
    y, pred, z = _random(600, 2, groups, seed)
    yn, pn, zn = y.numpy(), pred.numpy(), z.numpy()
    dp = fm.demographic_parity_difference(yn, pn, sensitive_features=zn)
    eo = fm.equalized_odds_difference(yn, pn, sensitive_features=zn)
    eop = fm.equal_opportunity_difference(yn, pn, sensitive_features=zn)
    assert demographic_parity_difference(pred, z, 2) == pytest.approx(dp, abs=1e-12)
    assert equalized_odds_difference(y, pred, z, 2) == pytest.approx(eo, abs=1e-12)
    assert equal_opportunity_difference(y, pred, z, 2) == pytest.approx(eop, abs=1e-12)
    # the pairwise ED of Dr-Fairness equals the equalized-odds difference for a binary task
    assert pairwise_ed(y, pred, z, 2) == pytest.approx(eo, abs=1e-12)
    assert dp > 0.01 and eo > 0.01


def test_multiclass_metrics_are_the_one_vs_rest_maximum_of_fairlearn() -> None:
    y, pred, z = _random(900, 4, 3, 7)
    yn, pn, zn = y.numpy(), pred.numpy(), z.numpy()
    dp = max(fm.demographic_parity_difference((yn == c).astype(int), (pn == c).astype(int),
                                              sensitive_features=zn) for c in range(4))
    eo = max(fm.equalized_odds_difference((yn == c).astype(int), (pn == c).astype(int),
                                          sensitive_features=zn) for c in range(4))
    eop = max(fm.equal_opportunity_difference((yn == c).astype(int), (pn == c).astype(int),
                                              sensitive_features=zn) for c in range(4))
    assert demographic_parity_difference(pred, z, 4) == pytest.approx(dp, abs=1e-12)
    assert equalized_odds_difference(y, pred, z, 4) == pytest.approx(eo, abs=1e-12)
    assert equal_opportunity_difference(y, pred, z, 4) == pytest.approx(eop, abs=1e-12)


def test_per_group_and_worst_group_by_hand() -> None:
    # group 0: labels 0,0,1,1 predicted 0,0,1,0 -> 3/4 ; group 1: labels 0,1 predicted 1,1 -> 1/2
    y = torch.tensor([0, 0, 1, 1, 0, 1])
    pred = torch.tensor([0, 0, 1, 0, 1, 1])
    z = torch.tensor([0, 0, 0, 0, 1, 1])
    m = group_metrics(pred == y, pred, y, z, 2)
    assert m["per_group"] == pytest.approx([0.75, 0.5])
    assert m["worst_group"] == pytest.approx(0.5) and m["worst_group_index"] == 1
    # cells: (0,0) 2/2, (0,1) 0/1, (1,0) 1/2, (1,1) 1/1
    assert m["per_label_group"] == [pytest.approx([1.0, 0.0]), pytest.approx([0.5, 1.0])]
    assert m["worst_label_group"] == 0.0 and m["worst_label_group_index"] == [0, 1]
    # P(ŷ=1|z): 1/4 vs 2/2 ; TPR: 1/2 vs 1 ; FPR: 0 vs 1
    assert m["dp_diff"] == pytest.approx(0.75)
    assert m["eopp_diff"] == pytest.approx(0.5)
    assert m["eqodds_diff"] == pytest.approx(1.0)
    assert m["ed_pairwise"] == pytest.approx(1.0)


def test_every_summary_with_groups_has_the_group_block_clean_and_attacked() -> None:
    y, pred, z = _random(200, 2, 2, 3)
    pred_adv = torch.where(z == 1, 1 - y, pred)  # the attack breaks group 1 entirely
    correct = torch.stack([pred == y, pred_adv == y])
    res = EvalResult(["clean", "pgd20"], correct, torch.stack([pred, pred_adv]), y, 2, z,
                     {"group_names": ["a", "b"], "class_names": ["no", "yes"]})
    s = res.summary()
    g = s["groups"]
    assert g["names"] == ["a", "b"] and sum(g["counts"]) == 200
    assert g["attacks"]["pgd20"]["per_group"][1] == 0.0
    assert g["attacks"]["pgd20"]["worst_group"] == 0.0
    clean_acc_b = float((pred == y)[z == 1].float().mean())
    assert g["attacks"]["clean"]["per_group"][1] == pytest.approx(clean_acc_b)
    text = group_table(s)
    assert "EqOdds difference" in text and "pgd20" in text and "b" in text
    # a summary of data without groups has no block
    res2 = EvalResult(["clean"], correct[:1], pred[None], y, 2, None, {})
    assert "groups" not in res2.summary()


def test_multiclass_differences_by_hand_and_named_so() -> None:
    # 3 classes, 2 groups. P(ŷ=c|z): c=0 1/3 vs 2/3, c=1 2/3 vs 0, c=2 0 vs 1/3 -> DP 2/3 (c=1)
    # TPR: c=0 1 vs 1, c=1 1 vs 0, c=2 0 vs 1 -> EqOpp 1; FPR: c=0 0 vs 1/2, c=1 1/2 vs 0, c=2 0
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    pred = torch.tensor([0, 1, 1, 0, 0, 2])
    z = torch.tensor([0, 0, 0, 1, 1, 1])
    assert demographic_parity_difference(pred, z, 3) == pytest.approx(2 / 3)
    assert equal_opportunity_difference(y, pred, z, 3) == pytest.approx(1.0)
    assert equalized_odds_difference(y, pred, z, 3) == pytest.approx(1.0)
    from robustfair.engine.evaluator import EvalResult
    from robustfair.metrics.groups import group_table

    res = EvalResult(["clean"], (pred == y)[None], pred[None], y, 3, z)
    summary = res.summary()
    assert "one-vs-rest" in summary["groups"]["differences"]
    table = group_table(summary)
    assert "maximum over classes of the one-vs-rest" in table.splitlines()[0]
    assert any(line.startswith("DP max-OvR diff") and "66.7" in line
               for line in table.splitlines())
    binary = EvalResult(["clean"], (pred.clamp(max=1) == y.clamp(max=1))[None],
                        pred.clamp(max=1)[None], y.clamp(max=1), 2, z).summary()
    assert "fairlearn definitions" in group_table(binary).splitlines()[0]
