"""Engine work that must not change what an attack finds: the channels-last weight layout used
while a convolutional model is attacked, and Square's skipping of queries that repeat the
current best point."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import robustfair.attacks.square as square
from robustfair.attacks.autoattack import AutoAttack
from robustfair.attacks.base import inference_layout, logit_tolerance
from robustfair.errors import UserError

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.numeric]


def conv_weights(model: nn.Module) -> list[torch.Tensor]:
    """The 4-D weights whose layout can change (one input channel: the same in both)."""
    return [p for p in model.parameters() if p.dim() == 4 and p.shape[1] > 1]


def test_layout_keeps_the_logits_and_gives_back_the_storage(trained_cnn, digits):
    x = digits.test.images()[:16]
    with torch.no_grad():
        before = trained_cnn(x)
    ptrs = [p.data_ptr() for p in conv_weights(trained_cnn)]
    with inference_layout(trained_cnn, x) as used:
        assert used == "channels_last"
        assert all(p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
                   for p in conv_weights(trained_cnn))
        with torch.no_grad():
            inside = trained_cnn(x)
    # the same logits up to the rounding of another summation order, by the library's own
    # criterion (the one it checks before it switches; its derivation is at LOGIT_RTOL)
    rtol, atol = logit_tolerance(before)
    torch.testing.assert_close(inside, before, rtol=rtol, atol=atol)
    assert [p.data_ptr() for p in conv_weights(trained_cnn)] == ptrs
    assert all(p.is_contiguous() for p in conv_weights(trained_cnn))


def test_layout_given_back_when_the_block_fails(trained_cnn, digits):
    x = digits.test.images()[:4]
    ptrs = [p.data_ptr() for p in conv_weights(trained_cnn)]
    with pytest.raises(RuntimeError, match="inside"), inference_layout(trained_cnn, x):
        raise RuntimeError("inside")
    assert [p.data_ptr() for p in conv_weights(trained_cnn)] == ptrs


class ViewAfterConv(nn.Module):
    """Flattens a conv output with ``view``, which channels-last tensors do not allow."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x).relu()
        return self.fc(h.view(h.size(0), -1))


def test_layout_left_unchanged_where_it_does_not_apply(trained_mlp, digits):
    x = digits.test.images()[:4]
    torch.manual_seed(0)
    fragile = ViewAfterConv().eval()
    with inference_layout(fragile, x) as used:  # channels-last breaks its view: left alone
        assert used == "unchanged"
        assert fragile.conv.weight.is_contiguous()
        fragile(x)
    with inference_layout(trained_mlp, x) as used:  # no convolution
        assert used == "unchanged"
    cnn = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Conv2d(2, 2, 3), nn.Flatten(),
                        nn.Linear(32, 10))
    with inference_layout(cnn, x, "unchanged") as used:
        assert used == "unchanged" and cnn[1].weight.is_contiguous()
    with inference_layout(cnn, x, "channels_last") as used:
        assert used == "channels_last"
    with pytest.raises(UserError, match="unknown layout 'nhwc'"), \
            inference_layout(cnn, x, "nhwc"):
        pass


def test_autoattack_and_staged_evaluation_report_the_layout(trained_cnn, digits):
    from robustfair.engine.staged import evaluate_staged

    x, y = digits.test.images()[:20], digits.test.y[:20]
    runs = {lay: AutoAttack(norm="linf", steps=10, n_queries=50, layout=lay).run(
        trained_cnn, x, y, 0.1) for lay in ("auto", "unchanged")}
    assert runs["auto"].layout == "channels_last" and runs["unchanged"].layout == "unchanged"
    assert torch.equal(runs["auto"].robust["square"], runs["unchanged"].robust["square"])
    res = evaluate_staged(trained_cnn, digits.test.subset(torch.arange(20)), ["clean", "pgd5"],
                          0.1, num_classes=10)
    assert res.settings["layout"] == "channels_last"


class Rows(nn.Module):
    """Counts the rows passed through the model."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model, self.rows = model, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.rows += len(x)
        return self.model(x)


def test_square_skips_repeated_points_and_finds_the_same(trained_cnn, digits, monkeypatch):
    """Skipping the proposals equal to the current best point gives the same search (the same
    points fooled, the same best points) with fewer rows through the model."""
    x, y = digits.test.images()[:60], digits.test.y[:60]
    out = {}
    for skip in (True, False):
        model = Rows(trained_cnn)
        if not skip:  # every proposal through the model, as before the skip existed
            monkeypatch.setattr(square._Search, "skip_repeats", False)
        xb, fooled = square.square_linf(model, x, y, torch.tensor(0.15), n_queries=300,
                                        generator=torch.Generator().manual_seed(0))
        out[skip] = (xb, fooled, model.rows)
    assert 0 < int(out[True][1].sum()) < len(y)
    assert torch.equal(out[True][1], out[False][1])
    assert torch.allclose(out[True][0], out[False][0], atol=1e-6)
    assert out[True][2] < 0.95 * out[False][2]

