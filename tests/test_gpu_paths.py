"""The GPU code paths, run on CPU: bf16 autocast (CPU autocast), ``train.compile``
(``torch.compile`` on CPU) and channels-last each give what fp32 eager gives, within stated
tolerances: the training loss after a few steps, and the PGD-20 accuracy of a trained model."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from robustfair.config import build_config
from robustfair.engine.evaluator import evaluate
from robustfair.engine.trainer import Trainer

STEPS = 3
EPS = 0.1
#: |loss - fp32 loss| after STEPS steps: bf16 keeps 8 mantissa bits; the others reorder sums
LOSS_TOL = {"bf16": 0.03, "channels_last": 1e-4, "compile": 1e-4}


#: a conv net for bf16 and channels-last; an MLP for torch.compile (compiling on CPU is slow)
CNN = {"name": "smallcnn", "params": {"width": 0.25, "dropout": 0.0}}
MLP = {"name": "mlp", "params": {"hidden": [16]}}


def _cfg(model=CNN, **train):
    return build_config({
        "seed": 0, "deterministic": True, "data": {"name": "digits"}, "model": model,
        "method": {"objective": {"name": "pgd_at", "random_start": False}},
        "attack": {"eps": EPS, "step_size": 0.03, "steps": 2},
        "train": {"epochs": 1, "batch_size": 64, "optimizer": {"lr": 0.05}, **train},
        "logging": {"progress": False}})


def _losses(digits, tmp_path, model=CNN, **train) -> list[float]:
    tr = Trainer(_cfg(model, **train), tmp_path, data=digits, quiet=True)
    stats = tr._new_stats()
    out = []
    for idx in tr.sampler.epoch_batches(1)[:STEPS]:
        out.append(float(tr.train_step(idx, stats)))
        tr.global_step += 1
    return out


@pytest.mark.parametrize("mode,model,train", [("bf16", CNN, {"precision": "bf16"}),
                                              ("channels_last", CNN, {"channels_last": True}),
                                              ("compile", MLP, {"compile": True})])
def test_training_loss_equals_fp32(digits, tmp_path, mode, model, train):
    ref = _losses(digits, tmp_path / "fp32", model)
    got = _losses(digits, tmp_path / mode, model, **train)
    assert all(0 < v < 10 for v in ref) and ref[0] != ref[-1]  # the steps ran and moved
    for a, b in zip(got, ref, strict=True):
        assert abs(a - b) <= LOSS_TOL[mode], (mode, got, ref)


class _Autocast(nn.Module):
    """Run a model under CPU bf16 autocast, returning fp32 logits (as the trainer does)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return self.model(x).float()


class _ChannelsLast(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = copy.deepcopy(model).to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.contiguous(memory_format=torch.channels_last))


def test_pgd20_accuracy_within_one_point(digits, trained_cnn, trained_mlp):
    """PGD-20 accuracy of a trained SmallCNN under bf16 autocast and channels-last, and of a
    trained MLP under torch.compile, is within 1 point of fp32 eager (same images, seed and
    attack)."""
    test = digits.test
    n = len(test) - len(test) % 60  # whole batches: one compiled graph
    test = test.subset(torch.arange(n))

    def acc(model: nn.Module) -> float:
        res = evaluate(model, test, ["pgd20"], EPS, "linf", 10, batch_size=60, seed=0)
        return 100 * float(res.row("pgd20").float().mean())

    ref, ref_mlp = acc(trained_cnn), acc(trained_mlp)
    assert 5 < ref < 90 and 5 < ref_mlp < 90  # the attack has work to do
    got = {"bf16": (acc(_Autocast(trained_cnn)), ref),
           "channels_last": (acc(_ChannelsLast(trained_cnn)), ref),
           "compile": (acc(torch.compile(trained_mlp, dynamic=False)), ref_mlp)}
    for mode, (v, r) in got.items():
        assert abs(v - r) <= 1.0, (mode, v, r)
