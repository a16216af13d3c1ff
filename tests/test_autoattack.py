"""APGD, FAB, Square and AutoAttack (Croce & Hein 2020; Andriushchenko et al. 2020): hand-checked
pieces (DLR loss, checkpoint schedule, the box-constrained projection of FAB, Square's schedule),
ε handling, and parity with torchattacks on a small model trained on digits."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
import torchattacks
from scipy.optimize import linprog

from robustfair.attacks import ATTACKS, build_attack
from robustfair.attacks.apgd import checkpoints, dlr_loss, dlr_loss_targeted
from robustfair.attacks.autoattack import AutoAttack
from robustfair.attacks.fab import box_hyperplane_projection
from robustfair.attacks.square import eta, p_selection

EPS = 0.1  # on the normally trained digits MLP: clean ≈ 97%, APGD-CE ≈ 52%


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def mlp(trained_mlp):
    """conftest's MLP (one hidden layer of 64) trained normally on digits: about 97% clean
    accuracy."""
    return trained_mlp


def acc(model, x, y) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


@pytest.fixture(scope="module")
def test_set(digits):
    return digits.test.images(), digits.test.y


# ---------------------------------------------------------------------------- hand checks


def test_dlr_losses_by_hand():
    z = torch.tensor([[3.0, 1.0, 2.0, 0.0]])
    y = torch.tensor([0])
    # sorted 3, 2, 1, 0; the top is y, so the runner-up 2: −(3 − 2)/(3 − 1)
    assert dlr_loss(z, y).item() == pytest.approx(-0.5)
    # a misclassified point: y = 2, top 3 → −(2 − 3)/(3 − 1)
    assert dlr_loss(z, torch.tensor([2])).item() == pytest.approx(0.5)
    # targeted at t = 2: −(z_y − z_t)/(z_π1 − (z_π3 + z_π4)/2) = −1/(3 − 0.5)
    assert dlr_loss_targeted(z, y, torch.tensor([2])).item() == pytest.approx(-0.4)
    # invariant to shifting and scaling the logits
    assert dlr_loss(5 * z + 7, y).item() == pytest.approx(-0.5)


def test_apgd_checkpoints_follow_the_paper():
    """p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j − p_{j−1} − 0.03, 0.06); w_j = p_j·N."""
    p = [0.0, 0.22]
    while p[-1] + max(p[-1] - p[-2] - 0.03, 0.06) <= 1.0:
        p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
    assert checkpoints(100) == [round(v * 100) for v in p[1:]] == [22, 41, 57, 70, 80, 87, 93,
                                                                  99]


@pytest.mark.numeric
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_fab_projection_is_the_minimal_step(norm):
    """The projection onto {w·δ = c} inside the box equals a linear program (ℓ∞: minimise s
    with |δ_i| ≤ s) or the KKT solution clip(λw) (ℓ2), and meets the constraint."""
    g = torch.Generator().manual_seed(0)
    d_dim = 12
    x = torch.rand(6, d_dim, generator=g, dtype=torch.float64)
    x[:, :3] = 0.0  # coordinates at the lower bound
    w = torch.randn(6, d_dim, generator=g, dtype=torch.float64)
    c = torch.tensor([0.3, -0.2, 0.05, 1.0, -0.7, 0.0], dtype=torch.float64)
    d = w.sign() if norm == "linf" else w
    delta = box_hyperplane_projection(w, c, d, -x, 1 - x)
    assert torch.allclose((w * delta).sum(1), c, atol=1e-9)
    assert (delta >= -x - 1e-12).all() and (delta <= 1 - x + 1e-12).all()
    for i in range(len(x)):
        if norm == "linf":
            # variables (δ, s): minimise s, −s ≤ δ ≤ s, w·δ = c, −x ≤ δ ≤ 1 − x
            n = d_dim
            cost = np.r_[np.zeros(n), 1.0]
            a_ub = np.block([[np.eye(n), -np.ones((n, 1))], [-np.eye(n), -np.ones((n, 1))]])
            res = linprog(cost, A_ub=a_ub, b_ub=np.zeros(2 * n),
                          A_eq=np.r_[w[i].numpy(), 0.0][None], b_eq=[c[i].item()],
                          bounds=[(-x[i, j].item(), 1 - x[i, j].item()) for j in range(n)]
                          + [(0, None)])
            assert res.status == 0
            assert delta[i].abs().max().item() == pytest.approx(res.fun, abs=1e-7)
        else:
            lam = (delta[i] / w[i]).masked_select(
                (delta[i] > -x[i] + 1e-9) & (delta[i] < 1 - x[i] - 1e-9))
            if lam.numel():  # the free coordinates share one multiplier λ
                assert torch.allclose(lam, lam[:1].expand_as(lam), atol=1e-7)


def test_square_schedule_and_eta_pattern():
    assert p_selection(0.8, 0, 10000) == 0.8
    assert p_selection(0.8, 11, 10000) == 0.4
    assert p_selection(0.8, 300, 10000) == pytest.approx(0.1)
    assert p_selection(0.8, 9000, 10000) == pytest.approx(0.8 / 512)
    # rescaled to the budget: iteration 150 of 5,000 is iteration 300 of 10,000
    assert p_selection(0.8, 150, 5000) == p_selection(0.8, 300, 10000)
    e = eta(5, torch.device("cpu"), torch.float64)
    assert e.norm().item() == pytest.approx(1.0)
    assert (e[:2] > 0).all() and (e[2:] < 0).all()  # two halves of opposite sign
    assert e[3, 2] < e[4, 2]  # the magnitude peaks at the centre of each half
    assert e[0, 0] < e[1, 2] and e[0, 0] == e[0, 4]


def test_binary_task_runs_the_whole_ensemble():
    """With 2 classes the DLR ratios are undefined: APGD-DLR/T fall back to the logit margin."""
    z = torch.tensor([[2.0, -1.0]])
    assert dlr_loss(z, torch.tensor([0])).item() == pytest.approx(-3.0)
    assert dlr_loss_targeted(z, torch.tensor([0]), torch.tensor([1])).item() == pytest.approx(-3.0)
    torch.manual_seed(0)
    lin = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 2))
    x = torch.rand(20, 1, 4, 4)
    y = lin(x).argmax(1)
    out = AutoAttack(n_queries=50, steps=10).run(lin, x, y, 0.3)
    assert list(out.robust) == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert float(out.robust["square"].float().mean()) < 1.0


def test_registered_names_and_specs():
    for name in ("apgd-ce", "apgd-dlr", "apgd-t", "fab", "fab-t", "square", "autoattack",
                 "autoattack-plus", "autoattack-rand"):
        assert name in ATTACKS.names()
    assert build_attack("apgd-ce50").steps == 50
    assert build_attack("square").n_queries == 5000  # the product default
    aa = build_attack("autoattack", "l2")
    assert [n for n, _ in aa.stages()] == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert all(a.norm == "l2" for _, a in aa.stages())
    steps = {n: getattr(a, "steps", None) for n, a in aa.stages()}
    assert steps == {"apgd-ce": 100, "apgd-t": 100, "fab-t": 100, "square": None}
    rand = build_attack("autoattack-rand")
    assert [(n, a.eot_iter) for n, a in rand.stages()] == [("apgd-ce", 20), ("apgd-dlr", 20)]
    plus = [(n, a.restarts) for n, a in build_attack("autoattack-plus").stages()]
    assert plus == [("apgd-ce", 5), ("apgd-dlr", 5), ("fab", 5), ("square", 1), ("apgd-t", 1),
                    ("fab-t", 1)]


# ---------------------------------------------------------------------------- ε handling


@pytest.mark.parametrize("spec,kw", [("apgd-ce20", {}), ("apgd-t10", {"n_target_classes": 2}),
                                     ("fab-t10", {"n_target_classes": 2}),
                                     ("square", {"n_queries": 100})])
def test_per_sample_and_per_element_eps(mlp, test_set, spec, kw):
    x, y = test_set[0][:40], test_set[1][:40]
    eps = torch.linspace(0.02, 0.2, len(x))
    atk = build_attack(spec, **kw)
    xa = atk(mlp, x, y, eps)
    assert ((xa - x).abs().flatten(1).amax(1) <= eps + 1e-6).all()
    assert xa.min() >= 0 and xa.max() <= 1
    # a scalar ε gives what a vector of that ε gives (same seed)
    same = atk(mlp, x, y, torch.full((len(x),), EPS))
    assert torch.allclose(atk(mlp, x, y, EPS), same)
    # per element (ℓ∞): a zero ε map on the left half keeps those pixels
    emap = torch.full_like(x, EPS)
    emap[..., :4] = 0.0
    xm = atk(mlp, x, y, emap)
    assert torch.equal(xm[..., :4], x[..., :4])
    assert ((xm - x).abs() <= emap + 1e-6).all()


@pytest.mark.parametrize("spec", ["apgd-ce20", "fab-t10", "square"])
def test_l2_ball_and_zero_eps(mlp, test_set, spec):
    x, y = test_set[0][:30], test_set[1][:30]
    kw = {"square": {"n_queries": 100}, "fab-t10": {"n_target_classes": 2}}.get(spec, {})
    xa = build_attack(spec, "l2", **kw)(mlp, x, y, 0.5)
    assert ((xa - x).flatten(1).norm(dim=1) <= 0.5 + 1e-5).all()
    assert torch.allclose(build_attack(spec, "linf", **kw)(mlp, x, y, 0.0), x)


def test_early_stop_changes_no_outcome(mlp, test_set):
    """Dropping fooled points from the batch leaves every other point's trajectory as it is."""
    x, y = test_set
    a = build_attack("apgd-ce30")(mlp, x, y, EPS)
    b = build_attack("apgd-ce30", early_stop=False)(mlp, x, y, EPS)
    with torch.no_grad():
        assert torch.equal(mlp(a).argmax(1) == y, mlp(b).argmax(1) == y)


