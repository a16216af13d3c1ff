"""FRL, CFA, WAT and BAT: updates against hand computations, the early-stopped attack against a
direct simulation, and every class-wise policy's state through a checkpoint."""

from __future__ import annotations

import math

import pytest
import torch

from robustfair.attacks.base import eval_mode
from robustfair.attacks.basic import kl_per_sample
from robustfair.config import DataConfig, load_config
from robustfair.data import load_data
from robustfair.engine.evaluator import EvalResult
from robustfair.engine.trainer import Trainer, prepare_run_dir
from robustfair.objectives.base import BuildContext, ObjectiveOutput
from robustfair.objectives.bat import early_stopped_kl_pgd, kl_to_uniform
from robustfair.policies import POLICIES, EpochContext
from robustfair.policies.cfa import average_state
from robustfair.policies.frl import normalize_multipliers

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def mlp(digits):
    """A small MLP trained briefly on digits (~90% clean accuracy), cheap to build."""
    from robustfair.models import build_model

    torch.manual_seed(0)
    m = build_model("mlp", 1, 10, 8, digits.mean, digits.std, hidden=[32])
    opt = torch.optim.Adam(m.parameters(), lr=0.01)
    x, y = digits.train.images(), digits.train.y
    for _ in range(60):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(m(x), y).backward()
        opt.step()
    return m.eval()


def _ctx(c=3, **extra):
    return BuildContext(num_classes=c, in_channels=1, image_size=8,
                        extra={"epochs": 10, "objective": {"name": "trades", "beta": 6.0},
                               **extra})


def _result(clean: list[float], robust: list[float], per_class: int = 10) -> EvalResult:
    """A fake validation result with the given per-class clean / robust accuracy."""
    c = len(clean)
    labels = torch.arange(c).repeat_interleave(per_class)
    rows = []
    for acc in (clean, robust):
        hits = torch.cat([torch.arange(per_class) < round(a * per_class) for a in acc])
        rows.append(hits)
    correct = torch.stack(rows)
    return EvalResult(["clean", "pgd20"], correct, torch.zeros_like(correct, dtype=torch.long),
                      labels, c)


def _epoch_ctx(epoch, result=None, stats=None, model=None):
    return EpochContext(epoch, 10, model or torch.nn.Identity(), 3, CPU,
                        (lambda spec: result) if result is not None else None, stats or {})


# --------------------------------------------------------------------------- FRL
def test_frl_update_by_hand():
    pol = POLICIES.build({"name": "frl", "mode": "both"}, ctx=_ctx())
    # clean [.9 .8 .4] (avg .7), robust [.7 .4 .1] (avg .4): boundary errors [.2 .4 .3] (avg .3)
    pol.on_epoch_end(_epoch_ctx(1, _result([0.9, 0.8, 0.4], [0.7, 0.4, 0.1])))
    # γ0 = (1 − clean) − 0.3 − 0.07 = [−.27, −.17, .23];  γ1 = bndy − 0.3 − 0.07 = [−.17, .03, −.07]
    phi0 = torch.tensor([0.0, 0.0, 0.05 * 0.23])
    phi1 = torch.tensor([0.0, 0.1 * 0.03, 0.0])
    phi2 = 0.2 * torch.tensor([-0.17, 0.03, -0.07])
    assert torch.allclose(pol.phi.float(), torch.stack([phi0, phi1, phi2]), atol=1e-6)
    w0, w1 = pol.class_weights()
    assert torch.allclose(w0.float(), 1 / 3 + phi0 - phi0.sum() / 3, atol=1e-6)
    assert torch.allclose(w1.float(), 1 / 3 + phi1 - phi1.sum() / 3, atol=1e-6)
    assert float(w0.sum()) == pytest.approx(1.0)
    # margins: exp(2φ2) clamped to [0.98, 3]
    want = torch.tensor([0.98, math.exp(2 * 0.006), 0.98])
    assert torch.allclose(pol.margins().float(), want, atol=1e-6)
    y = torch.tensor([0, 1, 2, 2])
    assert torch.allclose(pol.eps_scale(y), want[y], atol=1e-6)


def test_frl_normalization_and_loss_form():
    phi = normalize_multipliers(torch.tensor([0.4, 0.3, -0.1]), 0.5)
    assert torch.allclose(phi, torch.tensor([0.4, 0.3, 0.0]) * 0.5 / 0.7)
    pol = POLICIES.build({"name": "frl", "mode": "reweight"}, ctx=_ctx())
    pol.phi[0] = torch.tensor([0.3, 0.0, 0.1], dtype=torch.float64)
    pol.phi[1] = torch.tensor([0.0, 0.2, 0.0], dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0, 1])
    ce, kl = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]), torch.tensor([0.5, 0.1, 0.2, 0.3, 0.4])
    out = ObjectiveOutput({"natural": ce, "robust": 6 * kl})
    w0, w1 = (w.float()[y] for w in pol.class_weights())
    want = (w0 * ce).sum() / w0.sum() + 6 * (w1 * kl).sum() / w1.sum()  # FRL's batch loss
    assert float(pol.combine(out, y).mean()) == pytest.approx(float(want), rel=1e-6)
    assert pol.eps_scale(y) is None  # reweight only: uniform ε


