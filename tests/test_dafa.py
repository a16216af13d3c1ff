"""DAFA: the weight rule, the warm-up/collection/freeze timeline, per-class ε in the attack
through the trainer, and resume with the weights."""

from __future__ import annotations

import json

import pytest
import torch

from robustfair.config import load_config
from robustfair.data import load_data
from robustfair.engine.trainer import Trainer, prepare_run_dir
from robustfair.objectives.base import BuildContext, ObjectiveOutput
from robustfair.policies import POLICIES
from robustfair.policies.dafa import dafa_weights

P3 = torch.tensor([[0.50, 0.30, 0.20],
                   [0.10, 0.80, 0.10],
                   [0.05, 0.05, 0.90]], dtype=torch.float64)


def test_dafa_weights_by_hand_three_classes():
    # p_0(0)=.5 < p_1(1)=.8 < p_2(2)=.9: class 0 is hardest.
    # W0 = 1 + .3·.8 + .2·.9 = 1.42;  W1 = 1 + .1·.9 − .3·.8 = 0.85;  W2 = 1 − .2·.9 − .1·.9 = 0.73
    w = dafa_weights(P3, lam=1.0)
    assert torch.allclose(w, torch.tensor([1.42, 0.85, 0.73], dtype=torch.float64))
    assert float(w.sum()) == pytest.approx(3.0)  # zero-sum: the mean weight stays 1
    assert int(w.argmax()) == 0  # the harder class gains
    w15 = dafa_weights(P3, lam=1.5)
    assert torch.allclose(w15 - 1, 1.5 * (w - 1))  # linear in λ


def _paper_loop(p: torch.Tensor, lam: float) -> torch.Tensor:
    c = len(p)
    w = torch.ones(c, dtype=torch.float64)
    for i in range(c):
        for j in range(c):
            if i == j:
                continue
            if p[i, i] < p[j, j]:
                w[i] += lam * p[i, j] * p[j, j]
            elif p[i, i] > p[j, j]:
                w[i] -= lam * p[j, i] * p[i, i]
    return w


def test_dafa_weights_match_the_algorithm_and_sum_to_c():
    g = torch.Generator().manual_seed(0)
    for c in (2, 5, 10):
        p = torch.softmax(torch.randn(c, c, generator=g) + 3 * torch.eye(c), 1).double()
        w = dafa_weights(p, 1.0)
        assert torch.allclose(w, _paper_loop(p, 1.0))
        assert float(w.sum()) == pytest.approx(c)


def test_dafa_ties_move_nothing():
    p = torch.tensor([[0.6, 0.4], [0.4, 0.6]], dtype=torch.float64)
    assert torch.allclose(dafa_weights(p, 1.0), torch.ones(2, dtype=torch.float64))


def _policy(**params):
    ctx = BuildContext(num_classes=3, in_channels=1, image_size=8, extra={"epochs": 5})
    return POLICIES.build({"name": "dafa", **params}, ctx=ctx)


def _out(logits_adv: torch.Tensor, natural: torch.Tensor, robust: torch.Tensor) -> ObjectiveOutput:
    return ObjectiveOutput({"natural": natural, "robust": robust}, None, logits_adv)


def test_dafa_policy_collects_in_epoch_tau_then_freezes():
    pol = _policy(warmup=2)
    y = torch.tensor([0, 1, 2, 0])
    logits = torch.log(P3[y].float())  # softmax(log p) = p: class means are exactly P3
    nat, rob = torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([0.5, 0.5, 0.5, 0.5])
    from robustfair.policies import EpochContext

    def epoch(e: int) -> None:
        pol.on_epoch_start(e)
        pol.observe(None, y, _out(logits, nat, rob), torch.arange(4))
        pol.on_epoch_end(EpochContext(e, 5, torch.nn.Identity(), 3, torch.device("cpu")))

    epoch(1)  # warm-up: nothing collected or applied
    assert pol.eps_scale(y) is None and not pol.active
    assert torch.equal(pol.combine(_out(logits, nat, rob), y), nat + rob)
    epoch(2)  # epoch τ: collect, then compute W
    assert pol.active
    assert torch.allclose(pol.similarity, P3, atol=1e-6)
    w = torch.tensor([1.42, 0.85, 0.73])
    assert torch.allclose(pol.eps_scale(y), w[y], atol=1e-6)
    # TRADES: W weights the clean CE term only
    assert torch.allclose(pol.combine(_out(logits, nat, rob), y), w[y] * nat + rob, atol=1e-6)
    epoch(3)  # frozen afterwards, whatever the predictions
    assert torch.allclose(pol.eps_scale(y), w[y], atol=1e-6)
    # PGD-AT (only a "robust" term): W weights the whole loss
    out = ObjectiveOutput({"robust": rob}, None, logits)
    assert torch.allclose(pol.combine(out, y), w[y] * rob, atol=1e-6)


