"""DKL / IKL: the decoupled loss has KL's gradient (Theorem 1 of arXiv:2305.13948), the O(C)
wMSE equals the official double sum, class-wise weights roll over per epoch, are checkpointed and
resume exactly, and the objective trains end to end."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robustfair.attacks.basic import TradesKL, kl_per_sample
from robustfair.config import load_config
from robustfair.engine.trainer import Trainer, prepare_run_dir
from robustfair.models import build_model
from robustfair.objectives import OBJECTIVES, BuildContext
from robustfair.objectives.dkl import DKLAttack, dkl_per_sample, weighted_mse

TINY = [
    "data.name=digits", "data.train_limit=128", "data.test_limit=60", "model.name=mlp",
    "model.params={hidden: [24]}", "attack.eps=0.1", "attack.step_size=0.04", "attack.steps=2",
    "train.batch_size=32", "train.optimizer.lr=0.05", "train.schedule.name=constant",
    "validation.every=0", "eval.attacks=[clean, pgd5]", "logging.progress=false",
    "method.objective={name: ikl, alpha: 4.0, beta: 20.0, temperature: 4.0}",
]


def build(name: str, num_classes: int = 10, steps: int = 2, **params):
    ctx = BuildContext(num_classes=num_classes, in_channels=1, image_size=8, eps=0.1,
                       step_size=0.04, steps=steps)
    return OBJECTIVES.build(OBJECTIVES.validate({"name": name, **params}, "objective"), ctx=ctx)


def official_wmse(z_nat, z_adv, weight):
    """The official double sum: 0.25·Σ_{b,j,k} W_bjk (Δn − Δa)²_jk / B, summed (not averaged)."""
    c = z_nat.shape[1]
    dn = z_nat.view(-1, c, 1) - z_nat.view(-1, 1, c)
    da = z_adv.view(-1, c, 1) - z_adv.view(-1, 1, c)
    return 0.25 * ((dn - da).pow(2) * weight).sum((1, 2))


@pytest.mark.numeric
def test_wmse_in_o_of_c_equals_the_official_double_sum():
    torch.manual_seed(0)
    z_nat, z_adv = (3 * torch.randn(2, 8, 7)).unbind(0)
    s = torch.rand(8, 7)
    weight = s[:, :, None] * s[:, None, :]
    assert torch.allclose(weighted_mse(z_nat, z_adv, s), official_wmse(z_nat, z_adv, weight),
                          # tolerance: fp32 sums of 49 pair terms up to ~100 in two orders:
                          #   √49·u·Σ|terms| is ~1e-6 of the result (rtol 1e-5), atol for
                          #   results near 0
                          rtol=1e-5, atol=1e-4)


@pytest.mark.numeric
def test_dkl_gradient_equals_kl_gradient_with_per_sample_weights():
    torch.manual_seed(1)
    zn, za = (2 * torch.randn(2, 6, 5)).unbind(0)
    zn1, za1 = zn.clone().requires_grad_(), za.clone().requires_grad_()
    kl_per_sample(zn1, za1).sum().backward()
    zn2, za2 = zn.clone().requires_grad_(), za.clone().requires_grad_()
    dkl_per_sample(zn2, za2, alpha=1.0, beta=1.0, stop_grad=True).sum().backward()
    # tolerance: FP32_ELEMENTWISE: fp32 gradients of order 1 from a softmax and a few products,
    #   computed by two formulas
    assert torch.allclose(zn1.grad, zn2.grad, atol=1e-6)
    assert torch.allclose(za1.grad, za2.grad, atol=1e-6)
    # the identity splits: wMSE carries KL's gradient into z_nat, the soft CE into z_adv
    zn3, za3 = zn.clone().requires_grad_(), za.clone().requires_grad_()
    dkl_per_sample(zn3, za3, alpha=0.0, beta=1.0).sum().backward()
    assert torch.allclose(zn3.grad, zn1.grad, atol=1e-6) and float(za3.grad.abs().sum()) == 0


@pytest.mark.numeric
def test_ikl_drops_the_stop_gradient_so_wmse_reaches_the_adversarial_logits():
    torch.manual_seed(2)
    zn, za = torch.randn(2, 4, 6).unbind(0)
    s = torch.softmax(torch.randn(4, 6), 1)
    za1 = za.clone().requires_grad_()
    zn1 = zn.clone().requires_grad_()
    dkl_per_sample(zn1, za1, s, alpha=0.0, beta=1.0, stop_grad=False).sum().backward()
    # wMSE depends on z_nat − z_adv only, so the two gradients are opposite
    assert torch.allclose(za1.grad, -zn1.grad, atol=1e-6) and za1.grad.abs().sum() > 0


@pytest.mark.numeric
def test_dkl_objective_with_alpha_equal_beta_trains_like_trades(digits):
    torch.manual_seed(0)
    model = build_model("mlp", 1, 10, 8, hidden=[16])
    x, y = digits.train.images(torch.arange(32)), digits.train.y[:32]
    eps, step = torch.tensor(0.1), torch.tensor(0.04)
    grads = []
    for name, params in (("dkl", {"alpha": 6.0, "beta": 6.0}), ("trades", {"beta": 6.0})):
        torch.manual_seed(5)
        model.zero_grad()
        build(name, **params)(model, x, y, eps, step).total().mean().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads, strict=True):
        # tolerance: fp32 parameter gradients, each a batch mean over 32 samples through two formulas:
        #   FP32_BATCH_MEAN, rtol for the larger entries
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)


class Identity(nn.Module):
    """A 'model' whose logits are its inputs, to feed fixed logits to an objective."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(()))

    def forward(self, x):
        return self.w * x


