"""Fidelity to the official codes: each settled difference pinned on small float64 inputs against
the official formula written out by hand, for the default and for the option; and every setting
that docs/fidelity.md names exists in the configuration schema."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from robustfair.config import apply_override, build_config
from robustfair.data import ArrayData, DataBundle
from robustfair.engine.evaluator import EvalResult
from robustfair.objectives import OBJECTIVES, BuildContext
from robustfair.policies import POLICIES, EpochContext
from robustfair.policies.wat import class_costs
from robustfair.samplers import SAMPLERS

EPS, ALPHA, STEPS = 0.1, 0.03, 3
CPU = torch.device("cpu")


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def _images() -> tuple[torch.Tensor, torch.Tensor]:
    """Four 3×2×2 images with many pixels at exactly 0 or 1 (as on MNIST)."""
    g = torch.Generator().manual_seed(1)
    x = torch.rand(4, 3, 2, 2, generator=g, dtype=torch.float64)
    x = torch.where(x < 0.35, torch.zeros_like(x), torch.where(x > 0.65, torch.ones_like(x), x))
    return x, torch.tensor([0, 1, 2, 1])


def _ctx(**kw) -> BuildContext:
    return BuildContext(num_classes=3, in_channels=3, image_size=2, eps=EPS, step_size=ALPHA,
                        steps=STEPS, extra={"epochs": 10, "objective": {"beta": 6.0}}, **kw)


def _per_sample(v, x):
    return torch.as_tensor(v, dtype=x.dtype).reshape(-1, 1, 1, 1).expand(len(x), 1, 1, 1)


def _official_loop(model, x, y, start, eps, alpha, loss: str):
    """The official TRADES / MART / PART inner loop: sign step, then
    min(max(x', x − ε), x + ε) (elementwise ε), then clamp to [0, 1]."""
    with torch.no_grad():
        p_nat = F.softmax(model(x), 1)
    x_adv = start
    for _ in range(STEPS):
        x_adv = x_adv.detach().requires_grad_(True)
        z = model(x_adv)
        obj = (F.kl_div(F.log_softmax(z, 1), p_nat, reduction="sum") if loss == "kl"
               else F.cross_entropy(z, y))
        (g,) = torch.autograd.grad(obj, [x_adv])
        x_adv = x_adv.detach() + alpha * g.sign()
        x_adv = torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0, 1)
    return x_adv


def _run(obj, model, x, y, eps, step, seed=3):
    torch.manual_seed(seed)
    return obj(model, x, y, eps, step).x_adv


# ------------------------------------------------------------------ 1, 2: Gaussian starts
@pytest.mark.parametrize("name,loss", [("trades", "kl"), ("mart", "ce")])
def test_gaussian_start_is_raw_by_default_and_clamped_on_request(name, loss):
    model, (x, y) = _net(), _images()
    eps, step = _per_sample([EPS] * 4, x), _per_sample([ALPHA] * 4, x)
    torch.manual_seed(3)
    noise = 0.001 * torch.randn_like(x)
    official = _official_loop(model, x, y, x + noise, eps, ALPHA, loss)
    got = _run(OBJECTIVES.build({"name": name}, ctx=_ctx()), model, x, y, eps, step)
    assert torch.allclose(got, official, atol=1e-12, rtol=0)
    clamped = _official_loop(model, x, y, (x + noise).clamp(0, 1), eps, ALPHA, loss)
    other = {"trades": "normal_clamped", "mart": "uniform"}[name]
    got = _run(OBJECTIVES.build({"name": name, "start": other}, ctx=_ctx()), model, x, y, eps,
               step)
    if name == "trades":
        assert torch.allclose(got, clamped, atol=1e-12, rtol=0)
    else:  # the former MART start: uniform in the ε-ball, clamped
        torch.manual_seed(3)
        u = (2 * torch.rand(x.shape, dtype=x.dtype) - 1) * EPS
        want = _official_loop(model, x, y, (x + u).clamp(0, 1), eps, ALPHA, loss)
        assert torch.allclose(got, want, atol=1e-12, rtol=0)
    assert not torch.allclose(official, clamped, atol=1e-6)  # the start matters on 0/1 pixels


@pytest.mark.parametrize("name", ["lbgat", "dkl", "ikl"])
def test_every_trades_kl_objective_starts_raw(name):
    spec = {"name": name, **({"teacher": {"name": "mlp"}} if name == "lbgat" else {})}
    ctx = _ctx(build_model=lambda n, **kw: nn.Linear(12, 3))
    assert OBJECTIVES.build(spec, ctx=ctx).attack.clamp_start is False
    assert OBJECTIVES.build({**spec, "start": "normal_clamped"}, ctx=ctx).attack.clamp_start


# ------------------------------------------------------------------ 11: PART's start
def test_part_start_is_the_scalar_uniform_box_unclamped():
    model, (x, y) = _net(), _images()
    g = torch.Generator().manual_seed(4)
    eps_map = torch.where(torch.rand(x.shape, generator=g) < 0.5, 0.04, EPS).double()
    step = _per_sample([ALPHA] * 4, x)
    torch.manual_seed(3)
    u = 2 * torch.rand(x.shape, dtype=x.dtype) - 1
    official = _official_loop(model, x, y, x + u * EPS, eps_map, ALPHA, "ce")  # part_pgd
    obj = OBJECTIVES.build({"name": "pgd_at"}, ctx=_ctx())
    assert torch.allclose(_run(obj, model, x, y, eps_map, step), official, atol=1e-12, rtol=0)
    obj = OBJECTIVES.build({"name": "pgd_at", "start": "uniform"}, ctx=_ctx())
    want = _official_loop(model, x, y, (x + u * eps_map).clamp(0, 1), eps_map, ALPHA, "ce")
    assert torch.allclose(_run(obj, model, x, y, eps_map, step), want, atol=1e-12, rtol=0)
    # a per-sample ε (PART's warm-up, plain PGD-AT): Madry's and torchattacks' clamped start
    eps = _per_sample([EPS] * 4, x)
    obj = OBJECTIVES.build({"name": "pgd_at"}, ctx=_ctx())
    want = _official_loop(model, x, y, (x + u * EPS).clamp(0, 1), eps, ALPHA, "ce")
    assert torch.allclose(_run(obj, model, x, y, eps, step), want, atol=1e-12, rtol=0)


# ------------------------------------------------------------------ 9: DAFA with W < 0
@pytest.mark.parametrize("mode", ["zero", "official"])
def test_dafa_negative_weight_radius(mode):
    model, (x, y) = _net(), _images()
    pol = POLICIES.build({"name": "dafa", "warmup": 1, "negative_radius": mode}, ctx=_ctx())
    pol.weights = torch.tensor([1.5, 0.8, -0.3], dtype=torch.float64)
    pol.active = True
    w = pol.weights[y]
    scale = pol.eps_scale(y).double()  # float32 values, as the engine uses them
    assert torch.allclose(scale, w if mode == "official" else w.clamp_min(0), atol=1e-7)
    s = scale.view(-1, 1, 1, 1)
    got = _run(OBJECTIVES.build({"name": "trades"}, ctx=_ctx()), model, x, y,
               _per_sample([EPS] * 4, x) * s, _per_sample([ALPHA] * 4, x) * s)
    torch.manual_seed(3)
    w = pol.weights[y].float().double().view(-1, 1, 1, 1)
    official = _official_loop(model, x, y, x + 0.001 * torch.randn_like(x), EPS * w, ALPHA * w,
                              "kl")
    neg = y == 2
    assert torch.allclose(got[~neg], official[~neg], atol=1e-12, rtol=0)
    if mode == "official":  # the degenerate box: x + W·ε, clamped, whatever the gradient
        assert torch.allclose(got[neg], official[neg], atol=1e-12, rtol=0)
        assert torch.allclose(got[neg], (x[neg] + EPS * w[neg]).clamp(0, 1), atol=1e-12, rtol=0)
    else:
        assert torch.equal(got[neg], x[neg])


# ------------------------------------------------------------------ 3, 6: FRL
def test_frl_remargin_step_is_one_step_for_the_batch():
    pol = POLICIES.build({"name": "frl", "mode": "both"}, ctx=_ctx())
    pol.phi[2] = torch.tensor([0.2, 0.0, -0.5], dtype=torch.float64)
    y = torch.tensor([1, 2, 1, 2])  # class 0 (the largest margin) is absent from the batch
    m = pol.eps_scale(y).double().view(-1, 1, 1, 1)
    assert m.flatten().tolist() == pytest.approx([1.0, 0.98, 1.0, 0.98])
    eps, alpha = 8 / 255, 2 / 255
    step = _per_sample([alpha] * 4, m)
    got = pol.attack_step(step, m, eps * m)
    official = torch.max(eps * m) / 4  # frlrmrw: step_size = torch.max(new_eps) / 4
    assert torch.allclose(got, torch.full_like(step, float(official)), atol=1e-15)
    pol = POLICIES.build({"name": "frl", "mode": "both", "remargin_step": "per_sample"},
                         ctx=_ctx())
    assert torch.allclose(pol.attack_step(step, m, eps * m), alpha * m, atol=1e-15)


def test_frl_validation_attack_steps_by_a_quarter_of_eps():
    seen = []
    res = EvalResult(["clean", "pgd20"], torch.ones(2, 3, dtype=torch.bool),
                     torch.zeros(2, 3, dtype=torch.long), torch.arange(3), 3)
    ctx = BuildContext(num_classes=3, in_channels=3, image_size=2, eps=8 / 255)
    pol = POLICIES.build({"name": "frl"}, ctx=ctx)
    pol.on_epoch_end(EpochContext(1, 10, nn.Identity(), 3, CPU,
                                  lambda a: seen.append(a) or res))
    atk = seen[0]
    assert atk.name == "pgd20" and atk.steps == 20
    assert atk.step_size == pytest.approx(2 / 255)  # FRL's configs1: 20 steps of 2/255
    pol = POLICIES.build({"name": "frl", "val_step": None}, ctx=ctx)
    assert pol.validation_attack() == "pgd20"  # the attack's own 2.5·ε/20 = 1/255


# ------------------------------------------------------------------ 4, 10: CFA
def test_cfa_margin_step_and_class_accuracy():
    stats = {"count": torch.tensor([10, 20, 30]), "adv_correct": torch.tensor([5.0, 10.0, 30.0])}
    y = torch.tensor([0, 1, 2])
    step = torch.full((3, 1, 1, 1), ALPHA, dtype=torch.float64)
    for acc, r in (("exact", [0.5, 0.5, 1.0]), ("balanced", [0.25, 0.5, 1.5])):
        pol = POLICIES.build({"name": "cfa", "begin": 1, "fawa": False, "class_accuracy": acc},
                             ctx=_ctx())
        pol.on_epoch_end(EpochContext(1, 10, nn.Identity(), 3, CPU, None, stats))
        # r_k = correct_k/n_k, or CFA's code's C·correct_k/N (3·[5, 10, 30]/60)
        assert pol.robust.tolist() == pytest.approx(r)
        s = pol.eps_scale(y).double().view(-1, 1, 1, 1)
        assert s.flatten().tolist() == pytest.approx([0.5 + v for v in r])  # ε_k = (λ1 + r_k)ε
        assert torch.equal(pol.attack_step(step, s, EPS * s), step)  # fixed α, CFA's code
    pol = POLICIES.build({"name": "cfa", "begin": 1, "fawa": False, "ccm_step": "scaled"},
                         ctx=_ctx())
    pol.on_epoch_end(EpochContext(1, 10, nn.Identity(), 3, CPU, None, stats))
    s = pol.eps_scale(y).double().view(-1, 1, 1, 1)
    assert torch.allclose(pol.attack_step(step, s, EPS * s), ALPHA * s)


def test_cfa_fawa_gate_uses_the_chosen_class_accuracy():
    labels = torch.tensor([0, 0, 1, 1, 1, 1, 1, 1, 2, 2])
    robust = torch.tensor([1, 0, 1, 1, 1, 0, 0, 0, 1, 1], dtype=torch.bool)
    res = EvalResult(["clean", "pgd10"], torch.stack([torch.ones_like(robust), robust]),
                     torch.zeros(2, 10, dtype=torch.long), labels, 3)
    lin = nn.Linear(2, 1)
    # exact: [1/2, 3/6, 2/2], worst 0.5; CFA's code: 3·[1, 3, 2]/10, worst 0.3
    for acc, absorbed in (("exact", 1), ("balanced", 0)):
        pol = POLICIES.build({"name": "cfa", "fawa_threshold": 0.4, "class_accuracy": acc},
                             ctx=_ctx())
        pol.on_epoch_end(EpochContext(1, 10, lin, 3, CPU, lambda a: res, {}))
        assert pol.fawa_updates == absorbed


@pytest.mark.parametrize("ccm_step", ["fixed", "scaled"])
def test_the_engine_gives_the_attack_the_policy_step(tmp_path, ccm_step):
    from robustfair.config import load_config
    from robustfair.engine.trainer import Trainer, prepare_run_dir

    cfg = load_config(recipe="mnist5k-trades", overrides=[
        "data.name=digits", "data.val_size=60", "data.train_limit=64", "data.test_limit=20",
        "model.name=mlp", "model.params={hidden: [8]}", "attack.eps=0.1",
        "attack.step_size=0.03", "attack.steps=1", "method.policy.name=cfa",
        "method.policy.fawa=false", f"method.policy.ccm_step={ccm_step}",
        "logging.progress=false", f"output_dir={tmp_path}"])
    tr = Trainer(cfg, prepare_run_dir(cfg, force=True), quiet=True)
    tr.policy.calibrated = True
    tr.policy.robust = torch.linspace(0.0, 0.9, 10, dtype=torch.float64)
    seen = {}
    forward = tr.objective.forward

    def spy(model, x, y, eps, step):
        seen.update(y=y, eps=eps.flatten(1)[:, 0], step=step.flatten(1)[:, 0])
        return forward(model, x, y, eps, step)

    tr.objective.forward = spy
    tr.train_step(torch.arange(16), tr._new_stats())
    scale = 0.5 + tr.policy.robust[seen["y"]].float()  # λ1 + r_y
    assert torch.allclose(seen["eps"], 0.1 * scale)
    want = torch.full_like(scale, 0.03) if ccm_step == "fixed" else 0.03 * scale
    assert torch.allclose(seen["step"], want)


# ------------------------------------------------------------------ 5: WAT
def test_wat_costs_class_means_and_the_official_divisor(digits):
    total, count = torch.tensor([3.0, 8.0, 1.0]), torch.tensor([3.0, 4.0, 1.0])
    assert class_costs(total, count).tolist() == pytest.approx([1.0, 2.0, 1.0, 1.5])
    # WAT's code: C·Σ_k / (val_iter·batch_size) and Σ / (val_iter·batch_size), here 2 × 5
    got = class_costs(total, count, "official", batches=2, batch_size=5)
    assert got.tolist() == pytest.approx([0.9, 2.4, 0.3, 1.2])
    # the policy: 10 validation images in batches of 4 → 3 batches, divisor 12
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    ctx = BuildContext(num_classes=10, in_channels=1, image_size=8, eps=0.1, step_size=0.03,
                       steps=1, extra={"objective": {"beta": 6.0}})
    val = digits.val.subset(torch.arange(10))
    costs = {}
    for mode in ("class_mean", "official"):
        pol = POLICIES.build({"name": "wat", "batch_size": 4, "cost": mode}, ctx=ctx)
        torch.manual_seed(1)
        costs[mode] = pol.validation_costs(model, val, CPU)
    n = torch.bincount(val.y, minlength=10).double()
    means = costs["class_mean"][:-1]
    want = torch.where(n > 0, 10 * means * n / 12, torch.zeros_like(n))
    assert torch.allclose(costs["official"][:-1], want, atol=1e-9)
    assert float(costs["official"][-1]) == pytest.approx(float(costs["class_mean"][-1]) * 10 / 12)


# ------------------------------------------------------------------ 7: FairBatch timing
def _group_data() -> ArrayData:
    counts = {(0, 0): 30, (0, 1): 10, (1, 0): 12, (1, 1): 28}
    y = torch.tensor([c[0] for c, n in counts.items() for _ in range(n)])
    z = torch.tensor([c[1] for c, n in counts.items() for _ in range(n)])
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (len(y), 1, 2, 2), generator=g, dtype=torch.uint8)
    return ArrayData(x, y, z, torch.zeros_like(y))


