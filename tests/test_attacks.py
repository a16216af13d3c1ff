"""Attack behaviour: ε respected in every norm and ε shape, invariances, and strength."""

from __future__ import annotations

import pytest
import torch

from robustfair.attacks import ATTACKS, build_attack, parse_attack_spec
from robustfair.attacks.base import lp_norm
from robustfair.errors import UserError

BASIC = ["fgsm", "pgd10", "cw10", "trades-kl10"]


@pytest.fixture(scope="module")
def batch(digits):
    x = digits.test.images()[:64]
    y = digits.test.y[:64]
    return x, y


@pytest.mark.parametrize("spec", BASIC)
@pytest.mark.parametrize("norm,eps", [("linf", 0.1), ("l2", 0.8)])
def test_scalar_eps_respected(trained_cnn, batch, spec, norm, eps):
    x, y = batch
    x_adv = build_attack(spec, norm)(trained_cnn, x, y, eps)
    assert x_adv.shape == x.shape
    assert (lp_norm(x_adv - x, norm) <= eps + 1e-5).all()
    assert x_adv.min() >= 0 and x_adv.max() <= 1


@pytest.mark.parametrize("spec", BASIC)
def test_per_sample_and_per_element_eps(trained_cnn, batch, spec):
    x, y = batch
    torch.manual_seed(1)
    per_sample = torch.rand(len(x)) * 0.2
    x_adv = build_attack(spec, "linf")(trained_cnn, x, y, per_sample)
    assert ((x_adv - x).abs().flatten(1).amax(1) <= per_sample + 1e-6).all()
    per_elem = torch.rand_like(x) * 0.2
    x_adv = build_attack(spec, "linf")(trained_cnn, x, y, per_elem)
    assert ((x_adv - x).abs() <= per_elem + 1e-6).all()
    # l2 with a per-sample radius
    r = torch.rand(len(x)) * 1.5
    x_adv = build_attack(spec, "l2")(trained_cnn, x, y, r)
    assert (lp_norm(x_adv - x, "l2") <= r + 1e-5).all()


@pytest.mark.numeric
@pytest.mark.parametrize("spec", BASIC)
def test_scalar_equals_vector_eps(trained_cnn, batch, spec):
    x, y = batch
    atk = build_attack(spec, "linf")
    torch.manual_seed(3)
    a = atk(trained_cnn, x, y, 0.1)
    torch.manual_seed(3)
    b = atk(trained_cnn, x, y, torch.full((len(x),), 0.1))
    torch.manual_seed(3)
    c = atk(trained_cnn, x, y, torch.full_like(x, 0.1))
    # tolerance: torch's default (rtol 1e-5): the same attack with ε as a scalar, a vector or a
    #   tensor; the same fp32 operations, one broadcast apart
    assert torch.allclose(a, b) and torch.allclose(a, c)


@pytest.mark.numeric
@pytest.mark.parametrize("spec", ["fgsm", "pgd10", "cw10"])
def test_batch_equals_per_sample(trained_cnn, batch, spec):
    """A deterministic attack on a batch equals the attack on each sample alone (the TRADES KL
    attack needs its random start: at x' = x its gradient is exactly zero)."""
    x, y = batch
    kw = {"random_start": False} if spec != "fgsm" else {}
    atk = build_attack(spec, "linf", **kw)
    whole = atk(trained_cnn, x[:8], y[:8], 0.1)
    for i in range(8):
        one = atk(trained_cnn, x[i : i + 1], y[i : i + 1], 0.1)
        # tolerance: a batch of 8 against one image (another GEMM blocking): logits differ by fp32
        #   rounding, the steps' signs do not flip on this trained model; FP32_ELEMENTWISE on
        #   pixels in [0, 1]
        assert torch.allclose(whole[i : i + 1], one, atol=1e-6)


@pytest.mark.parametrize("spec", BASIC)
def test_zero_eps_returns_x(trained_cnn, batch, spec):
    x, y = batch
    assert torch.equal(build_attack(spec, "linf")(trained_cnn, x, y, 0.0), x)


def test_input_grads_mode_untouched(trained_cnn, batch):
    x, y = batch
    x0 = x.clone()
    model = trained_cnn
    model.train()
    p = next(model.parameters())
    p.grad = torch.full_like(p, 7.0)
    build_attack("pgd5", "linf")(model, x, y, 0.1)
    assert torch.equal(x, x0)
    assert model.training and all(m.training for m in model.modules())
    assert torch.all(p.grad == 7.0)
    p.grad = None
    model.eval()


def test_attacks_lower_accuracy_and_order(trained_cnn, digits):
    x, y = digits.test.images(), digits.test.y

    def acc(spec):
        torch.manual_seed(0)
        xa = build_attack(spec, "linf")(trained_cnn, x, y, 0.15) if spec else x
        with torch.no_grad():
            return (trained_cnn(xa).argmax(1) == y).float().mean().item()

    clean, fgsm, pgd, cw = acc(None), acc("fgsm"), acc("pgd20"), acc("cw20")
    assert clean > 0.9
    assert pgd < clean - 0.3
    assert pgd <= fgsm + 0.01 and cw <= fgsm + 0.01


def test_l2_pgd_lowers_accuracy(trained_cnn, digits):
    x, y = digits.test.images(), digits.test.y
    xa = build_attack("pgd20", "l2")(trained_cnn, x, y, 1.5)
    with torch.no_grad():
        clean = (trained_cnn(x).argmax(1) == y).float().mean()
        rob = (trained_cnn(xa).argmax(1) == y).float().mean()
    assert rob < clean - 0.3


def test_spec_parsing():
    assert parse_attack_spec("pgd20") == ("pgd", 20)
    assert parse_attack_spec("clean") == ("clean", None)
    assert parse_attack_spec("trades-kl10") == ("trades-kl", 10)
    with pytest.raises(UserError, match="unknown attack"):
        parse_attack_spec("pgdx")


@pytest.mark.parametrize("name", ATTACKS.names())
def test_every_registered_attack_runs_and_respects_eps(trained_mlp, digits, name):
    """Every attack in the registry runs on a small model, stays in the ball and the box, and
    does not raise accuracy above clean accuracy."""
    x, y = digits.test.images()[:16], digits.test.y[:16]
    fields = ATTACKS.get(name).Params.model_fields
    kw = {}
    if "n_queries" in fields:
        kw["n_queries"] = 300
    spec = f"{name}5" if "steps" in fields else name
    atk = build_attack(spec, "linf", **kw)
    torch.manual_seed(0)
    xa = atk(trained_mlp, x, y, 0.1)
    assert xa.shape == x.shape
    assert ((xa - x).abs() <= 0.1 + 1e-5).all() and xa.min() >= 0 and xa.max() <= 1
    with torch.no_grad():
        assert (trained_mlp(xa).argmax(1) == y).sum() <= (trained_mlp(x).argmax(1) == y).sum()
