"""Sanity checks of an evaluation: each passes on an honest model and fails on a model built to
fail it (softmax outputs, a non-differentiable input quantization, a randomised model, a
stateful defense), with a fix in its verdict."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robustfair.engine.checks import (
    CHECKS,
    check_deterministic,
    check_eps_zero,
    check_logits,
    check_monotone_eps,
    check_monotone_steps,
    check_square_vs_whitebox,
    check_unbounded,
    check_zero_gradients,
    run_checks,
)

EPS = 0.1


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def mlp(trained_mlp):
    """conftest's MLP (one hidden layer of 64) trained normally on digits: about 97% clean
    accuracy."""
    return trained_mlp


class Softmax(nn.Module):
    """Returns probabilities instead of logits."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x).softmax(1)


class Quantized(nn.Module):
    """Rounds the input to 4 grey levels first: the input gradient is exactly zero."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(torch.round(x * 4) / 4)


class Noisy(nn.Module):
    """A randomised model: Gaussian noise on the logits, even in eval mode."""

    def __init__(self, model: nn.Module, std: float = 2.0) -> None:
        super().__init__()
        self.model, self.std = model, std

    def forward(self, x):
        z = self.model(x)
        return z + self.std * torch.randn_like(z)


class Stateful(nn.Module):
    """A stateful defense: honest for its first ``after`` queries, then it answers with the
    label of the nearest memorised image (which the attacks cannot move away from)."""

    def __init__(self, model: nn.Module, x_mem, y_mem, after: int) -> None:
        super().__init__()
        self.model, self.x_mem, self.y_mem, self.after, self.calls = model, x_mem, y_mem, after, 0

    def forward(self, x):
        self.calls += 1
        if self.calls <= self.after:
            return self.model(x)
        d = torch.cdist(x.flatten(1), self.x_mem.flatten(1))
        label = self.y_mem[d.argmin(1)]
        return 10.0 * F.one_hot(label, 10).to(x.dtype) + 0.0 * x.flatten(1).sum(1, keepdim=True)


@pytest.fixture(scope="module")
def points(digits):
    return digits.test.images()[:120], digits.test.y[:120]


def test_every_check_passes_on_an_honest_model(mlp, points):
    x, y = points
    results = run_checks(mlp, x, y, EPS, quick=True)
    assert [r.name for r in results] == list(CHECKS)
    for r in results:
        assert r.passed, (r.name, r.verdict)
        assert r.fix == ""


def test_logits_check_catches_probabilities(mlp, points):
    r = check_logits(Softmax(mlp), points[0])
    assert not r.passed and "softmax" in r.fix


def test_determinism_check_catches_a_randomised_model(mlp, points):
    r = check_deterministic(Noisy(mlp), points[0])
    assert not r.passed and "autoattack-rand" in r.fix
    assert r.details["prediction_flips"] > 0


def test_eps_zero_check_catches_randomness_and_inputs_outside_the_box(mlp, points):
    x, y = points
    torch.manual_seed(0)
    r = check_eps_zero(Noisy(mlp), x, y)
    assert not r.passed and "deterministic" in r.fix
    # normalization outside the model: images in [−1, 1] are clipped by the attack
    shifted = nn.Sequential(_Affine(0.5, 0.5), mlp)
    r = check_eps_zero(shifted, 2 * x - 1, y)
    assert not r.passed and "[0, 1]" in r.fix


class _Affine(nn.Module):
    def __init__(self, a: float, b: float) -> None:
        super().__init__()
        self.a, self.b = a, b

    def forward(self, x):
        return self.a * x + self.b


def test_zero_gradient_check_catches_quantization(mlp, points):
    r = check_zero_gradients(Quantized(mlp), *points)
    assert not r.passed and r.details["fraction_zero"] == 1.0 and "BPDA" in r.fix


def test_unbounded_check_catches_quantization(mlp, points):
    r = check_unbounded(Quantized(mlp), *points)
    assert not r.passed and r.details["accuracy"] > 0.02


def test_square_check_catches_quantization(mlp, points):
    r = check_square_vs_whitebox(Quantized(mlp), *points, EPS, n_queries=300, steps=20)
    assert not r.passed
    assert r.details["square"] < r.details["whitebox"] - 0.01


def test_monotone_eps_check_catches_a_stateful_defense(mlp, digits, points):
    x, y = points
    model = Stateful(mlp, digits.test.images(), digits.test.y, after=30)
    r = check_monotone_eps(model, x, y, EPS)
    assert not r.passed
    accs = r.details["accuracy"]
    assert max(accs[1:]) > accs[0] + 0.01


def test_monotone_steps_check_catches_a_stateful_defense(mlp, digits, points):
    x, y = points
    model = Stateful(mlp, digits.test.images(), digits.test.y, after=15)
    r = check_monotone_steps(model, x, y, EPS)
    assert not r.passed and "adaptive" in r.fix
