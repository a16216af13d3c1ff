"""AT-on-AD: the stable mixture and its closed forms, the closed-form linear attack, the
early-stopping trainers and the disparity metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from robustfair.attacks import build_attack
from robustfair.config import DataConfig
from robustfair.data import DATASETS, load_data
from robustfair.data.stable_mixture import (
    BinaryTaskParams,
    StableMixtureParams,
    best_linear_accuracy,
    linear_class_accuracy,
    make_binary_task,
    make_stable_mixture,
    sample_symmetric_stable,
    stable_cdf,
)
from robustfair.errors import UserError
from robustfair.models import build_model
from robustfair.studies.linear import (
    LinearWorstCase,
    affine_params,
    fit_linear_bank,
    robust_margin,
)
from robustfair.studies.metrics import accuracy_disparity, ad_gap, mean_se, standard_accuracy_gap
from robustfair.studies.trainer import (
    AdversarialStep,
    Method,
    TrainSettings,
    fit_network,
    frozen_bn_stats,
    single_thread,
)

ALPHAS = [2.0, 1.5, 1.0]


@pytest.fixture(scope="module")
def mnist5k_base():
    return DATASETS.get("mnist5k")(DataConfig(name="mnist5k"))


def _mnist5k_binary(base, **params):
    return make_binary_task(base, BinaryTaskParams(**params), pooled=True)


# ------------------------------------------------------------------------------------------
# the symmetric α-stable law


@pytest.mark.parametrize("alpha", ALPHAS)
def test_cms_sampler_matches_scipy_cdf(alpha):
    """Empirical CDF of the Chambers–Mallows–Stuck sampler = scipy's levy_stable CDF (scale 1)
    at a few points, within 4.5 binomial standard errors."""
    from scipy.stats import levy_stable

    n = 200_000
    z = sample_symmetric_stable(alpha, (n,), np.random.default_rng(0))
    t = np.array([-3.0, -1.0, -0.3, 0.5, 2.0])
    ref = levy_stable.cdf(t, alpha, 0.0)
    emp = (z[:, None] <= t[None, :]).mean(0)
    se = np.sqrt(ref * (1 - ref) / n)
    assert np.all(np.abs(emp - ref) < 4.5 * se), (emp, ref)


@pytest.mark.numeric
def test_gaussian_and_cauchy_closed_forms_use_scipys_scale():
    """F_2(t) = Φ(t/√2) (scipy's α = 2 scale c is a standard deviation c√2) and F_1 = Cauchy."""
    from scipy.stats import levy_stable, norm

    t = np.array([-2.0, -0.5, 0.0, 1.0, 3.0])
    # tolerance: scipy's levy_stable integrates numerically to about 1e-7 (its documented accuracy);
    #   ours is closed-form
    np.testing.assert_allclose(stable_cdf(t, 2.0), levy_stable.cdf(t, 2.0, 0.0), atol=1e-6)
    # tolerance: FP64_FORMULA
    np.testing.assert_allclose(stable_cdf(t, 2.0), norm.cdf(t, scale=math.sqrt(2)), atol=1e-12)
    np.testing.assert_allclose(stable_cdf(t, 1.0), levy_stable.cdf(t, 1.0, 0.0), atol=1e-6)
    z = sample_symmetric_stable(2.0, (100_000,), np.random.default_rng(1))
    assert abs(z.std() - math.sqrt(2)) < 0.02


def test_default_parameters_meet_their_documented_accuracies():
    """Best linear accuracy high but not perfect; the paper's ε grid lowers it visibly."""
    for alpha, lo_eps in ((2.0, 1.0), (1.5, 0.555), (1.0, 14.403)):
        p = StableMixtureParams(alpha=alpha)
        clean = best_linear_accuracy(p.mu, p.sigma, alpha, p.d)
        robust = best_linear_accuracy(p.mu, p.sigma, alpha, p.d, lo_eps, "linf")
        assert 0.94 < clean < 0.97
        assert clean - robust > 0.08


def test_stable_mixture_splits_sizes_and_nesting():
    small = {"d": 10, "n_major": 200, "n_val_major": 50, "n_test": 100, "seed": 3}
    b5 = load_data(DataConfig(name="stable-mixture", params={**small, "ratio": 5}))
    b1 = load_data(DataConfig(name="stable-mixture", params={**small, "ratio": 1}))
    assert b5.train.y.bincount().tolist() == [200, 40]
    assert b5.val.y.bincount().tolist() == [50, 10]
    assert b5.test.y.bincount().tolist() == [100, 20]
    assert b5.extra["test_balanced"].y.bincount().tolist() == [100, 100]
    assert b5.train.x.shape == (240, 10, 1, 1) and b5.extra["bounded"] is False
    # the same majority samples, the minority of R = 5 is the start of R = 1's
    assert torch.equal(b5.train.x[:200], b1.train.x[:200])
    assert torch.equal(b5.train.x[200:], b1.train.x[200:240])
    # class means ±μ·1
    mu = float(b1.extra["mixture"].mu[0])
    assert b1.extra["test_balanced"].x[:100].mean() < -mu / 2 < 0 < mu / 2 < b1.extra[
        "test_balanced"].x[100:].mean()


# ------------------------------------------------------------------------------------------
# closed-form accuracy of linear classifiers vs trained models


def _fast() -> TrainSettings:
    return TrainSettings(epochs=8, patience=3, batch_size=128)


@pytest.mark.parametrize("alpha", ALPHAS)
def test_trained_linear_model_matches_closed_form_class_accuracy(alpha):
    """P(correct | y) = F_α(s_y(w·μ_y + b)/(σ‖w‖_α)) for a trained (imbalanced, so biased) model:
    measured per-class accuracy on 20,000 samples per class within 4.5 standard errors."""
    mu, sigma = {2.0: (3.0, 8.0), 1.5: (1.0, 1.0), 1.0: (20.0, 3.0)}[alpha]
    p = StableMixtureParams(alpha=alpha, d=20, mu=mu, sigma=sigma, n_major=800, n_val_major=200,
                            n_test=20_000, ratio=4, seed=11)
    data = make_stable_mixture(p)
    (fit,) = fit_linear_bank(data, [(Method(), 1e-3)], _fast(), seed=0)
    v, c = np.asarray(fit.params["v"]), fit.params["c"]
    expected = linear_class_accuracy(v, c, p.mu, p.sigma, alpha)
    bal = data.extra["test_balanced"]
    correct = fit.pred_balanced == bal.y
    for k in (0, 1):
        measured = float(correct[bal.y == k].float().mean())
        se = math.sqrt(expected[k] * (1 - expected[k]) / 20_000)
        assert abs(measured - expected[k]) < 4.5 * se, (k, measured, expected[k])
    # the imbalance tilts the model towards the majority class 0
    assert expected[0] > expected[1]


def test_standard_training_reaches_bayes_accuracy_on_balanced_gaussian_mixture():
    """d = 10, μ = 6.3, σ = 8: Bayes accuracy Φ(μ√d/(σ√2)) ≈ 0.96; a standardly trained linear
    model (learning rate chosen by validation loss) reaches it within the sampling error of
    10,000 balanced test samples."""
    p = StableMixtureParams(alpha=2.0, d=10, mu=6.3, sigma=8.0, n_major=2000, n_val_major=500,
                            n_test=5000, seed=5)
    bayes = best_linear_accuracy(p.mu, p.sigma, 2.0, p.d)
    assert 0.95 < bayes < 0.97
    data = make_stable_mixture(p)
    fits = fit_linear_bank(data, [(Method(), lr) for lr in (3e-2, 1e-2, 3e-3)],
                           TrainSettings(epochs=30, patience=8, batch_size=256), seed=0)
    fit = min(fits, key=lambda f: f.val_loss)
    bal = data.extra["test_balanced"]
    acc = float((fit.pred_balanced == bal.y).float().mean())
    se = math.sqrt(bayes * (1 - bayes) / len(bal))
    assert abs(acc - bayes) < 3 * se, (acc, bayes)


# ------------------------------------------------------------------------------------------
# the closed-form attack


def _linear_classifier(d: int, seed: int = 0):
    torch.manual_seed(seed)
    m = build_model("linear", 1, 2, int(math.isqrt(d)), (0.4,), (0.3,))
    m.net.fc.weight.data.normal_()
    m.net.fc.bias.data.normal_()
    return m.eval()


@pytest.mark.numeric
@pytest.mark.parametrize("norm,eps", [("linf", 0.05), ("l2", 0.3)])
def test_closed_form_attack_equals_pgd_on_a_linear_model(norm, eps):
    """On a linear model PGD converges to the closed-form δ* = −ε·s_y·sign(v) (ℓ∞) or
    −ε·s_y·v/‖v‖ (ℓ2); images stay inside [0, 1] here, so the clamp is inactive."""
    model = _linear_classifier(16)
    x = 0.3 + 0.4 * torch.rand(32, 1, 4, 4)
    y = torch.randint(0, 2, (32,))
    closed = LinearWorstCase(norm=norm, clip=True)(model, x, y, eps)
    with single_thread():
        pgd = build_attack("pgd60", norm, step_size=eps / 10)(model, x, y, eps)
    # tolerance: PGD converges to the closed form: ℓ∞ lands on the ball's corner exactly (up to fp32
    #   steps of ε/10: 1e-5); ℓ2 approaches the optimum along the sphere in 60 steps of ε/10,
    #   within 2e-3
    tol = 1e-5 if norm == "linf" else 2e-3
    torch.testing.assert_close(pgd, closed, atol=tol, rtol=0)
    ce = lambda z: F.cross_entropy(model(z), y, reduction="none")  # noqa: E731
    assert torch.all(ce(closed) >= ce(pgd) - 1e-5)


@pytest.mark.numeric
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_closed_form_attack_on_unbounded_inputs_gives_the_robust_margin(norm):
    """CE at x + δ* equals softplus(−(m − ε‖v‖_*)), and matches unclipped PGD."""
    model = _linear_classifier(9, seed=1)
    model.net.fc.weight.data.mul_(0.2)  # moderate margins: the softmax must not saturate for PGD
    x = 2.0 * torch.randn(20, 1, 3, 3)
    y = torch.randint(0, 2, (20,))
    eps = 1.5
    x_adv = LinearWorstCase(norm=norm)(model, x, y, eps)
    w, b = affine_params(model)
    v, c = (w[1] - w[0]).detach(), float((b[1] - b[0]).detach())
    s = 2.0 * y.float() - 1
    m = s * (x.flatten(1) @ v + c)
    expected = F.softplus(-robust_margin(m, v, eps, norm))
    got = F.cross_entropy(model(x_adv), y, reduction="none")
    # tolerance: fp32 CE of margins up to ~20 through softplus and through log-softmax: 1e-4 relative
    #   covers the cancellation in logsumexp at that size
    torch.testing.assert_close(got, expected.detach(), atol=1e-4, rtol=1e-4)
    with single_thread():
        pgd = build_attack("pgd60", norm, step_size=eps / 10, clip=False)(model, x, y, eps)
    assert pgd.min() < 0 or pgd.max() > 1  # nothing was clamped to [0, 1]
    # tolerance: unclipped PGD against the closed form: ℓ∞ exact at the corner up to fp32 steps; ℓ2
    #   converges along the sphere, inputs of size ~2 × ε 1.5, 60 steps
    tol = 1e-4 if norm == "linf" else 2e-2
    torch.testing.assert_close(pgd, x_adv, atol=tol, rtol=0)


# ------------------------------------------------------------------------------------------
# trainers


@pytest.mark.numeric
def test_bank_equals_separate_training_with_torch_optimizers():
    """The bank's lr-scaled shared optimizer = one torch.optim.Adam per learning rate (same
    init, same batch order), for standard and ℓ2-AT models."""
    p = StableMixtureParams(d=8, mu=1.0, sigma=2.0, n_major=96, n_val_major=32, n_test=10,
                            ratio=2, seed=0)
    data = make_stable_mixture(p)
    settings = TrainSettings(epochs=3, patience=10, batch_size=32)
    slices = [(Method(), 0.05), (Method(), 0.002), (Method("l2", 0.5), 0.01)]
    fits = fit_linear_bank(data, slices, settings, seed=4)
    x, y = data.train.images().flatten(1), data.train.y
    s = 2.0 * y.float() - 1
    for (method, lr), fit in zip(slices, fits, strict=True):
        torch.manual_seed(4)
        lin = torch.nn.Linear(8, 2)
        opt = torch.optim.Adam(lin.parameters(), lr=lr)
        gen = torch.Generator().manual_seed(4)
        best = (math.inf, None)
        for _ in range(3):
            perm = torch.randperm(len(y), generator=gen)
            for i in range(0, len(y), 32):
                idx = perm[i : i + 32]
                v = (lin.weight[1] - lin.weight[0]).detach()
                delta = -method.eps * s[idx, None] * v / v.norm()
                loss = F.cross_entropy(lin(x[idx] + delta), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
            with torch.no_grad():
                val = F.cross_entropy(lin(data.val.images().flatten(1)), data.val.y).item()
            if val < best[0]:
                best = (val, (lin.weight[1] - lin.weight[0]).detach().clone())
        # tolerance: the same training by two codes in fp32 (other summation orders over ~100 steps):
        #   fp32_training
        assert fit.val_loss == pytest.approx(best[0], rel=1e-4)
        np.testing.assert_allclose(fit.params["v"], best[1].numpy(), atol=1e-4)


def test_early_stopping_keeps_the_best_validation_loss():
    """A learning rate that diverges stops after ``patience`` epochs and keeps its best weights."""
    p = StableMixtureParams(d=10, n_major=200, n_val_major=100, n_test=50, seed=1)
    data = make_stable_mixture(p)
    settings = TrainSettings(epochs=40, patience=3, batch_size=64)
    big, small = fit_linear_bank(data, [(Method(), 0.5), (Method(), 1e-4)], settings, seed=0)
    assert big.epochs == big.best_epoch + 1 + 3 or big.epochs == 40
    assert big.epochs < 40 and big.best_epoch < big.epochs
    assert math.isfinite(small.val_loss)


def test_accumulate_attack_grads_adds_the_leaked_clean_loss():
    """Official update for FGSM: ∇θ[CE(x) + CE(x_adv)] (both means), attack from the clean point."""
    model = _linear_classifier(9, seed=2)
    x = 0.2 + 0.6 * torch.rand(16, 1, 3, 3)
    y = torch.randint(0, 2, (16,))
    on = TrainSettings(attack="fgsm", accumulate_attack_grads=True)
    off = TrainSettings(attack="fgsm")
    m = Method("linf", 0.1)
    x_adv = build_attack("fgsm", "linf")(model, x, y, 0.1)
    clean = F.cross_entropy(model(x), y)
    adv = F.cross_entropy(model(x_adv), y)
    got_on = AdversarialStep(m, on, bounded=True).loss(model, x, y)
    got_off = AdversarialStep(m, off, bounded=True).loss(model, x, y)
    torch.testing.assert_close(got_off, adv)
    torch.testing.assert_close(got_on, clean + adv)


def test_leaked_pgd_terms_leave_batch_norm_running_stats_alone():
    model = build_model("vgg11_bn", 1, 2, 8, width=0.125)
    bn = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    before = bn.running_mean.clone()
    with frozen_bn_stats(model):
        model.train()
        model(torch.rand(4, 1, 8, 8))
    assert torch.equal(bn.running_mean, before) and bn.momentum == 0.1


def test_network_trainer_runs_pgd_at_on_a_binary_task(mnist5k_base):
    """MLP + PGD-AT (and the official accumulated update) on mnist5k-binary, two epochs."""
    data = _mnist5k_binary(mnist5k_base, ratio=5, n_major=60, n_val_major=20, n_test=30)
    settings = TrainSettings(optimizer="sgd", momentum=0.9, epochs=2, patience=5,
                             pgd_steps={"linf": 3, "l2": 3})

    def build():
        return build_model("mlp", 1, 2, 28, hidden=[16])

    for accumulate in (False, True):
        s = settings.model_copy(update={"accumulate_attack_grads": accumulate})
        with single_thread():
            fit = fit_network(build, data, Method("linf", 0.1), 0.01, s, seed=0)
        assert fit.epochs == 2 and math.isfinite(fit.val_loss)
        assert fit.pred_balanced.shape == (60,)


# ------------------------------------------------------------------------------------------
# metrics


def test_disparity_metrics_on_hand_built_predictions():
    """AD = acc_majority − acc_minority on the balanced set; the gaps; mean ± std(ddof=0)/√n."""
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    std_pred = torch.tensor([0, 0, 0, 1, 1, 1, 1, 0])  # acc 3/4 and 3/4
    adv_pred = torch.tensor([0, 0, 0, 0, 1, 0, 0, 0])  # acc 1 and 1/4
    ad_std = accuracy_disparity(std_pred == labels, labels, majority=0)
    ad_adv = accuracy_disparity(adv_pred == labels, labels, majority=0)
    assert ad_std == pytest.approx(0.0) and ad_adv == pytest.approx(0.75)
    assert accuracy_disparity(adv_pred == labels, labels, majority=1) == pytest.approx(-0.75)
    assert ad_gap(ad_adv, ad_std) == pytest.approx(0.75)
    assert standard_accuracy_gap(0.9, 0.85) == pytest.approx(0.05)
    mean, se = mean_se(np.array([[1.0, 2.0, 3.0, 4.0, 5.0]]))
    assert mean[0] == pytest.approx(3.0) and se[0] == pytest.approx(math.sqrt(2.0) / math.sqrt(5))
    with pytest.raises(ValueError):
        accuracy_disparity(torch.ones(3, dtype=torch.bool), torch.zeros(3, dtype=torch.long), 0)


def test_binary_task_sizes_majority_and_nested_tests(mnist5k_base):
    b = _mnist5k_binary(mnist5k_base, ratio=4, n_major=100, n_val_major=40, n_test=80)
    assert b.train.y.bincount().tolist() == [100, 25]
    assert b.val.y.bincount().tolist() == [40, 10]
    assert b.test.y.bincount().tolist() == [80, 20]
    assert b.extra["test_balanced"].y.bincount().tolist() == [80, 80]
    assert b.extra["majority"] == 0 and b.class_names[0] == "1"
    # the imbalanced test set is the start of the balanced one; no image is in two splits
    bal = b.extra["test_balanced"]
    assert torch.equal(b.test.x[:80], bal.x[:80]) and torch.equal(b.test.x[80:], bal.x[80:100])
    seen = {bytes(x.numpy()) for x in b.train.x}
    assert not seen & {bytes(x.numpy()) for x in bal.x[:80]}  # class "1" images are distinct
    rest = _mnist5k_binary(mnist5k_base, ratio=4, majority="rest", n_major=100, n_val_major=40,
                           n_test=80)
    assert rest.train.y.bincount().tolist() == [25, 100] and rest.extra["majority"] == 1
    with pytest.raises(UserError, match="data.params.n_major"):
        _mnist5k_binary(mnist5k_base, n_major=1000)
    # every split nests across R: R = 4 takes the start of R = 1's minority blocks
    b1 = _mnist5k_binary(mnist5k_base, ratio=1, n_major=100, n_val_major=40, n_test=80)
    for split in ("train", "val"):
        x4, x1 = getattr(b, split).x, getattr(b1, split).x
        n0 = int((getattr(b, split).y == 0).sum())
        assert torch.equal(x4[:n0], x1[:n0]) and torch.equal(x4[n0:], x1[n0 : len(x4)])
    with pytest.raises(UserError, match="data.params.alpah"):
        load_data(DataConfig(name="stable-mixture", params={"alpah": 2}))


def _idx(path, arr):
    arr = np.asarray(arr, dtype=np.uint8)
    header = bytes([0, 0, 8, arr.ndim]) + b"".join(d.to_bytes(4, "big") for d in arr.shape)
    path.write_bytes(header + arr.tobytes())


def test_fashion_mnist_binary_reads_the_standard_files_and_makes_the_rest_the_majority(tmp_path):
    """Original class 1 (trouser) against the rest, the rest being the majority as in the
    official code; labels are binarised (class 0 = trouser)."""
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    _idx(raw / "train-images-idx3-ubyte", rng.integers(0, 256, (200, 28, 28)))
    _idx(raw / "train-labels-idx1-ubyte", np.arange(200) % 10)
    _idx(raw / "t10k-images-idx3-ubyte", rng.integers(0, 256, (100, 28, 28)))
    _idx(raw / "t10k-labels-idx1-ubyte", np.arange(100) % 10)
    params = {"ratio": 2, "n_major": 12, "n_val_major": 6, "n_test": 8}
    b = load_data(DataConfig(name="fashion-mnist-binary", root=str(tmp_path), params=params))
    assert b.extra["majority"] == 1
    assert b.train.y.bincount().tolist() == [6, 12] and b.val.y.bincount().tolist() == [3, 6]
    assert b.test.y.bincount().tolist() == [4, 8]
    assert b.extra["test_balanced"].y.bincount().tolist() == [8, 8]