def test_dafa_min_weight_clamps():
    pol = _policy(warmup=1, lam=4.0, min_weight=0.1)
    from robustfair.policies import EpochContext

    y = torch.tensor([0, 1, 2])
    pol.on_epoch_start(1)
    pol.observe(None, y, _out(torch.log(P3.float()), y.float(), y.float()), torch.arange(3))
    pol.on_epoch_end(EpochContext(1, 5, torch.nn.Identity(), 3, torch.device("cpu")))
    assert float(dafa_weights(P3, 4.0).min()) < 0  # the unclamped rule goes negative here
    assert float(pol.weights.min()) == pytest.approx(0.1)


# --------------------------------------------------------------------------- through the trainer
@pytest.fixture(scope="module")
def small_digits():
    from robustfair.config import DataConfig

    return load_data(DataConfig(name="digits", val_size=60, train_limit=240, test_limit=60))


def _cfg(tmp_path, objective="trades", epochs=2, extra=()):
    return load_config(recipe="mnist5k-trades", overrides=[
        "data.name=digits", "data.val_size=60", "data.train_limit=240", "data.test_limit=60",
        "model.params={width: 0.25, dropout: 0.0}", f"train.epochs={epochs}",
        "train.batch_size=80", "attack.eps=0.1", "attack.step_size=0.08", "attack.steps=3",
        f"method.objective.name={objective}", "method.policy.name=dafa",
        "method.policy.warmup=1", "validation.every=0", "eval.attacks=[clean]",
        "logging.progress=false", f"output_dir={tmp_path}", "name=dafa-test", *extra])


@pytest.mark.parametrize("objective", ["trades", "pgd_at", "bat"])
def test_per_class_eps_reaches_the_attack(tmp_path, small_digits, objective):
    cfg = _cfg(tmp_path, objective, epochs=1)
    tr = Trainer(cfg, prepare_run_dir(cfg, force=True), data=small_digits, quiet=True)
    tr.fit()  # one warm-up epoch: the fresh model's zero last layer has no input gradient
    w = torch.ones(10, dtype=torch.float64)
    w[0::2] = 0.5  # even classes: half the radius; odd classes: 1.5 ε
    w[1::2] = 1.5
    st = tr.policy.state_dict()
    st.update(weights=w, active=True)
    tr.policy.load_state_dict(st)
    seen = {}
    original = tr.policy.observe

    def spy(x, y, out, index):
        seen.update(x=x, y=y, x_adv=out.x_adv)
        original(x, y, out, index)

    tr.policy.observe = spy
    tr.train_step(torch.arange(80), tr._new_stats())
    delta = (seen["x_adv"] - seen["x"]).abs().flatten(1).amax(1)
    radius = (w.float()[seen["y"]] * cfg.attack.eps)
    assert bool((delta <= radius + 1e-6).all())
    odd = seen["y"] % 2 == 1
    # the larger radius is used: the attack goes beyond the uniform ε for the up-weighted classes
    assert float(delta[odd].max()) > cfg.attack.eps + 1e-3
    assert float(delta[~odd].max()) <= 0.5 * cfg.attack.eps + 1e-6