def _fairbatch(**params):
    data = _group_data()
    ctx = BuildContext(num_classes=2, in_channels=1, image_size=2, num_groups=2)
    return SAMPLERS.build({"name": "fairbatch", "alpha": 0.05, **params}, data=data,
                          batch_size=20, seed=0, ctx=ctx)


def test_fairbatch_updates_before_each_epoch_from_the_untrained_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    fb = _fairbatch()
    lam0 = fb.lam.clone()
    with torch.no_grad():
        loss = F.cross_entropy(model(fb.data.images()), fb.y, reduction="none")
    L = torch.tensor([[float(loss[(fb.y == a) & (fb.z == b)].mean()) for b in (0, 1)]
                      for a in (0, 1)])
    # the official eqodds rule: the label with the larger gap moves α toward its worse group
    yy = int((L[1, 1] - L[1, 0]).abs() > (L[0, 1] - L[0, 0]).abs())
    up = int(L[yy, 1] > L[yy, 0])
    want = lam0.clone()
    want[yy, up] += 0.05
    want[yy, 1 - up] -= 0.05
    fb.epoch_batches(1)
    fb.on_epoch_start(1, model)  # before the first batch of the run
    assert fb.updates == 1 and torch.allclose(fb.lam, want)
    fb.on_epoch_start(1, model)  # a run resumed in epoch 1: no second update
    fb.on_epoch_end(SimpleNamespace(model=model))
    assert fb.updates == 1
    fb.epoch_batches(2)
    fb.on_epoch_start(2, model)
    assert fb.updates == 2
    late = _fairbatch(timing="end")  # robustfair's former timing, one step behind
    late.epoch_batches(1)
    late.on_epoch_start(1, model)
    assert late.updates == 0 and torch.equal(late.lam, lam0)
    late.on_epoch_end(SimpleNamespace(model=model))
    assert late.updates == 1 and torch.allclose(late.lam, want)