def test_frl_waits_for_warmup_and_halves_alpha1():
    pol = POLICIES.build({"name": "frl", "mode": "reweight", "warmup": 2, "halve_every": 2},
                         ctx=_ctx())
    res = _result([0.9, 0.9, 0.3], [0.5, 0.5, 0.1])
    pol.on_epoch_end(_epoch_ctx(1, res))
    assert pol.updates == 0 and float(pol.phi.abs().sum()) == 0
    pol.on_epoch_end(_epoch_ctx(2, res))
    first = pol.phi[0, 2].item()  # γ0 of class 2: 0.7 − 0.3 − 0.1 = 0.3 → φ = 0.05·0.3
    assert first == pytest.approx(0.015)
    pol.on_epoch_end(_epoch_ctx(3, res))  # second update uses α1/2
    assert pol.phi[0, 2].item() == pytest.approx(0.015 + 0.025 * 0.3)


# --------------------------------------------------------------------------- CFA
def _cfa_stats(adv_correct):
    return {"count": torch.tensor([10, 10, 10]), "adv_correct": torch.tensor(adv_correct),
            "clean_correct": torch.tensor([10.0, 10.0, 10.0])}


def test_cfa_margin_and_regularization_by_hand():
    pol = POLICIES.build({"name": "cfa", "begin": 2, "fawa": False}, ctx=_ctx())
    y = torch.tensor([0, 1, 2])
    ce, kl = torch.ones(3), torch.full((3,), 0.5)
    out = ObjectiveOutput({"natural": ce, "robust": 6 * kl})
    # before calibration: uniform ε and b = β/(1 + β)
    pol.on_epoch_end(_epoch_ctx(1, stats=_cfa_stats([2.0, 6.0, 10.0])))
    assert pol.eps_scale(y) is None
    assert torch.allclose(pol.combine(out, y), torch.full((3,), 1 / 7 + 6 / 7 * 0.5))
    # from epoch begin + 1: r = [.2 .6 1.]; ε_k = (0.5 + r_k)ε; b_k = (0.5 + r_k)6 / (1 + (0.5 + r_k)6)
    pol.on_epoch_end(_epoch_ctx(2, stats=_cfa_stats([2.0, 6.0, 10.0])))
    assert torch.allclose(pol.eps_scale(y), torch.tensor([0.7, 1.1, 1.5]))
    b = torch.tensor([4.2 / 5.2, 6.6 / 7.6, 9 / 10])
    assert torch.allclose(pol.combine(out, y), (1 - b) * ce + b * kl, atol=1e-6)


def test_cfa_fawa_gate_average_and_final_model(tmp_path):
    pol = POLICIES.build({"name": "cfa", "begin": 1, "fawa_threshold": 0.3}, ctx=_ctx())
    lin = torch.nn.Linear(2, 1)
    with torch.no_grad():
        lin.weight.fill_(1.0)
    low, high = _result([1, 1, 1], [0.9, 0.2, 0.8]), _result([1, 1, 1], [0.9, 0.4, 0.8])
    stats = _cfa_stats([5.0, 5.0, 5.0])
    pol.on_epoch_end(_epoch_ctx(1, low, stats, lin))  # worst class 0.2 < 0.3: not absorbed
    assert pol.eval_state() is None
    pol.on_epoch_end(_epoch_ctx(2, high, stats, lin))  # first qualifying epoch starts θ̄ = θ
    assert torch.equal(pol.eval_state()["weight"], torch.ones(1, 2))
    with torch.no_grad():
        lin.weight.fill_(3.0)
    pol.on_epoch_end(_epoch_ctx(3, low, stats, lin))  # frozen
    assert torch.equal(pol.eval_state()["weight"], torch.ones(1, 2))
    pol.on_epoch_end(_epoch_ctx(4, high, stats, lin))  # θ̄ = .88·1 + .12·3
    assert torch.allclose(pol.eval_state()["weight"], torch.full((1, 2), 0.88 + 0.36))
    avg = average_state({"n": torch.tensor(3)}, {"n": torch.tensor(7)}, 0.5)
    assert int(avg["n"]) == 7  # integer buffers are copied, not averaged