@pytest.mark.numeric
def test_targets_side_by_side_match_one_after_another(mlp, test_set):
    x, y = test_set[0][:120], test_set[1][:120]
    together = acc(mlp, build_attack("apgd-t20")(mlp, x, y, EPS), y)
    in_turn = acc(mlp, build_attack("apgd-t20", max_batch=1)(mlp, x, y, EPS), y)
    assert abs(together - in_turn) <= 1 / 120 + 1e-9


# ---------------------------------------------------------------------------- parity


@pytest.fixture(scope="module")
def standard_vs_fast(mlp, test_set):
    """Standard AutoAttack and autoattack-fast (same seed, Square with 500 queries in both) on
    the first 100 test digits of the trained MLP."""
    x, y = test_set[0][:100], test_set[1][:100]
    std = AutoAttack(n_queries=500).run(mlp, x, y, EPS)
    fast = build_attack("autoattack-fast", n_queries=500).run(mlp, x, y, EPS)
    return std, fast


@pytest.mark.numeric
@pytest.mark.parametrize("norm,eps", [("linf", EPS), ("l2", 0.8)])
def test_apgd_ce_matches_torchattacks(mlp, test_set, norm, eps):
    """Same iterations (100), restarts (1) and seed; all 360 test images: within 1 point."""
    x, y = test_set
    ours = acc(mlp, build_attack("apgd-ce", norm)(mlp, x, y, eps), y)
    ta = torchattacks.APGD(mlp, norm={"linf": "Linf", "l2": "L2"}[norm], eps=eps,
                           steps=100, n_restarts=1, seed=0, loss="ce")
    theirs = acc(mlp, ta(x, y), y)
    assert 0.05 < ours < 0.9  # a setting where the attack has something to do
    assert abs(ours - theirs) <= 0.01


