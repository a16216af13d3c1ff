"""PART: the pixel budget in training (ε_low = ε equals the base method), the ε map respected at
every attack step, warm-up and state, the stale mask source, MMA, the recipes, Tiny-ImageNet."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from robustfair.attacks import ATTACKS, build_attack
from robustfair.budgets import BUDGETS
from robustfair.budgets.pixel import Pixel, PixelParams
from robustfair.config import DataConfig, load_config
from robustfair.data import load_data
from robustfair.engine.trainer import Trainer, prepare_run_dir
from robustfair.errors import UserError
from robustfair.objectives import BuildContext


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def cnn(one_thread, digits):
    """A SmallCNN trained normally on digits for a few epochs."""
    from conftest import train_quick
    from robustfair.models import build_model

    torch.manual_seed(0)
    m = build_model("smallcnn", 1, 10, 8, digits.mean, digits.std, dropout=0.0)
    return train_quick(m, digits, epochs=8)


QUICK = [
    "data.name=digits", "data.train_limit=128", "data.val_size=0", "model.params.width=0.5",
    "attack.eps=0.2", "attack.step_size=0.05", "attack.steps=2", "train.epochs=2",
    "train.batch_size=64", "validation.every=0", "device=cpu", "logging.progress=false",
]


def quick_trainer(tmp_path, recipe: str, extra: list[str]) -> Trainer:
    cfg = load_config(None, recipe, QUICK + extra + [f"output_dir={tmp_path}"])
    return Trainer(cfg, prepare_run_dir(cfg), quiet=True)


def weights_of(t: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in t.model.state_dict().items()}


@pytest.mark.parametrize("base,part", [("at-mnist5k-part", "part-mnist5k"),
                                       ("trades-mnist5k-part", "part-t-mnist5k"),
                                       ("mart-mnist5k-part", "part-m-mnist5k")])
def test_eps_low_equal_eps_reproduces_the_base_method(tmp_path, base, part):
    """With ε_low = ε the CAM pass must leave no trace (RNG, BN statistics, gradients): the
    weights after training equal the base method's bit for bit; with ε_low < ε they differ."""
    a = quick_trainer(tmp_path / "a", base, [])
    a.fit()
    # PART's official start (x + U(−ε, ε), not clamped) differs from AT's clamped one by design;
    # with AT's start the CAM pass must change nothing
    start = ["method.objective.start=uniform"] if part == "part-mnist5k" else []
    b = quick_trainer(tmp_path / "b", part, ["method.budget.warmup=0",
                                             "method.budget.eps_low=0.2", *start])
    b.fit()
    wa, wb = weights_of(a), weights_of(b)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    if part == "part-mnist5k":
        c = quick_trainer(tmp_path / "c", part, ["method.budget.warmup=0",
                                                 "method.budget.eps_low=0.1"])
        c.fit()
        wc = weights_of(c)
        assert not all(torch.equal(wa[k], wc[k]) for k in wa)


