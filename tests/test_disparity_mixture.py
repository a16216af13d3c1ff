"""AT-on-AD on general stable mixtures: vector/profile μ and σ, class scales, the closed-form
oracle of the best standard and robust linear rules, the figure1 preset, model selection, and
`robustfair train` on unbounded data (attacks must not clip to [0, 1])."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner

from robustfair.attacks import build_attack
from robustfair.cli import cli
from robustfair.config import DataConfig
from robustfair.data import load_data
from robustfair.data.stable_mixture import StableMixtureParams, make_stable_mixture
from robustfair.engine.checks import run_checks
from robustfair.errors import UserError
from robustfair.studies.disparity import build_study_config, closed_form, run_disparity_study
from robustfair.studies.linear import affine_params, fit_linear_bank
from robustfair.studies.oracle import optimal_linear_rule
from robustfair.studies.presets import study_preset
from robustfair.studies.trainer import Method, TrainSettings


def profile(*runs: tuple[float, int]) -> list[dict[str, float]]:
    return [{"value": v, "count": n} for v, n in runs]


def per_class(pred: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    correct = pred == y
    return np.array([float(correct[y == k].float().mean()) for k in (0, 1)])


def test_profiles_vectors_and_errors():
    p = StableMixtureParams(mu=profile((4, 20), (1, 80)), sigma=8)
    mix = p.mixture()
    assert p.d == 100 and mix.mu[:20].tolist() == [4.0] * 20 and mix.mu[20:].sum() == 80
    assert "μ = 4×20, 1×80" in mix.describe() and "σ = 8" in mix.describe()
    assert StableMixtureParams(mu=[1, 2, 3], sigma=[1, 1, 2]).d == 3
    # the draw follows the vector means and the class scale
    data = make_stable_mixture(StableMixtureParams(
        mu=[3.0, -1.0], sigma=[0.5, 2.0], class_scale=(1.0, 3.0), n_test=20_000))
    x = data.extra["test_balanced"].x.flatten(1)
    np.testing.assert_allclose(x[20_000:].mean(0), [3.0, -1.0], atol=0.1)
    np.testing.assert_allclose(x[:20_000].std(0), [0.5 * math.sqrt(2), 2 * math.sqrt(2)],
                               rtol=0.03)
    np.testing.assert_allclose(x[20_000:].std(0) / x[:20_000].std(0), [3.0, 3.0], rtol=0.03)
    for bad, msg in (({"mu": [1, 2], "d": 3}, "mu has 2 coordinates but d is 3"),
                     ({"mu": [1, 2], "sigma": [1, 1, 1]}, "different lengths"),
                     ({"sigma": [1.0, 0.0]}, "must be > 0")):
        with pytest.raises(UserError, match=msg):
            load_data(DataConfig(name="stable-mixture", params=bad))


def test_oracle_reproduces_hand_computed_optima():
    """Scalar μ: the ce optimum is the Bayes rule w ∝ 1 and ℓ2 AT keeps its direction. 20
    coordinates at 4 and 80 at 1 (σ = 8): Bayes accuracy Φ(‖μ‖/(σ√2)) = Φ(20/(8√2)), and ℓ∞
    ε = 1 drops the small coordinates: Φ(80/(8√2·√20))."""
    from scipy.stats import norm

    scalar = StableMixtureParams(d=10, mu=1.0, sigma=2.0).mixture()
    w, b = optimal_linear_rule(scalar, 0.2)
    assert np.allclose(w / w[0], 1.0, atol=1e-5) and b == pytest.approx(math.log(0.25), abs=1e-4)
    w2, _ = optimal_linear_rule(scalar, 0.5, 2.0, "l2")
    assert np.allclose(w2 / w2[0], 1.0, atol=1e-5)
    mix = StableMixtureParams(mu=profile((4, 20), (1, 80)), sigma=8).mixture()
    bayes = norm.cdf(20 / (8 * math.sqrt(2)))
    w, b = optimal_linear_rule(mix, 0.5)
    np.testing.assert_allclose(mix.class_accuracy(w, b), [bayes, bayes], atol=1e-6)
    w, b = optimal_linear_rule(mix, 0.5, 1.0, "linf")
    dropped = norm.cdf(80 / (8 * math.sqrt(2) * math.sqrt(20)))
    np.testing.assert_allclose(mix.class_accuracy(w, b), [dropped, dropped], atol=1e-4)
    assert np.abs(w[20:]).max() < 1e-3 * np.abs(w[:20]).min()


def test_closed_form_matches_trained_linear_models_on_a_general_mixture():
    """Vector μ, per-coordinate σ and unequal class scales: every trained model's per-class
    accuracy on 10,000 test points per class is within 1 point of the closed form of its rule,
    and standard and ℓ∞ AT (selected on the robust validation loss) land within 1.5 points of
    the oracle's optima."""
    p = StableMixtureParams(d=20, mu=profile((0.8, 5), (2.0, 15)), sigma=profile((1, 5), (5, 15)),
                            class_scale=(1.0, 1.3), n_major=2000, n_val_major=500,
                            n_test=10_000, ratio=1, seed=5)
    data, mix = make_stable_mixture(p), p.mixture()
    methods = [Method(), Method("linf", 1.0), Method("l2", 2.0)]
    fits = fit_linear_bank(data, [(m, 1e-2) for m in methods],
                           TrainSettings(epochs=12, patience=4, batch_size=128,
                                         selection="robust"), seed=0)
    bal = data.extra["test_balanced"]
    for f in fits:
        expected = mix.class_accuracy(np.asarray(f.params["v"]), f.params["c"])
        assert np.abs(per_class(f.pred_balanced, bal.y) - expected).max() < 0.01, f.method
        if f.method.norm != "l2":
            w, b = optimal_linear_rule(mix, 0.5, f.method.eps, f.method.norm or "linf")
            assert np.abs(mix.class_accuracy(w, b) - expected).max() < 0.015, f.method


