"""FairBatch and Dr-Fairness samplers: the FairBatch update against a hand computation, the
closed-form Dr-Fairness hypergradient against autograd, batch composition against λ and μ,
exact resume, and short training runs through the engine (standard and TRADES)."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robustfair.config import RunConfig
from robustfair.data import ArrayData, DataBundle
from robustfair.engine.io import load_checkpoint
from robustfair.engine.trainer import Trainer
from robustfair.objectives import BuildContext
from robustfair.samplers import SAMPLERS
from robustfair.samplers.drfairness import hypergradient, last_linear, outer_objective
from robustfair.samplers.fairbatch import FairBatch


def _cells(counts: dict[tuple[int, int, int], int], shape=(1, 2, 2)) -> ArrayData:
    ys, zs, ss = [], [], []
    for (y, z, s), n in counts.items():
        ys += [y] * n
        zs += [z] * n
        ss += [s] * n
    n = len(ys)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, *shape), generator=g, dtype=torch.uint8)
    return ArrayData(x, torch.tensor(ys), torch.tensor(zs), torch.tensor(ss))


def _bundle(train: ArrayData, val: ArrayData, gen_val: ArrayData | None) -> DataBundle:
    extra = {"gen_val": gen_val} if gen_val is not None else {}
    return DataBundle("toy", train, val, val, 2, (0.5,), (0.5,), "none", ["a", "b"],
                      ["g0", "g1"], extra)


def _ctx(bundle: DataBundle) -> BuildContext:
    return BuildContext(num_classes=2, in_channels=1, image_size=2, num_groups=2,
                        extra={"data": bundle})


def _fairbatch(fairness: str, alpha: float = 0.05, counts=None) -> FairBatch:
    counts = counts or {(0, 0, 0): 60, (0, 1, 0): 20, (1, 0, 0): 30, (1, 1, 0): 90}
    data = _cells(counts)
    return SAMPLERS.build({"name": "fairbatch", "fairness": fairness, "alpha": alpha},
                          data=data, batch_size=40, seed=0, ctx=_ctx(_bundle(data, data, None)))


# ---------------------------------------------------------------------------- FairBatch


def test_fairbatch_starts_at_the_natural_mix_and_sizes_batches_by_lambda() -> None:
    fb = _fairbatch("eqodds")
    assert fb.lam.tolist() == [pytest.approx([0.75, 0.25]), pytest.approx([0.25, 0.75])]
    # S_y = B·N_y/N = 40·80/200 = 16 and 40·120/200 = 24
    assert fb.S.tolist() == pytest.approx([16.0, 24.0])
    fb.lam = torch.tensor([[0.5, 0.5], [0.9, 0.1]], dtype=torch.float64)
    batch = fb.epoch_batches(1)[0]
    y, z = fb.y[batch], fb.z[batch]
    got = torch.bincount(y * 2 + z, minlength=4).tolist()
    assert got == [8, 8, round(0.9 * 24), round(0.1 * 24)]


def test_fairbatch_update_equals_hand_computation() -> None:
    a = 0.05
    L = torch.tensor([[0.2, 0.5], [0.3, 0.35]], dtype=torch.float64)
    # eqodds: label 0 has the larger gap (0.3 > 0.05); it moves toward its higher-loss group 1
    fb = _fairbatch("eqodds", a)
    fb.apply_update(L)
    assert fb.lam.tolist() == [pytest.approx([0.75 - a, 0.25 + a]), pytest.approx([0.25, 0.75])]
    # eqopp: only the positive label 1, toward its higher-loss group 1
    fb = _fairbatch("eqopp", a)
    fb.apply_update(L)
    assert fb.lam.tolist() == [pytest.approx([0.75, 0.25]), pytest.approx([0.25 - a, 0.75 + a])]
    # dp: label 0 has the larger gap and is not the positive label: toward the LOWER loss group
    fb = _fairbatch("dp", a)
    fb.apply_update(L)
    assert fb.lam.tolist() == [pytest.approx([0.75 + a, 0.25 - a]), pytest.approx([0.25, 0.75])]
    # λ stays in [0, 1]
    fb = _fairbatch("eqopp", 0.5)
    fb.apply_update(L)
    assert fb.lam[1].tolist() == pytest.approx([0.0, 1.0])


@pytest.mark.numeric
def test_fairbatch_cell_losses_by_hand() -> None:
    fb = _fairbatch("eqodds")
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    x = fb.data.images().flatten(1)
    with torch.no_grad():
        loss = F.cross_entropy(model(x), fb.y, reduction="none")
        loss_pos = F.cross_entropy(model(x), torch.ones_like(fb.y), reduction="none")
    L = fb.cell_losses(model)
    for y, z in itertools.product(range(2), range(2)):
        m = (fb.y == y) & (fb.z == z)
        # tolerance: FP32_BATCH_MEAN: fp32 cell means summed in two orders
        assert float(L[y, z]) == pytest.approx(float(loss[m].mean()), rel=1e-5)
    fb_dp = _fairbatch("dp")
    L = fb_dp.cell_losses(model)
    for y, z in itertools.product(range(2), range(2)):
        m = (fb.y == y) & (fb.z == z)
        # FairBatch's dp: the cell's sum divided by the size of the GROUP
        assert float(L[y, z]) == pytest.approx(float(loss_pos[m].sum() / (fb.z == z).sum()),
                                               rel=1e-5)


# ---------------------------------------------------------------------------- Dr-Fairness


class Tiny(nn.Module):
    def __init__(self, d_in: int, d_h: int, c: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(d_in, d_h), nn.Tanh())
        self.fc = nn.Linear(d_h, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x))


def _autograd_hypergradient(model, xr, yr, zr, xg, yg, zg, phi, psi, fairness, k, pos):
    C, G = phi.shape
    w = [model.fc.weight, model.fc.bias]
    lam, mu = torch.softmax(phi, 1), torch.sigmoid(psi)

    def cell(x, y, z):
        loss = F.cross_entropy(model(x), y, reduction="none")
        return torch.stack([torch.stack([loss[(y == a) & (z == b)].mean() for b in range(G)])
                            for a in range(C)])

    outer, _ = outer_objective(model(xr), yr, zr, C, G, fairness, k, pos)
    v = torch.autograd.grad(outer, w)
    lr_, lg_ = cell(xr, yr, zr), cell(xg, yg, zg)
    n_y = torch.bincount(yr, minlength=C).double()[:, None]
    inner = (n_y * (lam * mu * lr_ + lam * (1 - mu) * lg_)).sum() / len(yr)
    gw = torch.autograd.grad(inner, w, create_graph=True)
    dot = sum((a * b).sum() for a, b in zip(gw, v, strict=True))
    g_phi, g_psi = torch.autograd.grad(dot, [phi, psi])
    return -g_phi, -g_psi


@pytest.mark.numeric
@pytest.mark.parametrize("fairness", ["eqodds", "eqopp", "dp"])
@pytest.mark.parametrize("C,G", [(2, 2), (3, 3)])
def test_drfairness_hypergradient_equals_autograd(fairness: str, C: int, G: int) -> None:
    torch.manual_seed(0)
    model = Tiny(5, 7, C).double()
    n = 60
    keys = torch.arange(n) % (C * G)
    yr, zr = keys // G, keys % G
    yg, zg = yr.clone(), zr.clone()
    xr, xg = torch.randn(n, 5, dtype=torch.float64), torch.randn(n, 5, dtype=torch.float64)
    phi = torch.randn(C, G, dtype=torch.float64, requires_grad=True)
    psi = torch.randn(C, G, dtype=torch.float64, requires_grad=True)
    want_phi, want_psi = _autograd_hypergradient(model, xr, yr, zr, xg, yg, zg, phi, psi,
                                                 fairness, 3.0, 1)
    with torch.no_grad():
        hr, hg = model.body(xr), model.body(xg)
        real = (hr, model.fc(hr), yr, zr)
        gen = (hg, model.fc(hg), yg, zg)
    g_phi, g_psi, _ = hypergradient(real, gen, torch.softmax(phi, 1).detach(),
                                    torch.sigmoid(psi).detach(), fairness, 3.0, 1)
    # tolerance: float64 hypergradient against autograd through fp32 features: rtol 1e-6 for the fp32
    #   features, atol below the 1e-4 size the next line requires
    assert torch.allclose(g_phi, want_phi, atol=1e-9, rtol=1e-6)
    assert torch.allclose(g_psi, want_psi, atol=1e-9, rtol=1e-6)
    assert float(g_phi.abs().max()) > 1e-4 and float(g_psi.abs().max()) > 1e-4


def test_mislabelled_generated_data_pushes_mu_toward_real_data() -> None:
    torch.manual_seed(1)
    model = Tiny(5, 7, 2).double()
    n = 80
    keys = torch.arange(n) % 4
    y, z = keys // 2, keys % 2
    x = torch.randn(n, 5, dtype=torch.float64) + (2.0 * y - 1)[:, None]  # separable by label
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(30):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    with torch.no_grad():
        h = model.body(x)
        real = (h, model.fc(h), y, z)
        gen = (h, model.fc(h), 1 - y, z)  # the same images with the wrong labels
    lam = torch.full((2, 2), 0.5, dtype=torch.float64)
    mu = torch.full((2, 2), 0.5, dtype=torch.float64)
    _, g_psi, _ = hypergradient(real, gen, lam, mu, "eqodds", 20.0, 1)
    assert bool((g_psi < 0).all())  # descent raises ψ, i.e. μ → more real data


def _dr_setup(C: int = 2, G: int = 2, seed: int = 0):
    counts = {}
    for y, z in itertools.product(range(C), range(G)):
        counts[(y, z, 0)] = 40 if (y + z) % 2 == 0 else 8
        counts[(y, z, 1)] = 30
    train = _cells(counts)
    val = _cells({(y, z, 0): 20 for y, z in itertools.product(range(C), range(G))})
    gen_val = _cells({(y, z, 1): 20 for y, z in itertools.product(range(C), range(G))})
    bundle = _bundle(train, val, gen_val)
    return train, bundle


def _dr(params: dict | None = None, seed: int = 0):
    train, bundle = _dr_setup()
    spec = {"name": "drfairness", "probe": 32, "lr": 0.05, **(params or {})}
    return SAMPLERS.build(spec, data=train, batch_size=32, seed=seed, ctx=_ctx(bundle))


def test_drfairness_batch_composition_follows_lambda_and_mu() -> None:
    dr = _dr()
    dr.lam = torch.tensor([[0.3, 0.7], [0.6, 0.4]], dtype=torch.float64)
    dr.mu = torch.tensor([[0.25, 0.5], [1.0, 0.1]], dtype=torch.float64)
    batches = dr.epoch_batches(1)
    b = batches[0]
    got = torch.bincount(dr.y[b] * 4 + dr.z[b] * 2 + dr.s[b], minlength=8)
    for y, z in itertools.product(range(2), range(2)):
        share = float(dr.lam[y, z] * dr.S[y])
        assert int(got[y * 4 + z * 2]) == round(share * float(dr.mu[y, z]))
        assert int(got[y * 4 + z * 2 + 1]) == round(share * (1 - float(dr.mu[y, z])))
    # per-cell streams are without replacement within a pass over the cell
    seen = torch.cat([batches[k] for k in range(len(batches))])
    cell = (dr.y[seen] == 0) & (dr.z[seen] == 1) & (dr.s[seen] == 1)
    first = seen[cell][:30]
    assert len(first.unique()) == len(first)


def test_drfairness_starts_at_the_natural_mix_and_needs_generated_data() -> None:
    dr = _dr()
    assert dr.lam.tolist() == [pytest.approx([40 / 48, 8 / 48]), pytest.approx([8 / 48, 40 / 48])]
    assert dr.mu.tolist() == [[0.5, 0.5], [0.5, 0.5]]
    train, bundle = _dr_setup()
    bundle.extra.pop("gen_val")
    from robustfair.errors import UserError

    with pytest.raises(UserError, match="generated"):
        SAMPLERS.build({"name": "drfairness"}, data=train, batch_size=32, seed=0,
                       ctx=_ctx(bundle))


def test_drfairness_updates_from_the_first_step_and_resumes_exactly() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 6), nn.ReLU(), nn.BatchNorm1d(6),
                          nn.Linear(6, 2))
    assert last_linear(model) is model[-1]
    a = _dr({"steps_per_epoch": 6})
    lam0 = a.lam.clone()
    batches = a.epoch_batches(1)
    drawn = [batches[0]]
    model.train()
    a.on_step(1, model)
    assert not torch.allclose(a.lam, lam0) and a.updates == 1  # the first update is real
    assert model.training and model[3].training  # BatchNorm back in train mode
    drawn.append(batches[1])
    a.on_step(2, model)
    state = a.state_dict()
    b = _dr({"steps_per_epoch": 6})
    b.load_state_dict(state)
    rest_b = b.epoch_batches(1)
    for k in (2, 3):
        ba, bb = batches[k], rest_b[k]
        assert torch.equal(ba, bb)
        a.on_step(k + 1, model)
        b.on_step(k + 1, model)
        assert torch.allclose(a.lam, b.lam) and torch.allclose(a.mu, b.mu)
    log = a.log()
    assert len(log["history"]) == 4 and {"lambda", "mu", "gap"} <= set(log["history"][-1])


def test_freeze_bn_keeps_the_model_in_eval_mode_like_the_official_code() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 2))
    dr = _dr({"freeze_bn": True})
    model.train()
    dr.on_step(1, model)
    model.train()  # the engine sets train mode before each step ...
    running = model[2].running_mean.clone()
    model(torch.randn(8, 1, 2, 2))
    assert not model[2].training  # ... but the BatchNorm stays frozen
    assert torch.equal(model[2].running_mean, running)


# ---------------------------------------------------------------------------- in the engine


@pytest.fixture(scope="module")
def group_digits(digits) -> DataBundle:
    """digits with label = (digit ≥ 5), a skewed inverted-look group, and generated data."""
    from robustfair.data.group_benchmark import apply_group_look, assign_groups
    from robustfair.generate import generated_for

    def build(d: ArrayData, minority: float, salt: int, n: int) -> ArrayData:
        d = d.subset(torch.arange(min(n, len(d))))
        y = (d.y >= 5).long()
        z = assign_groups(y, minority, salt)
        return ArrayData(apply_group_look(d.x, z, "invert"), y, z, torch.zeros_like(y))

    train, val, test = (build(digits.train, 0.15, 1, 400), build(digits.val, 0.3, 2, 150),
                        build(digits.test, 0.5, 3, 120))
    gen = generated_for(train, 2, 2, 30, 1.0, components=16, modes=2)
    tr = torch.arange(len(gen)) % 5 != 0
    return DataBundle("digits-groups", train.concat(gen.subset(torch.nonzero(tr).flatten())),
                      val, test, 2, (0.5,), (0.5,), "none", ["small", "large"],
                      ["plain", "inverted"],
                      {"gen_val": gen.subset(torch.nonzero(~tr).flatten())})


@pytest.mark.parametrize("objective,sampler", [
    ("trades", {"name": "drfairness", "probe": 48, "steps_per_epoch": 4, "lr": 0.05,
                "probe_attack": "pgd2"}),
    ("standard", {"name": "fairbatch", "update_every": 2, "alpha": 0.05}),
])
def test_group_samplers_train_through_the_engine(group_digits, tmp_path, objective: str,
                                                 sampler: dict) -> None:
    cfg = RunConfig(
        name="g", data={"name": "digits"}, model={"name": "mlp", "params": {"hidden": [16]}},
        method={"objective": {"name": objective}, "sampler": sampler},
        attack={"eps": 0.1, "step_size": 0.05, "steps": 2},
        train={"epochs": 1, "batch_size": 32, "optimizer": {"name": "adam", "lr": 1e-3}},
        validation={"every": 1, "n": 100}, eval={"attacks": ["clean", "pgd5"]},
        logging={"progress": False})
    run = tmp_path / "run"
    run.mkdir()
    tr = Trainer(cfg, run, data=group_digits, quiet=True)
    tr.fit()
    line = json.loads((run / "log.jsonl").read_text().splitlines()[-1])
    hist = line["sampler"]["history"]
    if sampler["name"] == "drfairness":
        assert len(hist) == 4 and "mu" in hist[0]  # one update per step, every one logged
    else:
        # one update before the first step (official timing), then one every 2 of the 12 steps
        assert len(hist) == 7 and "lambda" in hist[0] and hist[0]["step"] == 0
    st = load_checkpoint(run / "checkpoints" / "last.pt")["sampler"]
    assert "lambda" in st or "phi" in st
    summary = tr.final_eval(progress=False)
    g = summary["groups"]
    assert g["names"] == ["plain", "inverted"]
    assert set(g["attacks"]) == {"clean", "pgd5"}
    assert 0.0 <= g["attacks"]["clean"]["eqodds_diff"] <= 1.0