class Recorder(nn.Module):
    """Records every input the attack feeds the model."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.seen: list[torch.Tensor] = []

    def forward(self, x):
        self.seen.append(x.detach().clone())
        return self.model(x)


@pytest.mark.numeric
@pytest.mark.parametrize("spec", ["pgd10", "trades-kl10", "mma5"])
def test_eps_map_respected_after_every_step(cnn, digits, spec):
    x, y = digits.test.images()[:32], digits.test.y[:32]
    budget = BUDGETS.build({"name": "pixel", "eps_low": 0.05, "mask": "jet"})
    budget.on_epoch_start(1, cnn)
    eps_map = budget(cnn, x, y, 0.15)
    assert eps_map.shape == x.shape
    levels = torch.unique(eps_map)
    assert len(levels) > 2, "grey images: the mean of the 3 jet channel masks gives thirds"
    assert levels.min() == pytest.approx(0.05) and levels.max() == pytest.approx(0.15)
    rec = Recorder(cnn)
    x_adv = build_attack(spec, "linf", step_size=0.04)(rec, x, y, eps_map)
    tol = 1e-6
    assert ((x_adv - x).abs() <= eps_map + tol).all()
    iterates = [s for s in rec.seen if s.shape == x.shape]
    if spec.startswith("mma"):  # the k targets are stacked along the batch
        iterates = [c for s in rec.seen for c in s.split(len(x)) if s.shape[0] > len(x)]
    assert len(iterates) >= 5
    if spec.startswith("trades-kl"):  # iterates[0] is x; [1] the official raw start x + 0.001·N
        start = iterates.pop(1)
        assert 0 < float((start - x).abs().max()) < 0.01
    for s in iterates:
        assert ((s - x).abs() <= eps_map + tol).all()
        assert s.min() >= 0 and s.max() <= 1
    # the full-ε entries are used beyond ε_low
    assert ((x_adv - x).abs()[eps_map > 0.149] > 0.051).any()


def test_warmup_state_and_errors(cnn, digits):
    x, y = digits.test.images()[:8], digits.test.y[:8]
    b = Pixel(PixelParams(eps_low="1/20", warmup=2))
    assert b.eps_low == pytest.approx(0.05)
    for epoch in (1, 2):
        b.on_epoch_start(epoch, cnn)
        e = b(cnn, x, y, 0.1)
        assert e.shape == (8, 1, 1, 1) and torch.all(e == 0.1)
    b.on_epoch_start(3, cnn)
    e = b(cnn, x, y, 0.1)
    assert e.shape == x.shape and e.min() >= 0.05 - 1e-7 and e.max() <= 0.1 + 1e-7
    b2 = Pixel(PixelParams(eps_low=0.05, warmup=2))
    b2.load_state_dict(b.state_dict())
    assert b2.active and torch.equal(b2(cnn, x, y, 0.1), e)
    ctx = BuildContext(num_classes=10, in_channels=1, image_size=8, eps=0.1)
    with pytest.raises(UserError, match="eps_low"):
        Pixel(PixelParams(eps_low=0.2), ctx=ctx)
    ctx.norm = "l2"
    with pytest.raises(UserError, match="linf"):
        Pixel(PixelParams(eps_low=0.05), ctx=ctx)
    sb = Pixel(PixelParams(mask_source="stale"))
    sb.on_epoch_start(1, cnn)
    with pytest.raises(UserError, match="stale"):
        sb(cnn, x, y, 0.1)


def test_stale_masks_come_from_other_images_and_resume_exactly(cnn, digits):
    ctx = BuildContext(num_classes=10, in_channels=1, image_size=8, eps=0.15,
                       extra={"data": digits, "seed": 3})
    params = PixelParams(eps_low=0.05, mask_source="stale", mask="threshold")
    x, y = digits.train.images()[:16], digits.train.y[:16]
    stale = Pixel(params, ctx)
    stale.on_epoch_start(1, cnn)
    first = stale(cnn, x, y, 0.15)
    state = stale.state_dict()
    second = stale(cnn, x, y, 0.15)
    assert state == {"epoch": 1, "offset": 16}
    assert not torch.equal(first, second), "consecutive batches must get other images' masks"
    own = Pixel(PixelParams(eps_low=0.05, mask="threshold"), ctx).eps_map(cnn, x, 0.15)
    assert not torch.equal(first, own)
    resumed = Pixel(params, ctx)
    resumed.load_state_dict(state)
    resumed.on_epoch_start(1, cnn)  # the trainer calls it again on resume
    assert torch.equal(resumed(cnn, x, y, 0.15), second)
    resumed.on_epoch_start(2, cnn)
    assert resumed.state_dict() == {"epoch": 2, "offset": 0}


def test_stale_mode_trains_and_checkpoints(tmp_path):
    t = quick_trainer(tmp_path, "part-mnist5k", ["method.budget.warmup=1",
                                                 "method.budget.mask_source=stale",
                                                 "train.epochs=2"])
    t.fit()
    st = torch.load(tmp_path / t.cfg.name / "checkpoints" / "last.pt", weights_only=True)
    assert st["budget"] == {"epoch": 2, "offset": 128}


# ---------------------------------------------------------------------------- MMA


@pytest.mark.numeric
def test_mma_is_registered_and_solves_a_linear_model_exactly():
    """On a linear model the targeted margin z_t − z_y is maximised at x + ε·sign(w_t − w_y);
    MMA over all wrong classes must reach max_t of that closed form."""
    assert "mma" in ATTACKS
    torch.manual_seed(0)
    lin = nn.Sequential(nn.Flatten(), nn.Linear(12, 5))
    x = 0.3 + 0.4 * torch.rand(6, 3, 2, 2)  # far from the [0, 1] box walls
    y = torch.randint(0, 5, (6,))
    eps = 0.05
    x_adv = build_attack("mma30", "linf", k=4)(lin, x, y, eps)
    w, b = lin[1].weight.detach(), lin[1].bias.detach()
    flat = x.flatten(1)
    best = torch.full((6,), -1e9)
    for t in range(5):
        d = w[t] - w[y]
        m = (d * flat).sum(1) + eps * d.abs().sum(1) + b[t] - b[y]
        best = torch.where(t != y, torch.maximum(best, m), best)
    z = lin(x_adv).detach()
    margins = z - z.gather(1, y[:, None])
    margins[torch.arange(6), y] = -1e9
    # tolerance: fp32 margins of order 10 over 16 pixels by matmul and by hand: 16·u·Σ|terms| ≈ 1e-5,
    #   and ε steps of 1e-5
    torch.testing.assert_close(margins.amax(1), best, atol=1e-4, rtol=1e-4)


def test_mma_at_least_as_strong_as_its_top_target_only(cnn, digits):
    x, y = digits.test.images()[:64], digits.test.y[:64]
    acc = {}
    for k in (1, 3):
        torch.manual_seed(0)
        x_adv = build_attack("mma10", "linf", k=k)(cnn, x, y, 0.1)
        acc[k] = float((cnn(x_adv).argmax(1) == y).float().mean())
    clean = float((cnn(x).argmax(1) == y).float().mean())
    assert acc[3] <= acc[1] <= clean
    assert acc[3] < clean - 0.1


# ---------------------------------------------------------------------------- recipes and data


DATASETS_PAPER = ("cifar10", "svhn", "tiny-imagenet")
BASES = {"part": ("pgd_at", "at"), "part-t": ("trades", "trades"), "part-m": ("mart", "mart")}


@pytest.mark.parametrize("data", DATASETS_PAPER)
@pytest.mark.parametrize("method", list(BASES))
def test_paper_recipes(method, data):
    cfg = load_config(None, f"{method}-{data}", [])
    objective, base_prefix = BASES[method]
    assert cfg.method.objective["name"] == objective
    bud = cfg.method.budget
    assert bud["name"] == "pixel" and bud["warmup"] == 20 and bud["cam"] == "gradcam"
    assert bud["eps_low"] == pytest.approx(7 / 255) and cfg.attack.eps == pytest.approx(8 / 255)
    assert bud["mask"] == "jet" and bud["mask_source"] == "current"
    assert cfg.train.epochs == 80 and cfg.train.optimizer.lr == 0.01
    assert cfg.train.optimizer.momentum == 0.9 and cfg.train.batch_size == 128
    assert cfg.eval.eps == pytest.approx(8 / 255)
    assert cfg.eval.attacks == ["clean", "pgd20", "mma20", "autoattack"]
    svhn = data == "svhn"
    assert cfg.train.optimizer.weight_decay == (0.0035 if svhn else 2e-4)
    assert cfg.attack.step_size == pytest.approx((1 if svhn else 2) / 255)
    assert cfg.data.name == data
    plain = load_config(None, f"{base_prefix}-{data}-part", [])
    assert plain.method.budget["name"] == "uniform"
    assert plain.model_dump()["train"] == cfg.model_dump()["train"]
    assert plain.model_dump()["eval"] == cfg.model_dump()["eval"]


def write_tiny_imagenet(root, wnids=("n01443537", "n01629819", "n01641577"), per_class=4,
                        n_val=6):
    from PIL import Image

    folder = root / "tiny-imagenet-200"
    (folder / "val" / "images").mkdir(parents=True)
    (folder / "wnids.txt").write_text("\n".join(wnids) + "\n")
    (folder / "words.txt").write_text("n01443537\tgoldfish, Carassius auratus\n")
    rng = np.random.default_rng(0)
    for i, w in enumerate(wnids):
        d = folder / "train" / w / "images"
        d.mkdir(parents=True)
        for j in range(per_class):
            arr = np.full((64, 64, 3), 40 * i + j, dtype=np.uint8)
            mode = "L" if j == 0 else "RGB"  # Tiny-ImageNet has a few greyscale JPEGs
            img = Image.fromarray(arr[..., 0] if mode == "L" else arr)
            img.save(d / f"{w}_{j}.JPEG", quality=95)
    lines = []
    for k in range(n_val):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(
            folder / "val" / "images" / f"val_{k}.JPEG")
        lines.append(f"val_{k}.JPEG\t{wnids[k % len(wnids)]}\t0\t0\t63\t63")
    (folder / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return folder


def test_tiny_imagenet_folder_loads(tmp_path):
    write_tiny_imagenet(tmp_path)
    for root in (tmp_path, tmp_path / "tiny-imagenet-200"):
        d = load_data(DataConfig(name="tiny-imagenet", root=str(root), val_size=0))
        assert d.num_classes == 3 and d.input_shape == (3, 64, 64)
        assert len(d.train) == 12 and len(d.test) == 6 and len(d.val) == 0
        assert d.train.y.tolist() == [0] * 4 + [1] * 4 + [2] * 4
        assert d.test.y.tolist() == [0, 1, 2, 0, 1, 2]
        assert d.class_names == ["goldfish", "n01629819", "n01641577"]
        assert d.augment == "crop_flip"
        img = d.train.images(torch.tensor([5]))
        assert abs(float(img.mean()) - 41 / 255) < 3 / 255  # JPEG of a flat colour
    d = load_data(DataConfig(name="tiny-imagenet", root=str(tmp_path), val_size=0,
                             params={"cache": True}))
    assert (tmp_path / "tiny-imagenet-200" / "robustfair_cache.npz").is_file()
    again = load_data(DataConfig(name="tiny-imagenet", root=str(tmp_path), val_size=0,
                                 params={"cache": True}))
    assert torch.equal(d.train.x, again.train.x) and torch.equal(d.test.y, again.test.y)
    with pytest.raises(UserError, match="wnids.txt"):
        load_data(DataConfig(name="tiny-imagenet", root=str(tmp_path / "nothing"), val_size=0))