class _SquareWindowsEverywhere(torchattacks.Square):
    """torchattacks' Square with the window position drawn from {0, …, h − s} as in the paper
    (Algorithm 2); torchattacks, like the reference code, draws from {0, …, h − s − 1} and so
    never changes the last row and column of pixels, which on 8×8 digits costs ~10 points."""

    def random_int(self, low=0, high=1, shape=(1,)):
        return super().random_int(low, high + 1, list(shape)).clamp(max=high)


def test_square_matches_torchattacks(mlp, test_set):
    """Square with 1,000 queries (not the product's 5,000, to keep the test short), margin loss,
    p_init 0.8, one restart; mean over two seeds of each (Square is random): within 1 point of
    torchattacks with the paper's window positions, and not weaker than torchattacks as is."""
    x, y = test_set
    ours = np.mean([acc(mlp, build_attack("square", n_queries=1000, seed=s)(
        mlp, x, y, EPS), y) for s in (0, 1)])
    theirs = np.mean([acc(mlp, _SquareWindowsEverywhere(
        mlp, eps=EPS, n_queries=1000, seed=s)(x, y), y) for s in (0, 1)])
    as_is = acc(mlp, torchattacks.Square(mlp, eps=EPS, n_queries=1000,
                                                 seed=0)(x, y), y)
    assert abs(ours - theirs) <= 0.01
    assert ours <= as_is