def test_classwise_weights_are_last_epochs_class_means_at_temperature():
    obj = build("ikl", num_classes=3, steps=0, temperature=2.0)
    model = Identity()
    z = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 4.0], [1.0, 1.0, 0.0], [0.0, 2.0, 0.0]])
    y = torch.tensor([0, 0, 1, 1])
    one = torch.tensor(0.0)
    obj.train()
    obj.on_epoch_start(1)
    out = obj(model, z, y, one, one)
    # epoch 1: uniform 1/C, so every pair weight is 1/9
    assert torch.allclose(out.terms["wmse"], torch.zeros(4))  # x_adv = x without an attack
    # tolerance: torch's default (rtol 1e-5, atol 1e-8): softmax class means of order 1/3 in fp32, a
    #   few u32 apart
    assert torch.allclose(obj.class_weights, torch.full((3, 3), 1 / 3))
    obj.on_epoch_start(1)  # a resumed epoch does not roll over
    assert torch.allclose(obj.class_weights, torch.full((3, 3), 1 / 3))
    obj.on_epoch_start(2)
    p = torch.softmax(z / 2.0, 1)
    assert torch.allclose(obj.class_weights[0], (p[0] + p[1]) / 2)
    assert torch.allclose(obj.class_weights[1], (p[2] + p[3]) / 2)
    assert torch.allclose(obj.class_weights[2], torch.full((3,), 1 / 3))  # unseen: kept
    assert float(obj.accum.abs().sum()) == 0.0
    # evaluation-mode passes do not count
    obj.eval()
    obj(model, z, y, one, one)
    assert float(obj.accum.abs().sum()) == 0.0
    # the state is in buffers
    state = obj.state_dict()
    fresh = build("ikl", num_classes=3, steps=0)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.class_weights, obj.class_weights)
    assert int(fresh.current_epoch) == 2


@pytest.mark.numeric
def test_classwise_weights_enter_the_loss_as_outer_products():
    obj = build("ikl", num_classes=3, steps=0, alpha=0.0, beta=1.0)
    obj.class_weights.copy_(torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.8, 0.1], [1 / 3] * 3]))
    zn = torch.tensor([[1.0, 0.0, -1.0], [0.5, 2.0, 0.0]])
    za = torch.tensor([[0.0, 0.5, 0.0], [0.0, 0.0, 1.0]])
    y = torch.tensor([0, 1])
    s = obj.class_weights[y]
    got = weighted_mse(zn, za, s)
    # tolerance: FP32_ELEMENTWISE: 9 fp32 pair terms of order 1
    assert torch.allclose(got, official_wmse(zn, za, s[:, :, None] * s[:, None, :]), atol=1e-6)


def test_attack_with_wmse_stays_in_the_ball_and_plain_attack_is_trades_kl(digits):
    assert isinstance(build("ikl").attack, TradesKL)
    obj = build("ikl", attack_beta=1.0)
    assert isinstance(obj.attack, DKLAttack)
    torch.manual_seed(0)
    model = build_model("mlp", 1, 10, 8, hidden=[16])
    x, y = digits.train.images(torch.arange(16)), digits.train.y[:16]
    x_adv = obj.attack(model, x, y, 0.1, 0.04)
    assert float((x_adv - x).abs().max()) <= 0.1 + 1e-6
    with torch.no_grad():
        before = F.kl_div(F.log_softmax(model(x), 1), F.softmax(model(x), 1), reduction="sum")
        after = kl_per_sample(model(x), model(x_adv)).sum()
    assert after > before


def test_ikl_trains_and_resumes_mid_epoch_exactly(tmp_path, monkeypatch):
    extra = ["train.epochs=2", "train.checkpoint_every_steps=2"]
    cfgs = [load_config(recipe="mnist5k-trades", overrides=[*TINY, f"output_dir={tmp_path}",
                                                            f"name={n}", *extra])
            for n in ("full", "cut")]
    full = Trainer(cfgs[0], prepare_run_dir(cfgs[0]), quiet=True)
    full.fit()
    w = full.objective.class_weights
    # tolerance: FP32_BATCH_MEAN: rows of fp32 softmax means over an epoch, summed over 10 classes
    assert torch.allclose(w.sum(1), torch.ones(10), atol=1e-5)
    assert not torch.allclose(w, torch.full_like(w, 0.1))  # rolled over after epoch 1
    assert int(full.objective.current_epoch) == 2
    cut = Trainer(cfgs[1], prepare_run_dir(cfgs[1]), quiet=True)
    original = Trainer.train_step

    def dying(self, idx, stats):
        if self.global_step == 6:  # mid-epoch 2, just after the checkpoint at step 6
            raise KeyboardInterrupt
        return original(self, idx, stats)

    monkeypatch.setattr(Trainer, "train_step", dying)
    with pytest.raises(KeyboardInterrupt):
        cut.fit()
    monkeypatch.setattr(Trainer, "train_step", original)
    resumed = Trainer(cfgs[1], tmp_path / "cut", quiet=True)
    resumed.fit(resume=True)
    for a, b in ((full.model, resumed.model), (full.objective, resumed.objective)):
        sa, sb = a.state_dict(), b.state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa), [k for k in sa
                                                            if not torch.equal(sa[k], sb[k])]