def test_figure1_preset_shows_the_standard_accuracy_drop_at_R1(tmp_path):
    raw = study_preset("stable-mixture", 2, "figure1")
    assert raw["data_params"]["mu"][0] == {"value": 0.8, "count": 20}
    raw.update(ratios=[1], seeds=[2], norms=["linf"], eps={"linf": [1.0]},
               lrs_standard=[1e-2], lrs_robust=[1e-2])
    raw["data_params"].update(n_major=1000, n_val_major=300, n_test=2000)
    raw["train"].update(epochs=10, patience=3, batch_size=128)
    res = run_disparity_study(build_study_config(raw), tmp_path, workers=1, quiet=True)
    row, cf = res["gaps"]["linf"][0], res["closed_form"]["gaps"]["linf"][0]
    assert cf["acc_gap"][0] > 0.05 and row["acc_gap_mean"][0] > 0.03
    saved = json.loads((tmp_path / "results.json").read_text())
    assert "μ = 0.8×20, 2×80" in saved["data"] and saved["preset"] == "figure1"
    assert "standard error" in saved["caption"] and saved["closed_form"]["loss"] == "ce"
    # the official scalar mixture has no such drop: the robust rule keeps the Bayes direction
    off = closed_form(build_study_config(
        {**study_preset("stable-mixture", 2), "ratios": [1], "norms": ["linf"],
         "eps": {"linf": [1.0]}}))
    assert abs(off["gaps"]["linf"][0]["acc_gap"][0]) < 1e-3
    with pytest.raises(UserError, match="stable-mixture only"):
        study_preset("mnist5k-binary", None, "figure1")


