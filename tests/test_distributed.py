"""Several processes under torchrun (gloo on CPU) compute what one process computes with the same
global batch: the same weights (within float tolerance) and the same per-class metrics."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from robustfair.engine.io import load_checkpoint

from conftest import run_cli

CFG = {
    "seed": 1, "deterministic": True,
    "data": {"name": "digits", "train_limit": 512},
    "model": {"name": "mlp", "params": {"hidden": [32]}},
    "method": {"objective": {"name": "pgd_at", "random_start": False}},
    "attack": {"eps": 0.1, "step_size": 0.03, "steps": 3},
    "train": {"epochs": 2, "batch_size": 64, "optimizer": {"lr": 0.05}},
    "validation": {"n": 100, "attack": "fgsm"},
    "eval": {"attacks": ["clean", "fgsm"]},
    "logging": {"progress": False},
}


def _run(tmp_path: Path, name: str, nproc: int, extra: dict | None = None,
         capsys=None) -> Path:  # noqa: ANN001
    """Train CFG (+ ``extra``) as ``name``: in this process (nproc 1, one thread) or under
    torchrun with ``nproc`` processes."""
    cfg = tmp_path / f"{name}.yaml"
    cfg.write_text(yaml.safe_dump({**CFG, **(extra or {}), "name": name,
                                   "output_dir": str(tmp_path / "runs")}))
    if nproc == 1:
        code, out, err = run_cli(["train", str(cfg), "-q"], capsys)
        assert code == 0, err[-3000:]
    else:
        env = dict(os.environ, OMP_NUM_THREADS="1")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={nproc}", "-m", "robustfair.cli", "train", str(cfg), "-q"]
        r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        out = r.stdout
    assert out.count("test accuracy (%) per class") == 1  # printed once, not per process
    return tmp_path / "runs" / name


@pytest.mark.timeout(900)
def test_two_processes_equal_one(tmp_path, capsys, one_thread):
    """PGD-AT with DAFA's class weights (computed from the first epoch's adversarial
    predictions, gathered over processes): weights, DAFA's class weights, per-class metrics and
    the logged loss equal those of one process."""
    extra = {"method": {"objective": {"name": "pgd_at", "random_start": False},
                        "policy": {"name": "dafa", "warmup": 1, "lam": 1.0}}}
    one = _run(tmp_path, "one", 1, extra, capsys)
    two = _run(tmp_path, "two", 2, extra)
    ca = load_checkpoint(one / "checkpoints" / "last.pt")
    cb = load_checkpoint(two / "checkpoints" / "last.pt")
    a, b = ca["model"], cb["model"]
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4), k
    wa, wb = ca["policy"]["weights"], cb["policy"]["weights"]
    assert not torch.allclose(wa, torch.ones_like(wa))  # DAFA did move the weights
    assert torch.allclose(wa, wb, atol=1e-6)
    sa = json.loads((one / "eval" / "summary.json").read_text())
    sb = json.loads((two / "eval" / "summary.json").read_text())
    for atk in ("clean", "fgsm"):
        assert sa["attacks"][atk]["per_class"] == sb["attacks"][atk]["per_class"]
    la = [json.loads(x) for x in (one / "log.jsonl").read_text().splitlines()]
    lb = [json.loads(x) for x in (two / "log.jsonl").read_text().splitlines()]
    assert len(la) == len(lb) == 2
    assert abs(la[-1]["train_loss"] - lb[-1]["train_loss"]) < 1e-5


BN = {"model": {"name": "resnet18", "params": {"width": 4}},
      "method": {"objective": {"name": "standard"}},
      "train": {"epochs": 1, "batch_size": 64, "optimizer": {"lr": 0.01, "momentum": 0.0}},
      "validation": {"every": 0}, "eval": {"attacks": ["clean"], "n": 50}}


@pytest.mark.timeout(900)
def test_sync_batchnorm_two_processes_equal_one(tmp_path, capsys, one_thread):
    """train.sync_bn: BatchNorm statistics over the global batch, so 2 processes (gloo) give the
    weights and BN buffers of 1 process; without it each process normalises its half-batch."""
    one = _run(tmp_path, "bn1", 1, {**BN, "data": {"name": "digits", "train_limit": 256}},
               capsys)
    extra = {**BN, "data": {"name": "digits", "train_limit": 256},
             "train": {**BN["train"], "sync_bn": True}}
    two = _run(tmp_path, "bn2", 2, extra)
    a = load_checkpoint(one / "checkpoints" / "last.pt")["model"]
    b = load_checkpoint(two / "checkpoints" / "last.pt")["model"]
    assert any("running_var" in k for k in a) and a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=1e-5, rtol=1e-4), k
