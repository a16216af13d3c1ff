"""BatchNorm folded into the convolution before it while a model is attacked: the same function
(logits and input gradients), the user's model untouched, verdicts on the user's model, and
models that cannot be folded left as they are."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from robustfair.attacks.autoattack import AutoAttack
from robustfair.attacks.base import fold_batchnorm, logit_tolerance
from robustfair.engine.staged import evaluate_staged
from robustfair.models import build_model

from conftest import train_quick

pytestmark = pytest.mark.usefixtures("one_thread")


def _with_stats(model: nn.Module) -> nn.Module:
    """Non-trivial running statistics and affine parameters in every BatchNorm."""
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(m.num_features, generator=g) - 0.5)
    return model.eval()


@pytest.fixture(scope="module")
def bn_cnn(digits):
    """A small ResNet-18 (BatchNorm after every convolution) trained briefly on digits."""
    torch.manual_seed(0)
    m = build_model("resnet18", 1, 10, 8, digits.mean, digits.std, width=4)
    return train_quick(m, digits, epochs=4)


@pytest.mark.numeric
@pytest.mark.parametrize("name", ["resnet18", "preact_resnet18", "vgg11_bn"])
def test_folded_copy_is_the_same_function(name):
    model = _with_stats(build_model(name, 3, 10, 32, [0.5] * 3, [0.5] * 3))
    x = torch.rand(3, 3, 32, 32)
    bns = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    modes = [m.training for m in model.modules()]
    folded, k = fold_batchnorm(model, x)
    assert folded is not model and 0 < k <= bns
    if name != "preact_resnet18":  # every BatchNorm there follows a convolution
        assert k == bns
    else:  # pre-activation: the BatchNorm on a residual sum is not after a convolution
        assert k < bns
    assert sum(isinstance(m, nn.BatchNorm2d) for m in folded.modules()) == bns - k
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    za, zb = model(xa), folded(xb)
    # the same logits up to the rounding of another summation order, by the library's own
    # criterion (the check fold_batchnorm makes before it uses the copy; derived at LOGIT_RTOL)
    rtol, atol = logit_tolerance(za)
    torch.testing.assert_close(zb, za, rtol=rtol, atol=atol)
    (ga,) = torch.autograd.grad(za[:, 3].sum(), [xa])
    (gb,) = torch.autograd.grad(zb[:, 3].sum(), [xb])
    # tolerance: input gradients back through the same layers, folded or not: the logits' summation-
    #   order rounding (logit_tolerance) relative to the largest gradient, which is ~1e-2 of
    #   the logits
    assert torch.allclose(ga, gb, rtol=1e-3, atol=1e-5)
    # the user's model is as it was: weights, statistics and modes
    assert all(torch.equal(v, model.state_dict()[n]) for n, v in state.items())
    assert [m.training for m in model.modules()] == modes


def test_models_that_cannot_be_folded_are_left_as_they_are():
    class Branchy(nn.Module):  # data-dependent control flow: cannot be traced
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn, self.fc = nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Linear(144, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.bn(self.conv(x))
            if h.mean() > 0:
                h = h.relu()
            return self.fc(h.flatten(1))

    class Shared(nn.Module):  # the convolution's output is used beside the BatchNorm
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn, self.fc = nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Linear(144, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.conv(x)
            return self.fc((self.bn(h) + h).flatten(1))

    x = torch.rand(2, 1, 8, 8)
    for model in (Branchy().eval(), Shared().eval(),
                  nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.BatchNorm1d(8)).eval(),
                  nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten()).eval()):
        assert fold_batchnorm(model, x) == (model, 0)


@pytest.mark.numeric
def test_autoattack_finds_the_same_with_and_without_folding(bn_cnn, digits):
    """Same seeds, the same function: the same points broken, stage by stage."""
    x, y = digits.test.images()[:30], digits.test.y[:30]
    runs = [AutoAttack(norm="linf", steps=25, n_queries=100, fold_batchnorm=f).run(
        bn_cnn, x, y, 0.1) for f in (True, False)]
    assert runs[0].folded_batchnorm == sum(isinstance(m, nn.BatchNorm2d)
                                           for m in bn_cnn.modules()) > 0
    assert runs[1].folded_batchnorm == 0
    assert runs[0].robust["apgd-ce"].sum() < runs[0].clean.sum()  # the attack does break points
    for stage in runs[0].robust:
        assert torch.equal(runs[0].robust[stage], runs[1].robust[stage]), stage


def test_evaluation_attacks_the_folded_copy_and_judges_the_model(bn_cnn, digits):
    """The attacks' passes go through the folded copy; the model itself gives the verdicts
    (a handful of passes), and the summary records how many BatchNorm were folded."""
    split = digits.test.subset(torch.arange(30))
    calls = []
    handle = bn_cnn.register_forward_hook(lambda *_: calls.append(1))
    try:
        res = evaluate_staged(bn_cnn, split, ["clean", "pgd10"], 0.1, batch_size=30)
    finally:
        handle.remove()
    assert res.settings["folded_batchnorm"] > 0
    assert len(calls) <= 3  # clean, the verdict, and the folding check on 4 images
    ref = evaluate_staged(bn_cnn, split, ["clean", "pgd10"], 0.1, batch_size=30, fold_bn=False)
    assert ref.settings["folded_batchnorm"] == 0
    assert torch.equal(res.row("pgd10"), ref.row("pgd10"))