def test_autoattack_not_weaker_than_torchattacks_with_100_iterations(mlp, test_set,
                                                                   standard_vs_fast):
    """AutoAttack standard against torchattacks' AutoAttack with its APGD, APGD-T and FAB set
    to 100 iterations, 9 targets; Square with 500 queries in both (a shorter test)."""
    x, y = test_set[0][:100], test_set[1][:100]
    out = standard_vs_fast[0]
    ours = acc(mlp, out.x_adv, y)
    ta = torchattacks.AutoAttack(mlp, norm="Linf", eps=EPS, version="standard",
                                 n_classes=10, seed=0)
    for atk in ta._autoattack.attacks:
        if hasattr(atk, "steps"):
            atk.steps = 100
        if hasattr(atk, "n_queries"):
            atk.n_queries = 500
    theirs = acc(mlp, ta(x, y), y)
    assert ours <= theirs
    # the stages are cumulative, the last one is the result, and x_adv stays in the ball
    after = [float(v.float().mean()) for v in out.robust.values()]
    assert after == sorted(after, reverse=True)
    assert after[-1] == pytest.approx(ours)
    assert ((out.x_adv - x).abs() <= EPS + 1e-6).all()
    assert float(out.clean.float().mean()) >= after[0]


# ---------------------------------------------------------------------------- MALT, fast version


@pytest.mark.numeric
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_malt_ranking_is_the_exact_boundary_ranking_on_a_linear_model(norm):
    """For f(x) = Wx + b, MALT's d_t is the exact distance to {z_y = z_t}; its order of the
    targets equals the order of distances found by a linear program (ℓ∞) or by projecting onto
    the hyperplane (ℓ2), the input unbounded."""
    from robustfair.attacks.malt import malt_order, malt_scores

    torch.manual_seed(0)
    d_dim, n_cls = 12, 6
    lin = torch.nn.Linear(d_dim, n_cls).double()
    x = torch.rand(5, d_dim, dtype=torch.float64)
    y = lin(x).argmax(1)
    w, b = lin.weight.detach(), lin.bias.detach()
    scores = malt_scores(lin, x, y, 1.0, norm)
    order = malt_order(lin, x, y, 1.0, norm)
    for i in range(len(x)):
        exact = {}
        for t in range(n_cls):
            if t == y[i]:
                continue
            a, c = (w[y[i]] - w[t]).numpy(), float(b[y[i]] - b[t])
            if norm == "linf":  # min s  s.t. a·(x + δ) + c ≤ 0, |δ_j| ≤ s
                cost = np.r_[np.zeros(d_dim), 1.0]
                a_ub = np.block([[np.eye(d_dim), -np.ones((d_dim, 1))],
                                 [-np.eye(d_dim), -np.ones((d_dim, 1))],
                                 [a[None], np.zeros((1, 1))]])
                b_ub = np.r_[np.zeros(2 * d_dim), -c - a @ x[i].numpy()]
                res = linprog(cost, A_ub=a_ub, b_ub=b_ub,
                              bounds=[(None, None)] * d_dim + [(0, None)])
                assert res.status == 0
                exact[t] = res.fun
            else:
                exact[t] = (a @ x[i].numpy() + c) / np.linalg.norm(a)
            assert scores[i, t].item() == pytest.approx(exact[t], rel=1e-6, abs=1e-9)
        assert order[i, 0] == y[i]
        assert order[i, 1:].tolist() == sorted(exact, key=exact.get)