def test_trainer_evaluates_the_fawa_weights(tmp_path):
    cfg = load_config(recipe="mnist5k-trades", overrides=[
        "data.name=digits", "data.val_size=60", "data.train_limit=100", "data.test_limit=20",
        "model.params={width: 0.25}", "method.policy.name=cfa", "logging.progress=false",
        f"output_dir={tmp_path}"])
    tr = Trainer(cfg, prepare_run_dir(cfg, force=True), quiet=True)
    assert tr.policy_eval_model() is None
    tr.policy.fawa_state = {k: torch.zeros_like(v) for k, v in tr.model.state_dict().items()}
    m = tr.policy_eval_model()
    assert all(float(p.detach().abs().sum()) == 0 for p in m.parameters())
    assert any(float(p.detach().abs().sum()) > 0 for p in tr.model.parameters())  # the model is untouched


# --------------------------------------------------------------------------- WAT
def test_wat_hedge_update_and_loss_by_hand():
    pol = POLICIES.build({"name": "wat", "eta": 0.1}, ctx=_ctx())
    y = torch.tensor([0, 1, 2])
    total = torch.tensor([1.0, 2.0, 3.0])
    out = ObjectiveOutput({"natural": total - 0.5, "robust": torch.full((3,), 0.5)})
    assert torch.allclose(pol.combine(out, y), 2 * total)  # all C + 1 weights start at 1
    pol.update(torch.tensor([1.0, 2.0, 3.0, 2.0]))
    pol.update(torch.tensor([0.5, 0.5, 2.0, 1.0]))
    cum = [1.5, 2.5, 5.0, 3.0]
    e = [math.exp(0.1 * v) for v in cum]
    w = [3 * v / sum(e) for v in e]
    assert pol.weights.tolist() == pytest.approx(w)
    want = torch.tensor([(w[k] + w[3]) * float(total[k]) for k in range(3)])
    assert torch.allclose(pol.combine(out, y), want.float(), atol=1e-6)


def test_wat_validation_costs_are_class_means(mlp, digits):
    ctx = BuildContext(num_classes=10, in_channels=1, image_size=8, eps=0.1, step_size=0.03,
                       steps=2, extra={"objective": {"name": "trades", "beta": 6.0}})
    pol = POLICIES.build({"name": "wat", "val_n": 60, "batch_size": 25}, ctx=ctx)
    val = digits.val.subset(torch.arange(60))
    torch.manual_seed(0)
    cost = pol.validation_costs(mlp, val, CPU)
    counts = torch.bincount(val.y, minlength=10).double()
    present = counts > 0
    assert cost.shape == (11,) and bool((cost >= 0).all())
    # the class-average entry is the count-weighted mean of the class means
    assert float(cost[-1]) == pytest.approx(float((cost[:-1][present] * counts[present]).sum()
                                                  / counts.sum()), rel=1e-6)


def test_wat_val_n_is_stratified_on_a_class_sorted_split(mlp, digits, monkeypatch):
    """val_n takes a class-stratified subset: on a split sorted by class (as mnist5k's are),
    the first n images would hold only the first classes and leave the others at the mean."""
    import robustfair.policies.wat as wat_mod

    ctx = BuildContext(num_classes=10, in_channels=1, image_size=8, eps=0.1, step_size=0.03,
                       steps=1, extra={"objective": {"name": "trades", "beta": 6.0}})
    pol = POLICIES.build({"name": "wat", "val_n": 40, "batch_size": 40}, ctx=ctx)
    val = digits.val.subset(torch.argsort(digits.val.y, stable=True))  # sorted by class
    seen, cost = [], wat_mod.trades_cost
    monkeypatch.setattr(wat_mod, "trades_cost",
                        lambda model, x, y, *a: seen.append(y.clone()) or cost(model, x, y, *a))
    torch.manual_seed(0)
    pol.validation_costs(mlp, val, CPU)
    labels = torch.cat(seen)
    assert len(labels) == 40 and set(labels.tolist()) == set(range(10))


# --------------------------------------------------------------------------- BAT
def test_kl_to_uniform_is_log_c_minus_entropy():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]])
    p = torch.softmax(logits, 1)
    ent = -(p * p.log()).sum(1)
    assert torch.allclose(kl_to_uniform(logits), math.log(3) - ent, atol=1e-6)
    assert float(kl_to_uniform(logits)[1]) == pytest.approx(0.0, abs=1e-7)