# ------------------------------------------------------------------ 8: Dr-Fairness BN
@pytest.mark.parametrize("freeze", [False, True])
def test_drfairness_freeze_bn_holds_from_before_the_first_step(freeze):
    train = _group_data()
    gen = ArrayData(train.x, train.y, train.group, torch.ones_like(train.y))
    val = ArrayData(train.x, train.y, train.group, torch.zeros_like(train.y))
    bundle = DataBundle("toy", train.concat(gen), val, val, 2, (0.5,), (0.5,), "none",
                        ["a", "b"], ["g0", "g1"], {"gen_val": gen})
    ctx = BuildContext(num_classes=2, in_channels=1, image_size=2, num_groups=2,
                       extra={"data": bundle})
    dr = SAMPLERS.build({"name": "drfairness", "probe": 32, "freeze_bn": freeze},
                        data=bundle.train, batch_size=16, seed=0, ctx=ctx)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 2))
    model.train()
    dr.epoch_batches(1)
    dr.on_epoch_start(1, model)
    assert dr.updates == 0
    model.train()  # the engine's train step
    before = model[2].running_mean.clone()
    model(torch.randn(8, 1, 2, 2))  # the first training step's forward
    assert model[2].training is not freeze
    assert torch.equal(model[2].running_mean, before) is freeze