def test_selection_options_min_epochs_and_robust_loss():
    data = make_stable_mixture(StableMixtureParams(d=8, mu=1.0, sigma=2.0, n_major=200,
                                                   n_val_major=100, n_test=50, ratio=3))
    pairs = [(Method(), 1e-2), (Method("linf", 0.3), 1e-2)]
    base = dict(epochs=8, patience=2, batch_size=64)
    late = fit_linear_bank(data, pairs, TrainSettings(**base, min_epochs=6), seed=0)
    assert all(f.best_epoch >= 5 for f in late)
    clean = fit_linear_bank(data, pairs, TrainSettings(**base), seed=0)
    robust = fit_linear_bank(data, pairs, TrainSettings(**base, selection="robust"), seed=0)
    assert robust[0].val_loss == pytest.approx(clean[0].val_loss)  # standard: no attack
    assert robust[1].val_loss > clean[1].val_loss  # the adversarial loss is larger
    with pytest.raises(ValueError, match="min_epochs"):
        TrainSettings(epochs=3, min_epochs=4)


def test_attacks_on_unbounded_data_do_not_clip():
    with pytest.raises(UserError, match="unbounded"):
        build_attack("autoattack", "linf", bounded=False)
    assert build_attack("pgd10", "linf", bounded=False).clip is False
    assert build_attack("pgd10", "linf").clip is True


def test_train_on_stable_mixture_never_clips_and_agrees_with_the_closed_form(tmp_path):
    """`robustfair train` with PGD-AT on an unbounded mixture: validation and test robust
    accuracy never above clean, ‖x_adv − x‖∞ ≤ ε with points outside [0, 1], and the trained
    linear model's clean and PGD-20 per-class accuracies match its closed form."""
    eps = 1.0
    params = {"d": 20, "mu": profile((0.8, 5), (2.0, 15)), "sigma": profile((1, 5), (5, 15)),
              "ratio": 2, "n_major": 1500, "n_val_major": 300, "n_test": 5000}
    cfg = {"name": "sm", "output_dir": str(tmp_path), "data": {"name": "stable-mixture",
           "params": params}, "model": {"name": "linear"},
           "method": {"objective": {"name": "pgd_at"}},
           "attack": {"norm": "linf", "eps": eps, "step_size": 0.25, "steps": 5},
           "train": {"epochs": 3, "batch_size": 128, "schedule": {"name": "constant"},
                     "optimizer": {"name": "adam", "lr": 0.01, "weight_decay": 0.0}},
           "validation": {"every": 1, "attack": "pgd10", "n": 300},
           "eval": {"attacks": ["clean", "pgd20"], "batch_size": 2000}}
    path = tmp_path / "sm.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = CliRunner().invoke(cli, ["train", str(path), "-q"])
    assert out.exit_code == 0, out.output
    run = tmp_path / "sm"
    for line in (run / "log.jsonl").read_text().splitlines():
        val = json.loads(line).get("val")
        if val:
            assert val["robust"]["avg"] <= val["clean"]["avg"]
            assert val["robust"]["avg"] > 0.3  # below chance would mean a broken attack
    summary = json.loads((run / "eval" / "summary.json").read_text())
    s = summary["attacks"]
    assert s["pgd20"]["avg"] <= s["clean"]["avg"]
    assert summary["settings"]["attacks"][1]["clip"] is False

    from robustfair.report.eps_curve import load_run_model

    model, data, _, _ = load_run_model(run, "last")
    x, y = data.test.images()[:500], data.test.y[:500]
    x_adv = build_attack("pgd20", "linf", bounded=data.bounded)(model, x, y, eps)
    assert float((x_adv - x).abs().max()) <= eps + 1e-5
    assert float(x_adv.min()) < 0.0 and float(x_adv.max()) > 1.0
    w, c = affine_params(model)
    v, c = (w[1] - w[0]).detach().numpy(), float((c[1] - c[0]).detach())
    mix = data.extra["mixture"]
    for attack, e in (("clean", 0.0), ("pgd20", eps)):
        measured = np.array(s[attack]["per_class"])
        expected = mix.class_accuracy(v, c, e, "linf")
        assert np.abs(measured - expected).max() < 0.02, (attack, measured, expected)
    checks = {r.name: r for r in run_checks(model, x[:200], y[:200], eps, bounded=False)}
    assert "square_vs_whitebox" not in checks
    assert checks["eps_zero"].passed and checks["unbounded"].passed