def _reference_iterates(model, x, y, eps, step, steps):
    """All iterates x_0..x_K of the plain TRADES-KL trajectory (same start as the attack)."""
    with eval_mode(model):
        with torch.no_grad():
            nat = model(x)
        xs = [(x + 0.001 * torch.randn_like(x)).clamp(0, 1)]
        for _ in range(steps):
            xk = xs[-1].clone().requires_grad_(True)
            (g,) = torch.autograd.grad(kl_per_sample(nat, model(xk)).sum(), [xk])
            nxt = x + (xk.detach() + step * g.sign() - x).clamp(-eps, eps)
            xs.append(nxt.clamp(0, 1))
        with torch.no_grad():
            wrong = torch.stack([model(xk).argmax(1) != y for xk in xs[:-1]])  # (K, N)
    return xs, wrong


@pytest.mark.parametrize("tau", [0, 1])
def test_early_stopped_attack_matches_a_direct_simulation(mlp, digits, tau):
    x, y = digits.test.images(torch.arange(64)), digits.test.y[:64]
    eps, step, steps = 0.3, 0.06, 8
    torch.manual_seed(1)
    xs, wrong = _reference_iterates(mlp, x, y, eps, step, steps)
    torch.manual_seed(1)
    x_lc, x_fa = early_stopped_kl_pgd(mlp, x, y, torch.tensor(eps), torch.tensor(step),
                                      steps, tau)
    n_lc = n_fa = 0
    for i in range(len(x)):
        hits = torch.nonzero(wrong[:, i]).flatten().tolist()
        lc = xs[max(hits[0] - 1, 0)] if hits else xs[-1]
        fa = xs[hits[tau]] if len(hits) > tau else xs[-1]
        assert torch.allclose(x_lc[i], lc[i], atol=1e-6)
        assert torch.allclose(x_fa[i], fa[i], atol=1e-6)
        n_lc += bool(hits) and hits[0] > 0
        n_fa += len(hits) > tau
    assert n_lc > 5 and n_fa > 5  # the stops really happened on this batch
    assert float((x_fa - x).abs().max()) <= eps + 1e-6


def test_bat_objective_terms(mlp, digits):
    from robustfair.objectives import OBJECTIVES

    ctx = BuildContext(num_classes=10, in_channels=1, image_size=8, eps=0.2, step_size=0.05,
                       steps=5)
    obj = OBJECTIVES.build({"name": "bat"}, ctx=ctx)
    x, y = digits.test.images(torch.arange(32)), digits.test.y[:32]
    eps = torch.full((32, 1, 1, 1), 0.2)
    out = obj(mlp, x, y, eps, eps / 4)
    assert set(out.terms) == {"natural", "robust", "uniform"}
    assert all(t.shape == (32,) for t in out.terms.values())
    assert bool((out.terms["uniform"] >= -1e-6).all())
    assert float((out.x_adv - x).abs().max()) <= 0.2 + 1e-6


# --------------------------------------------------------------------------- checkpointing
@pytest.fixture(scope="module")
def small_digits():
    return load_data(DataConfig(name="digits", val_size=60, train_limit=200, test_limit=40))


@pytest.mark.parametrize("policy,extra", [
    ("frl", ["method.policy.mode=both", "method.policy.attack=pgd3"]),
    ("cfa", ["method.policy.begin=1", "method.policy.fawa_threshold=0.0",
             "method.policy.fawa_attack=pgd3"]),
    ("wat", []),
])
def test_policy_state_survives_resume(tmp_path, small_digits, policy, extra):
    def cfg(epochs):
        return load_config(recipe="mnist5k-trades", overrides=[
            "data.name=digits", "data.val_size=60", "data.train_limit=200",
            "data.test_limit=40", "model.params={width: 0.25}", f"train.epochs={epochs}",
            "train.batch_size=100", "attack.eps=0.1", "attack.step_size=0.05",
            "attack.steps=2", f"method.policy.name={policy}", "validation.every=0",
            "logging.progress=false", f"output_dir={tmp_path}", "name=p", *extra])

    run_dir = prepare_run_dir(cfg(2), force=True)
    first = Trainer(cfg(2), run_dir, data=small_digits, quiet=True)
    first.fit()
    saved = first.policy.state_dict()
    resumed = Trainer(cfg(2), run_dir, data=small_digits, quiet=True)
    assert resumed.resume()
    got = resumed.policy.state_dict()
    y = torch.arange(10)
    for key, value in saved.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(got[key], value), key
        elif not isinstance(value, dict):
            assert got[key] == value, key
    s1, s2 = first.policy.eps_scale(y), resumed.policy.eps_scale(y)
    assert (s1 is None and s2 is None) or torch.equal(s1, s2)
    out = ObjectiveOutput({"natural": torch.ones(10), "robust": torch.full((10,), 2.0)})
    assert torch.equal(first.policy.combine(out, y), resumed.policy.combine(out, y))