def test_fast_version_misses_at_most_one_point_of_standard(standard_vs_fast):
    std, fast = standard_vs_fast
    r_std, r_fast = std.robust["square"], fast.robust["square-near"]
    assert 0 < int(r_std.sum()) < int(std.clean.sum())  # the attacks have work to do
    assert int((r_fast & ~r_std).sum()) <= 1
    # it skipped work: the gated stages attacked fewer points than were still robust
    gated = ["apgd-t-rest", "fab-t", "square-blind", "square-near"]
    before = fast.robust["apgd-t-malt"]
    assert sum(fast.stage_time[s]["points"] for s in gated) < 3 * int(before.sum())
    assert fast.stage_time["apgd-ce"]["points"] == int(fast.clean.sum())


class _Quantised(torch.nn.Module):
    """The MLP on inputs rounded to eighths: its input gradient is zero everywhere, so only the
    black-box Square can find adversarial points (gradient masking)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(torch.round(x * 8) / 8)


def test_fast_version_gives_square_its_full_budget_where_gradients_vanish(mlp, test_set):
    """On a model with masked gradients every point is blind: the fast version's Square runs
    with the full budget there (not ``fast_queries``) and breaks what standard AutoAttack's
    Square breaks; with the short budget it would break fewer."""
    x, y = test_set[0][:60], test_set[1][:60]
    masked = _Quantised(mlp).eval()
    std = AutoAttack(steps=5, n_queries=400).run(masked, x, y, EPS)
    fast = build_attack("autoattack-fast", steps=5, n_queries=400, fast_queries=40).run(
        masked, x, y, EPS)
    short = build_attack("square", n_queries=40, seed=0)
    clean = std.clean
    r_std = std.robust["square"]
    assert int(r_std.sum()) < int(std.robust["fab-t"].sum())  # Square breaks points
    # every point still robust is blind: all of them go to Square with the full budget
    assert fast.stage_time["square-blind"]["points"] == int(fast.robust["fab-t"].sum()) > 0
    assert fast.stage_time["square-near"]["points"] == 0
    assert int((fast.robust["square-near"] & ~r_std).sum()) <= 1
    with torch.no_grad():
        r_short = masked(short(masked, x[clean], y[clean], EPS)).argmax(1) == y[clean]
    assert int(r_short.sum()) > int(r_std.sum())  # the short budget would have missed points


def test_stage_times_in_outcome_and_summary(mlp, digits, standard_vs_fast, caplog):
    std, _ = standard_vs_fast
    assert list(std.stage_time) == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert all(v["seconds"] >= 0 for v in std.stage_time.values())
    assert std.stage_time["apgd-t"]["points"] == int(std.robust["apgd-ce"].sum())
    from robustfair.engine.staged import evaluate_staged

    split = digits.test.subset(torch.arange(40))
    atk = build_attack("autoattack-fast", steps=5, n_queries=20)
    with caplog.at_level(logging.INFO, logger="robustfair"):
        res = evaluate_staged(mlp, split, ["clean", atk], EPS, num_classes=10)
    summ = res.summary()
    times = summ["settings"]["stage_time"]
    assert atk.name == "autoattack-fast-custom-5it-20q"  # not the version's budgets
    rows = [f"{atk.name}/{s}" for s in
            ("apgd-ce", "apgd-t-malt", "apgd-t-rest", "fab-t", "square-blind",
             "square-near")]
    assert all(r in times and times[r]["seconds"] >= 0 for r in rows)
    clean = int(res.row("clean").sum())
    assert times[f"{atk.name}/apgd-ce"]["points"] == clean
    assert summ["settings"]["attacks"][1]["version"] == "fast"
    # the ensemble's own row costs nothing: its line gives the total over its stages
    total = sum(times[r]["seconds"] for r in rows)
    line = next(r.getMessage() for r in caplog.records
                if r.getMessage().startswith(atk.name + " "))
    assert line.endswith(f"({total:.1f} s over its stages)")
    # the report states both of the fast version's Square budgets
    from robustfair.commands.evaluate import render

    text = render(summ, "t")
    assert "Square 20 queries where the logit gradients vanish, 20 on the other points " \
           "within 1·ε of a linearised boundary" in text
    std_text = render({**summ, "settings": {**summ["settings"], "attacks": [
        {**summ["settings"]["attacks"][1], "version": "standard", "attack": "autoattack"}]}},
        "t")
    assert "Square 20 queries, seed" in std_text