# ------------------------------------------------------------------ 12: DKL / IKL in float64
@pytest.mark.parametrize("name", ["ikl", "dkl"])
def test_dkl_trains_in_float64(name):
    model, (x, y) = _net(), _images()
    obj = OBJECTIVES.build({"name": name, "weights": "classwise"}, ctx=_ctx()).double()
    obj.train()
    eps, step = _per_sample([EPS] * 4, x), _per_sample([ALPHA] * 4, x)
    obj.on_epoch_start(1)
    out = obj(model, x, y, eps, step)
    assert all(t.dtype == torch.float64 for t in out.terms.values())
    obj.on_epoch_start(2)
    with torch.no_grad():
        p = F.softmax(model(x) / 4.0, 1)
    for c in range(3):  # s_y: the class mean of softmax(z_n / T) over epoch 1
        assert torch.allclose(obj.class_weights[c], p[y == c].mean(0), atol=1e-12)
    out = obj(model, x, y, eps, step)
    assert bool(torch.isfinite(out.total()).all())


# ------------------------------------------------------------------ docs/fidelity.md
FIDELITY = Path(__file__).resolve().parents[1] / "docs" / "fidelity.md"
NEEDED = {
    "method.objective.start", "method.policy.remargin_step", "method.policy.val_step",
    "method.policy.ccm_step", "method.policy.class_accuracy", "method.policy.cost",
    "method.policy.negative_radius", "method.sampler.timing", "method.sampler.freeze_bn",
    "method.budget.mask_source", "study.train.accumulate_attack_grads",
}


