"""Class activation maps: batched = per image, the formulas by hand, no side effects, and the
PART jet mask against the official Pillow + matplotlib pipeline."""

from __future__ import annotations

import matplotlib
import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from robustfair.cam import CAMS, class_activation_maps, resolve_layer
from robustfair.cam.core import normalize_maps
from robustfair.cam.methods import gradcam
from robustfair.cam.pixel_weights import (
    Upsampler,
    jet,
    jet_channel_weights,
    jet_lut,
    pixel_weights,
)
from robustfair.errors import UserError
from robustfair.models import build_model

METHODS = ["gradcam", "xgradcam", "layercam"]


pytestmark = pytest.mark.usefixtures("one_thread")


def quadrant_images(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise with a bright 8×8 square in one of four quadrants; the label is the quadrant."""
    g = torch.Generator().manual_seed(seed)
    x = 0.3 * torch.rand(n, 3, 32, 32, generator=g)
    y = torch.randint(0, 4, (n,), generator=g)
    for i in range(n):
        r, c = 16 * (int(y[i]) // 2) + 4, 16 * (int(y[i]) % 2) + 4
        x[i, :, r : r + 8, c : c + 8] += 0.7
    return x, y


@pytest.fixture(scope="module")
def small_resnet(one_thread):
    """A narrow ResNet-18 on 32×32 RGB whose BN running statistics come from a few batches
    (an initialisation whose Grad-CAMs are not all zero)."""
    torch.manual_seed(1)
    m = build_model("resnet18", 3, 4, 32, width=4)
    m.train()
    with torch.no_grad():
        for step in range(3):
            m(quadrant_images(32, step)[0])
    return m


def reference_cam(model: nn.Module, x1: torch.Tensor, layer: str, method: str) -> torch.Tensor:
    """One image at a time, as torchcam does it: hook, backward of s_c, read the gradient."""
    module = model.get_submodule(layer)
    store = {}

    def hook(_m, _i, out):
        out.retain_grad()
        store["a"] = out

    h = module.register_forward_hook(hook)
    was = model.training
    model.eval()
    try:
        logits = model(x1)
        c = int(logits.argmax(1))
        model.zero_grad()
        logits[0, c].backward()
    finally:
        h.remove()
        model.train(was)
        model.zero_grad(set_to_none=True)
    a, g = store["a"].detach(), store["a"].grad.detach()
    if method == "gradcam":
        cam = torch.relu((g.mean((2, 3), keepdim=True) * a).sum(1))
    elif method == "xgradcam":
        w = (g * a).sum((2, 3), keepdim=True) / (a.sum((2, 3), keepdim=True) + 1e-8)
        cam = torch.relu((w * a).sum(1))
    else:
        cam = torch.relu((torch.relu(g) * a).sum(1))
    cam = cam - cam.amin((1, 2), keepdim=True)
    return torch.nan_to_num(cam / cam.amax((1, 2), keepdim=True))  # constant map: 0, not NaN


@pytest.mark.numeric
@pytest.mark.parametrize("method", METHODS)
def test_batched_cam_equals_per_image(small_resnet, method):
    x, _ = quadrant_images(6, seed=100)
    out = class_activation_maps(small_resnet, x, method)
    assert out.layer == "net.layer4" and out.cam.shape == (6, 4, 4)
    assert int(out.flat.sum()) <= 1, "the test needs informative maps"
    for i in range(len(x)):
        single = class_activation_maps(small_resnet, x[i : i + 1], method)
        # tolerance: a batch of 6 against one image: another GEMM blocking for the ResNet's layers;
        #   fp32_network over its few layers of ≤ 1,000 accumulations, maps normalised to [0,
        #   1]
        torch.testing.assert_close(out.cam[i], single.cam[0], atol=1e-5, rtol=1e-4)
        ref = reference_cam(small_resnet, x[i : i + 1], "net.layer4", method)
        torch.testing.assert_close(out.cam[i], ref[0], atol=1e-5, rtol=1e-4)
    assert torch.equal(out.class_idx, out.logits.argmax(1))


@pytest.mark.numeric
def test_gradcam_by_hand_is_cam_of_a_gap_linear_head():
    """Conv → global average pool → linear: ∂s_c/∂A_k(i,j) = W_ck / (h·w), so Grad-CAM is the
    classic CAM ReLU(Σ_k W_ck A_k) up to a positive factor (Selvaraju et al., Sec. 3.1)."""

    class Net(nn.Module):
        cam_layer = "conv"

        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 5, 3, padding=1)
            self.fc = nn.Linear(5, 4)

        def forward(self, x):
            a = self.conv(x)
            return self.fc(a.mean((2, 3)))

    torch.manual_seed(3)
    net = Net()
    x = torch.rand(3, 1, 6, 6)
    out = class_activation_maps(net, x, "gradcam", layer="conv", normalize=False)
    a = net.conv(x).detach()
    c = net(x).argmax(1)
    expected = torch.relu((net.fc.weight[c][:, :, None, None] * a).sum(1)) / 36
    # tolerance: FP32_ELEMENTWISE: a 5-term weighted sum of order 1, by autograd and by hand
    torch.testing.assert_close(out.cam, expected.detach(), atol=1e-6, rtol=1e-5)
    # a chosen class instead of the predicted one
    out2 = class_activation_maps(net, x, "gradcam", layer="conv", class_idx=2, normalize=False)
    expected2 = torch.relu((net.fc.weight[2][None, :, None, None] * a).sum(1)) / 36
    torch.testing.assert_close(out2.cam, expected2.detach(), atol=1e-6, rtol=1e-5)


def test_no_side_effects(small_resnet):
    m = small_resnet
    m.train()
    bn_before = {k: v.clone() for k, v in m.state_dict().items()}
    for p in m.parameters():
        p.grad = None
    class_activation_maps(m, torch.rand(4, 3, 32, 32), "layercam")
    assert all(p.grad is None for p in m.parameters()), "the CAM wrote into parameter .grad"
    assert m.training and all(mod.training for mod in m.modules()), "modes not restored"
    after = m.state_dict()
    assert all(torch.equal(bn_before[k], after[k]) for k in bn_before), "BN statistics moved"
    assert not any(mod._forward_hooks for mod in m.modules()), "a hook was left behind"


def test_hooks_released_on_error(small_resnet):
    with pytest.raises(RuntimeError):
        class_activation_maps(small_resnet, torch.rand(2, 3, 32, 32), class_idx=99)
    assert not any(mod._forward_hooks for mod in small_resnet.modules())


def test_layer_resolution(small_resnet):
    assert resolve_layer(small_resnet)[0] == "net.layer4"
    assert resolve_layer(small_resnet, "layer3")[0] == "net.layer3"
    with pytest.raises(UserError, match="not a module"):
        resolve_layer(small_resnet, "layer9")
    mlp = build_model("mlp", 1, 10, 8)
    with pytest.raises(UserError, match="no convolutional feature layer"):
        class_activation_maps(mlp, torch.rand(2, 1, 8, 8))
    assert set(CAMS.names()) >= set(METHODS)


def test_wrn_default_layer_is_block3_and_64px_models_work():
    """PART's layers: ``layer4`` (ResNet-18) and ``block3`` (WRN-34-10, before the final BN);
    both models pool adaptively, so they take 64×64 Tiny-ImageNet inputs."""
    wrn = build_model("wrn34_10", 3, 200, 64, widen=1)
    assert wrn.feature_layer_name() == "net.block3"
    out = class_activation_maps(wrn, torch.rand(2, 3, 64, 64))
    assert out.cam.shape == (2, 16, 16) and out.logits.shape == (2, 200)
    rn = build_model("resnet18", 3, 200, 64, width=4)
    assert class_activation_maps(rn, torch.rand(2, 3, 64, 64)).cam.shape == (2, 8, 8)


def test_constant_map_is_flagged_not_nan():
    cam, flat = normalize_maps(torch.stack([torch.zeros(4, 4), torch.arange(16.0).view(4, 4)]))
    assert torch.isfinite(cam).all()
    assert flat.tolist() == [True, False]
    assert cam[1].min() == 0 and cam[1].max() == 1


# ---------------------------------------------------------------------------- PART's jet mask


def test_jet_lut_matches_matplotlib():
    cmap = matplotlib.colormaps["jet"]
    # tolerance: FP64_FORMULA: the same piecewise-linear map in float64
    np.testing.assert_allclose(jet_lut().numpy(), cmap(np.arange(256))[:, :3], atol=1e-12)
    v = (torch.rand(5000, generator=torch.Generator().manual_seed(0)) * 1.4 - 0.2)
    np.testing.assert_allclose(jet(v).numpy(), cmap(v.numpy())[:, :3], atol=1e-12)


@pytest.mark.numeric
def test_bicubic_upsampling_matches_pillow():
    g = torch.Generator().manual_seed(0)
    cams = torch.rand(20, 4, 4, generator=g)
    up = Upsampler()(cams, (32, 32))
    for i in range(len(cams)):
        ref = np.asarray(Image.fromarray(cams[i].numpy()).resize((32, 32), Image.BICUBIC))
        # tolerance: fp32 bicubic: 16 products of order 1 per pixel in another order than Pillow's:
        #   16·u ≈ 1e-6, ×2
        np.testing.assert_allclose(up[i].numpy(), ref, atol=2e-6)
    # non-square and other factors (a WRN map 8×8 → 32×32, 16 → 64)
    cams = torch.rand(3, 8, 6, generator=g)
    up = Upsampler()(cams, (64, 40))
    ref = np.asarray(Image.fromarray(cams[0].numpy()).resize((40, 64), Image.BICUBIC))
    np.testing.assert_allclose(up[0].numpy(), ref, atol=2e-6)


def official_mask(cam4: np.ndarray, size: int = 32) -> np.ndarray:
    """PART's ``process_overlay`` + ``generate_weighted_eps`` for one image (Pillow, matplotlib,
    numpy), giving True where the entry keeps the full ε; (3, H, W)."""
    u = np.asarray(Image.fromarray(cam4.astype(np.float32)).resize((size, size), Image.BICUBIC))
    rgb = matplotlib.colormaps["jet"](u**2)[..., :3]
    z = (rgb - np.mean(rgb)) / np.std(rgb)
    return (np.clip(z, 1, z.max()) > 1).transpose(2, 0, 1)


def random_cams(n: int, seed: int = 0) -> torch.Tensor:
    """Grad-CAMs of random ReLU activations and random gradients (4×4, as on a 32-px ResNet)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.relu(torch.randn(n, 64, 4, 4, generator=g))
    grads = torch.randn(n, 64, 1, 1, generator=g).expand(n, 64, 4, 4)
    return normalize_maps(gradcam(a, grads))[0]


