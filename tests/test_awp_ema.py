"""AWP (arXiv:2004.05884): layer-wise relative perturbation γ·‖w‖ in the ascent direction, a
changed update, weights restored exactly, no side effects; EMA weights are evaluated when asked."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from robustfair.config import load_config
from robustfair.engine.awp import AWP
from robustfair.engine.trainer import EMA, Trainer, prepare_run_dir
from robustfair.models import build_model
from robustfair.objectives import OBJECTIVES, BuildContext

TINY = [
    "data.name=digits", "data.train_limit=128", "data.test_limit=60", "model.name=mlp",
    "model.params={hidden: [24]}", "attack.eps=0.1", "attack.step_size=0.04", "attack.steps=2",
    "train.batch_size=32", "train.optimizer.lr=0.05", "train.schedule.name=constant",
    "validation.every=0", "eval.attacks=[clean]", "logging.progress=false",
]


def tiny_cfg(tmp_path, *extra):
    return load_config(recipe="mnist5k-trades", overrides=[*TINY, f"output_dir={tmp_path}", *extra])


def mlp() -> torch.nn.Module:
    return build_model("mlp", 1, 10, 8, hidden=[16])


def objective(name: str, steps: int = 0, **params):
    ctx = BuildContext(num_classes=10, in_channels=1, image_size=8, steps=steps,
                       build_model=lambda n, **p: build_model(n, 1, 10, 8, **p))
    return OBJECTIVES.build(OBJECTIVES.validate({"name": name, **params}, "o"), ctx=ctx)


def batch(digits, n: int = 64):
    return digits.train.images(torch.arange(n)), digits.train.y[:n]


def loss_of(model, x, y) -> float:
    with torch.no_grad():
        return float(F.cross_entropy(model(x), y))


@pytest.mark.numeric
def test_perturbation_is_gamma_times_the_layer_norm_and_raises_the_loss(digits):
    torch.manual_seed(0)
    model = mlp()
    x, y = batch(digits)
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    awp = AWP(model, 0.01, mlp)
    before = loss_of(model, x, y)
    awp.perturb(model, objective("standard"), x, y, torch.tensor(0.0), torch.tensor(0.0))
    assert set(awp.diff) == {n for n, p in model.named_parameters() if p.dim() > 1}
    for n, p in model.named_parameters():
        v = p.detach() - w0[n]
        if p.dim() > 1:
            # tolerance: fp32 norms of up to ~10,000 weights: √10⁴·u ≈ 6e-6 relative, ×16 margin
            assert torch.isclose(v.norm(), 0.01 * w0[n].norm(), rtol=1e-4)
        else:
            assert float(v.abs().max()) == 0.0  # biases are not perturbed
    assert loss_of(model, x, y) > before
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.numeric
def test_restore_leaves_the_weights_unperturbed(digits):
    torch.manual_seed(0)
    model = mlp()
    x, y = batch(digits)
    w0 = copy.deepcopy(model.state_dict())
    awp = AWP(model, 0.005, mlp)
    awp.perturb(model, objective("trades", steps=2), x, y, torch.tensor(0.1), torch.tensor(0.04))
    assert any(not torch.equal(w0[k], v) for k, v in model.state_dict().items())
    awp.restore(model)
    assert awp.diff == {}
    for k, v in model.state_dict().items():
        # tolerance: add then subtract the same fp32 perturbation (|v| ≤ 1e-2·|w| ≤ 0.1): at most 2
        #   u32 of the weight, weights below 1
        assert torch.allclose(v, w0[k], atol=1e-7), k


@pytest.mark.numeric
def test_awp_changes_the_update_to_the_gradient_at_the_perturbed_weights(digits):
    torch.manual_seed(0)
    plain = mlp()
    with_awp = copy.deepcopy(plain)
    x, y = batch(digits)
    obj = objective("standard")
    lr = 0.1

    def sgd_step(model, awp=None):
        opt = torch.optim.SGD(model.parameters(), lr=lr)
        if awp is not None:
            awp.perturb(model, obj, x, y, torch.tensor(0.0), torch.tensor(0.0))
        grads = torch.autograd.grad(obj(model, x, y, None, None).total().mean(),
                                    list(model.parameters()))
        for p, g in zip(model.parameters(), grads, strict=True):
            p.grad = g
        opt.step()
        if awp is not None:
            awp.restore(model)
        return grads

    w0 = {n: p.detach().clone() for n, p in plain.named_parameters()}
    sgd_step(plain)
    awp = AWP(with_awp, 0.02, mlp)
    g_perturbed = sgd_step(with_awp, awp)
    changed = [not torch.allclose(a, b) for a, b in zip(plain.parameters(),
                                                         with_awp.parameters(), strict=True)]
    assert any(changed)
    # w ← w − lr·∇L(w + v): the update uses the gradient at the perturbed point, from w
    for (n, p), g in zip(with_awp.named_parameters(), g_perturbed, strict=True):
        # tolerance: FP32_ELEMENTWISE: one SGD step computed by the optimizer and by hand
        assert torch.allclose(p.detach(), w0[n] - lr * g, atol=1e-6), n


def test_perturb_has_no_side_effect_on_the_objectives_state_or_gradients(digits):
    torch.manual_seed(0)
    model = mlp()
    x, y = batch(digits, 32)
    dkl = objective("ikl", steps=1)
    dkl.train()
    dkl.on_epoch_start(1)
    lb = objective("lbgat", steps=1, teacher={"name": "resnet18", "params": {"width": 4}})
    lb.train()
    for obj in (dkl, lb):
        buffers = {n: b.clone() for n, b in obj.named_buffers()}
        awp = AWP(model, 0.005, mlp)
        awp.perturb(model, obj, x, y, torch.tensor(0.1), torch.tensor(0.04))
        awp.restore(model)
        assert all(torch.equal(b, buffers[n]) for n, b in obj.named_buffers())
        assert all(p.grad is None for p in obj.parameters())
        assert all(p.grad is None for p in model.parameters())
    assert any(n.endswith("running_mean") for n, _ in lb.named_buffers())  # BN was exercised


def test_trainer_with_awp_trains_and_starts_after_the_warmup(tmp_path, monkeypatch):
    calls = []
    original = AWP.perturb

    def counting(self, *a, **k):
        calls.append(1)
        return original(self, *a, **k)

    monkeypatch.setattr(AWP, "perturb", counting)
    cfg = tiny_cfg(tmp_path, "name=awp", "train.epochs=2", "train.awp.enabled=true",
                   "train.awp.warmup=1")
    t = Trainer(cfg, prepare_run_dir(cfg), quiet=True)
    t.fit()
    assert len(calls) == 4  # epoch 2 only (4 steps per epoch)
    assert t.awp is not None and t.awp.diff == {}


@pytest.mark.numeric
def test_ema_update_is_the_exponential_average():
    torch.manual_seed(0)
    model = mlp()
    ema = EMA(model, decay=0.9)
    w0 = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model)
    for k, v in model.state_dict().items():
        if v.dtype.is_floating_point and k in dict(model.named_parameters()):
            assert torch.allclose(ema.shadow[k], 0.9 * w0[k] + 0.1 * v)


def test_evaluation_uses_the_averaged_weights_when_asked(tmp_path, monkeypatch):
    from robustfair.engine import protocol

    seen = []
    real = protocol.evaluate_split  # the one routine of training's end and of `eval`

    def capture(model, *a, **k):
        seen.append(copy.deepcopy(model.state_dict()))
        return real(model, *a, **k)

    monkeypatch.setattr(protocol, "evaluate_split", capture)
    for evaluate in (True, False):
        cfg = tiny_cfg(tmp_path, f"name=ema{evaluate}", "train.epochs=1",
                       "train.ema.enabled=true", "train.ema.decay=0.9",
                       f"train.ema.evaluate={str(evaluate).lower()}")
        t = Trainer(cfg, prepare_run_dir(cfg), quiet=True)
        t.fit()
        t.final_eval(progress=False)
        used = seen[-1]
        target = t.ema.state_dict() if evaluate else t.model.state_dict()
        other = t.model.state_dict() if evaluate else t.ema.state_dict()
        assert all(torch.equal(used[k], target[k]) for k in used)
        assert any(not torch.equal(used[k], other[k]) for k in used)
    # `robustfair eval` on the run does the same
    from robustfair.commands.evaluate import evaluate_run

    evaluate_run(tmp_path / "emaTrue", quiet=True)
    t = Trainer(load_config(tmp_path / "emaTrue" / "config.yaml"), tmp_path / "emaTrue",
                quiet=True)
    t.resume()
    assert all(torch.equal(seen[-1][k], t.ema.state_dict()[k]) for k in seen[-1])