def _settings() -> list[str]:
    rows = [ln for ln in FIDELITY.read_text(encoding="utf-8").splitlines() if ln.startswith("|")]
    assert len(rows) > 20
    spans = re.findall(r"`([^`]+)`", "\n".join(rows))
    return [s for s in spans if re.fullmatch(r"[a-z_]+(\.[a-z_0-9]+)+=\S+", s)]


def _valid_for_some_member(part: str, field: str, value) -> bool:
    from robustfair.budgets import BUDGETS
    from robustfair.objectives import OBJECTIVES as objectives
    from robustfair.policies import POLICIES as policies
    from robustfair.samplers import SAMPLERS as samplers

    reg = {"objective": objectives, "budget": BUDGETS, "policy": policies,
           "sampler": samplers}[part]
    for name in reg.names():
        model = reg.params_model(name)
        if field in model.model_fields:
            try:
                model(**{field: value})
                return True
            except Exception:  # noqa: BLE001 - another member may accept it
                continue
    return False


def test_every_setting_in_the_fidelity_table_exists():
    from robustfair.studies.disparity import DisparityStudyConfig

    settings = _settings()
    named = {s.partition("=")[0] for s in settings}
    assert NEEDED <= named, f"docs/fidelity.md does not name {sorted(NEEDED - named)}"
    for s in settings:
        key, _, raw = s.partition("=")
        value = yaml.safe_load(raw)
        parts = key.split(".")
        if parts[0] == "study":
            d: dict = {"eps": {"l2": [1.0], "linf": [0.1]}}
            node = d
            for p in parts[1:-1]:
                node = node.setdefault(p, {})
            node[parts[-1]] = value
            DisparityStudyConfig(**d)
        elif parts[0] == "method" and parts[2:] == ["name"]:
            build_config({"name": "x", "method": {parts[1]: {"name": value}}})
        elif parts[0] == "method":
            assert len(parts) == 3, s
            assert _valid_for_some_member(parts[1], parts[2], value), s
        else:
            raw_cfg: dict = {"name": "x"}
            apply_override(raw_cfg, s)
            build_config(raw_cfg)