@pytest.mark.numeric
def test_jet_mask_equals_official_pipeline():
    cams = random_cams(64, seed=1)
    w = jet_channel_weights(Upsampler()(cams, (32, 32)))
    ref = np.stack([official_mask(c.numpy()) for c in cams])
    assert w.shape == (64, 3, 32, 32)
    assert np.array_equal(w.numpy() > 0.5, ref)


def test_jet_mask_keeps_a_fifth_mostly_blue():
    """On random CAMs the official mask keeps ε on ≈ 1/5 of the entries: R .06, G .12, B .42
    by the spec's measurement; the blue channel dominates."""
    w = jet_channel_weights(Upsampler()(random_cams(400), (32, 32)))
    r, g, b = (float(v) for v in w.mean((0, 2, 3)))
    assert 0.17 <= float(w.mean()) <= 0.23
    assert 0.03 <= r <= 0.09 and 0.08 <= g <= 0.16 and 0.36 <= b <= 0.50
    assert b > g > r


def test_threshold_continuous_and_grey_modes():
    u = torch.tensor([[[0.1, 0.6], [0.5, 1.2]]])
    thr = pixel_weights(u, 3, "threshold", threshold=0.5)
    assert thr.shape == (1, 3, 2, 2)
    assert thr[0, 0].tolist() == [[0.0, 1.0], [0.0, 1.0]] and torch.equal(thr[0, 0], thr[0, 2])
    cont = pixel_weights(u, 1, "continuous")
    # tolerance: torch's default (rtol 1e-5): one fp32 division per value
    assert torch.allclose(cont[0, 0], torch.tensor([[0.1, 0.6], [0.5, 1.0]]))
    cams = Upsampler()(random_cams(8), (28, 28))
    rgb = jet_channel_weights(cams)
    mean = pixel_weights(cams, 1, "jet", grey="mean")
    anyc = pixel_weights(cams, 1, "jet", grey="any")
    assert torch.allclose(mean[:, 0], rgb.mean(1)) and torch.equal(anyc[:, 0], rgb.amax(1))
    assert set(torch.unique(mean * 3).round().tolist()) <= {0.0, 1.0, 2.0, 3.0}


# ---------------------------------------------------------------------------- analyze --cam


def test_analyze_cam_writes_png(tmp_path):
    from click.testing import CliRunner

    from robustfair.cli import cli
    from robustfair.config import load_config
    from robustfair.engine.trainer import Trainer, prepare_run_dir

    cfg = load_config(None, "part-mnist5k", [
        "data.name=digits", "data.train_limit=64", "train.epochs=1", "train.batch_size=64",
        "attack.steps=1", "method.budget.warmup=0", "validation.every=0", f"output_dir={tmp_path}",
        "device=cpu", "logging.progress=false"])
    run_dir = prepare_run_dir(cfg)
    Trainer(cfg, run_dir, quiet=True).fit()
    res = CliRunner().invoke(cli, ["analyze", str(run_dir), "--cam", "--n", "3", "-q"])
    assert res.exit_code == 0, res.output
    png = run_dir / "cam_grid.png"
    assert str(png) in res.output and png.is_file()
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size[0] > 200
