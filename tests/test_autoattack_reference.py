"""robustfair's AutoAttack against the reference implementation of Croce & Hein (the
``pyautoattack`` package, 0.2.0), on the digits MLP and 100 class-stratified test images: the
standard ensemble leaves no class more than one image more robust than the reference does (ℓ∞
and ℓ2, 60 images), and APGD-CE alone matches the reference's APGD-CE at the same seed within one
image (100 images). Square runs 500 queries in both (the product's 5,000 only lengthen the test;
``benchmarks/bench_aa_reference.py`` runs the full settings)."""

from __future__ import annotations

import logging

import pytest
import torch

from robustfair.attacks import build_attack
from robustfair.attacks.autoattack import AutoAttack
from robustfair.engine.subset import subset_indices

pyautoattack = pytest.importorskip("pyautoattack")
from pyautoattack.autopgd_base import APGDAttack  # noqa: E402

EPS = {"linf": 0.1, "l2": 0.8}
REF_NORM = {"linf": "Linf", "l2": "L2"}
QUERIES = 500


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    logging.getLogger("auto-attack").setLevel(logging.ERROR)
    yield
    torch.set_num_threads(n)


def _stratified(digits, n):
    idx = subset_indices(digits.test.y, n)
    return digits.test.images(idx), digits.test.y[idx]


@pytest.fixture(scope="module")
def images(digits):
    return _stratified(digits, 100)


@pytest.fixture(scope="module")
def aa_images(digits):
    return _stratified(digits, 60)


def _robust_per_class(model, x_adv, y) -> list[int]:
    with torch.no_grad():
        ok = model(x_adv).argmax(1) == y
    return torch.bincount(y[ok], minlength=10).tolist()


@pytest.mark.slow
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_autoattack_standard_is_not_weaker_than_the_reference_in_any_class(trained_mlp,
                                                                          aa_images, norm):
    x, y = aa_images
    torch.manual_seed(0)
    ours = AutoAttack(norm=norm, n_queries=QUERIES).run(trained_mlp, x, y, EPS[norm]).x_adv
    ref = pyautoattack.AutoAttack(trained_mlp, norm=REF_NORM[norm], eps=EPS[norm], seed=0,
                                  version="standard", device="cpu")
    ref.verbose = False
    ref.square.n_queries = QUERIES
    theirs, _ = ref.run_standard_evaluation(x, y, batch_size=len(y))
    a, b = _robust_per_class(trained_mlp, ours, y), _robust_per_class(trained_mlp, theirs, y)
    assert 0 < sum(b) < 0.9 * len(y)  # the attack has something to do
    assert all(o <= t + 1 for o, t in zip(a, b, strict=True)), (a, b)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_apgd_ce_matches_the_reference_at_the_same_seed(trained_mlp, images, norm):
    x, y = images
    torch.manual_seed(0)
    ours = build_attack("apgd-ce", norm)(trained_mlp, x, y, EPS[norm])
    ref = APGDAttack(trained_mlp, n_iter=100, norm=REF_NORM[norm], n_restarts=1,
                     eps=EPS[norm], seed=0, loss="ce", eot_iter=1, rho=0.75, device="cpu")
    theirs = ref.perturb(x, y)
    a, b = _robust_per_class(trained_mlp, ours, y), _robust_per_class(trained_mlp, theirs, y)
    assert 5 < sum(b) < 90
    assert abs(sum(a) - sum(b)) <= 1, (a, b)