def test_dafa_state_survives_resume(tmp_path, small_digits):
    # the uninterrupted reference: 3 epochs, weights computed after epoch 1 (τ = 1)
    ref_cfg = _cfg(tmp_path / "ref", epochs=3)
    ref = Trainer(ref_cfg, prepare_run_dir(ref_cfg, force=True), data=small_digits, quiet=True)
    ref.fit()
    assert ref.policy.active and not torch.allclose(ref.policy.weights, torch.ones(10).double())
    # the same run stopped after epoch 2, then resumed to 3 epochs by a fresh trainer
    cfg2 = _cfg(tmp_path / "cut", epochs=2)
    run_dir = prepare_run_dir(cfg2, force=True)
    first = Trainer(cfg2, run_dir, data=small_digits, quiet=True)
    first.fit()
    saved = first.policy.weights.clone()
    cfg3 = _cfg(tmp_path / "cut", epochs=3)
    resumed = Trainer(cfg3, run_dir, data=small_digits, quiet=True)
    assert not resumed.policy.active  # a fresh policy before loading the checkpoint
    resumed.fit(resume=True)
    assert resumed.policy.active
    assert torch.equal(resumed.policy.weights, saved)
    assert torch.allclose(resumed.policy.weights, ref.policy.weights)
    assert torch.allclose(resumed.policy.similarity, ref.policy.similarity)
    lines = [json.loads(s) for s in (run_dir / "log.jsonl").read_text().splitlines()]
    assert [ln["epoch"] for ln in lines] == [1, 2, 3]
    assert lines[-1]["policy"]["weights"] == pytest.approx(saved.tolist(), abs=1e-5)


# --------------------------------------------------------------------------- class-distance analysis
def test_correlation_matches_scipy():
    from scipy import stats

    from robustfair.analysis.class_distance import correlation

    g = torch.Generator().manual_seed(0)
    a = torch.randn(10, generator=g).double()
    b = torch.tensor([1, 2, 2, 3, 5, 5, 5, 0, 9, 4], dtype=torch.float64)  # with ties
    got = correlation(a, b)
    assert got["pearson"] == pytest.approx(stats.pearsonr(a.numpy(), b.numpy())[0], abs=1e-9)
    assert got["spearman"] == pytest.approx(stats.spearmanr(a.numpy(), b.numpy())[0], abs=1e-9)


def test_analyze_class_distance_on_a_run(tmp_path, small_digits):
    from robustfair.analysis.class_distance import analyze_class_distance
    from robustfair.engine.evaluator import evaluate
    from robustfair.metrics import per_class_accuracy

    cfg = _cfg(tmp_path, epochs=1)
    tr = Trainer(cfg, prepare_run_dir(cfg, force=True), data=small_digits, quiet=True)
    tr.fit()
    res = analyze_class_distance(tmp_path / "dafa-test", attack="pgd5", n=40, quiet=True)
    out = tmp_path / "dafa-test" / "analysis"
    assert (out / "class_distance.png").stat().st_size > 1000
    saved = json.loads((out / "class_distance.json").read_text())
    assert saved["n"] == 40 and len(saved["similarity"]) == 10
    p = torch.tensor(saved["similarity"])
    present = torch.tensor(res["confusion"]).sum(1) > 0
    assert torch.allclose(p[present].sum(1), torch.ones(int(present.sum())), atol=1e-5)
    # the robust accuracy per class is the evaluator's, with the same attack and seed
    from robustfair.data.core import stratified_holdout

    _, test = stratified_holdout(small_digits.test, 40)  # the class-stratified subset analysed
    ev = evaluate(tr.model, test, ["pgd5"], cfg.attack.eps, "linf", 10, cfg.eval.batch_size,
                  seed=cfg.seed)
    acc, _ = per_class_accuracy(ev.correct[0], ev.labels, 10)
    robust = torch.tensor([float("nan") if v is None else v for v in saved["robust_acc"]])
    assert torch.allclose(robust[present], acc[present].float())
    assert bool(present.all())  # every class is represented in the subset
    assert sum(saved["dafa_weights"]) == pytest.approx(10.0)
    assert {"robust_vs_nearest_distance", "robust_vs_variance"} <= set(saved["correlation"])
