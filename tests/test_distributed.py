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


def _config(tmp_path: Path, name: str, extra: dict | None = None) -> Path:
    cfg = tmp_path / f"{name}.yaml"
    cfg.write_text(yaml.safe_dump({**CFG, **(extra or {}), "name": name,
                                   "output_dir": str(tmp_path / "runs")}))
    return cfg


def _run(tmp_path: Path, name: str, nproc: int, extra: dict | None = None,
         capsys=None) -> Path:  # noqa: ANN001
    """Train CFG (+ ``extra``) as ``name``: in this process (nproc 1, one thread) or under
    torchrun with ``nproc`` processes."""
    cfg = _config(tmp_path, name, extra)
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
        # tolerance: two processes sum each batch's gradient as two half-batch means plus an all-
        #   reduce: FP32_BATCH_MEAN per step, over the run's few dozen small steps (lr 0.05):
        #   fp32_training, rtol for the larger weights
        assert torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4), k
    wa, wb = ca["policy"]["weights"], cb["policy"]["weights"]
    assert not torch.allclose(wa, torch.ones_like(wa))  # DAFA did move the weights
    # tolerance: DAFA weights of order 1 from class means of counts (gathered, the same counts):
    #   FP32_ELEMENTWISE
    assert torch.allclose(wa, wb, atol=1e-6)
    sa = json.loads((one / "eval" / "summary.json").read_text())
    sb = json.loads((two / "eval" / "summary.json").read_text())
    for atk in ("clean", "fgsm"):
        assert sa["attacks"][atk]["per_class"] == sb["attacks"][atk]["per_class"]
    la = [json.loads(x) for x in (one / "log.jsonl").read_text().splitlines()]
    lb = [json.loads(x) for x in (two / "log.jsonl").read_text().splitlines()]
    assert len(la) == len(lb) == 2
    # tolerance: FP32_BATCH_MEAN: an epoch's mean loss, summed per process and all-reduced
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
        # tolerance: as above: one epoch's SGD steps with BatchNorm statistics all-reduced instead of
        #   summed in one pass: fp32_training
        assert torch.allclose(a[k].float(), b[k].float(), atol=1e-5, rtol=1e-4), k


# Four trainings in one torchrun launch (tests/dist_worker.py), checked by the tests below.
FRL = {"method": {"objective": {"name": "pgd_at", "random_start": False},
                  "policy": {"name": "frl", "mode": "both", "tau1": 0.0, "tau2": 0.0,
                             "alpha1": 0.5, "alpha2": 1.0, "attack": "fgsm"}},
       "train": {**CFG["train"], "batch_size": 16}}
IKL_DAFA = {"method": {"objective": {"name": "ikl"},
                       "policy": {"name": "dafa", "warmup": 1, "lam": 1.0}},
            "train": {**CFG["train"], "checkpoint_every_steps": 3}}
STOP_AFTER = [5, 9]  # 8 steps an epoch: resumed from step 3 (mid-epoch) and from epoch 1's end
BN_SPLIT = {**BN, "data": {"name": "digits", "train_limit": 200},  # the last batch has 8
            "train": {"epochs": 5, "batch_size": 64, "optimizer": {"lr": 0.05, "momentum": 0.0}},
            "eval": {"attacks": ["clean"], "n": None}}


@pytest.fixture(scope="module")
def launched(tmp_path_factory) -> Path:  # noqa: ANN001
    """Under torchrun with 2 processes: FRL; IKL with DAFA, once straight through and once
    stopped twice and resumed; a BatchNorm model without sync_bn. The folder that holds
    ``runs/`` and the processes' states ``dump-NAME/state-rankR.pt``."""
    tmp = tmp_path_factory.mktemp("launch")
    jobs = [{"config": str(_config(tmp, "frl2", FRL))},
            {"config": str(_config(tmp, "ikl2", IKL_DAFA)), "dump": str(tmp / "dump-ikl2")},
            {"config": str(_config(tmp, "ikl2-resumed", IKL_DAFA)), "stop_after": STOP_AFTER},
            {"config": str(_config(tmp, "bn-split2", BN_SPLIT)), "dump": str(tmp / "dump-bn")}]
    for job in jobs:
        if "dump" in job:
            Path(job["dump"]).mkdir()
    (tmp / "jobs.json").write_text(json.dumps(jobs))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(Path(__file__).with_name("dist_worker.py")), str(tmp / "jobs.json")]
    r = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return tmp


def _same_run(one: Path, two: Path, atol: float = 1e-5) -> tuple[dict, dict]:
    """Weights, logged losses and accuracies and per-class test figures of two runs agree;
    their checkpoints."""
    ca = load_checkpoint(one / "checkpoints" / "last.pt")
    cb = load_checkpoint(two / "checkpoints" / "last.pt")
    for k in ca["model"]:
        # tolerance: fp32_training: per-step half-batch sums and an all-reduce against one batch sum
        #   (atol chosen by the caller)
        assert torch.allclose(ca["model"][k], cb["model"][k], atol=atol, rtol=1e-4), k
    la = [json.loads(x) for x in (one / "log.jsonl").read_text().splitlines()]
    lb = [json.loads(x) for x in (two / "log.jsonl").read_text().splitlines()]
    assert len(la) == len(lb) == CFG["train"]["epochs"]
    for a, b in zip(la, lb):
        for k in ("train_loss", "train_clean_acc", "train_adv_acc"):
            assert abs(a[k] - b[k]) < atol, (a["epoch"], k, a[k], b[k])
    sa = json.loads((one / "eval" / "summary.json").read_text())
    sb = json.loads((two / "eval" / "summary.json").read_text())
    for atk in sa["attacks"]:
        assert sa["attacks"][atk]["per_class"] == sb["attacks"][atk]["per_class"], atk
    return ca, cb


@pytest.mark.timeout(900)
def test_frl_two_processes_equal_one(launched, tmp_path, capsys, one_thread):
    """FRL's reweighting normalises by Σw and n of the global batch and its remargin step is
    the maximum over the global batch (batches of 16: a half-batch of 8 often lacks the class
    of the largest margin), so 2 processes train the weights of 1."""
    one = _run(tmp_path, "frl1", 1, FRL, capsys)
    ca, cb = _same_run(one, launched / "runs" / "frl2")
    phi = ca["policy"]["phi"]
    assert bool((phi[0] != 0).any() and (phi[2] != 0).any())  # weights and margins did move
    # tolerance: FP32_ELEMENTWISE: FRL's φ of order 0.1 from gathered class costs
    assert torch.allclose(phi, cb["policy"]["phi"], atol=1e-6)


@pytest.mark.timeout(900)
def test_ikl_classwise_weights_summed_over_processes(launched, tmp_path, capsys, one_thread):
    """IKL's class-wise weights come from the sums over the global batches: every process
    holds the same weights, those of one process (within what the attack's random start,
    drawn per process, moves)."""
    one = _run(tmp_path, "ikl1", 1, IKL_DAFA, capsys)
    w1 = load_checkpoint(one / "checkpoints" / "last.pt")["objective"]["class_weights"]
    assert not torch.allclose(w1, torch.full_like(w1, w1[0, 0]))  # rolled over from epoch 1
    ranks = [torch.load(launched / "dump-ikl2" / f"state-rank{r}.pt") for r in (0, 1)]
    w2 = [st["objective"]["class_weights"] for st in ranks]
    assert torch.equal(w2[0], w2[1])
    # tolerance: the attack's random start is drawn per process: the class-wise softmax means move by
    #   ~1e-4 with it; 1e-3 is well below their spread (rolled over above)
    assert torch.allclose(w1, w2[0], atol=1e-3)


@pytest.mark.timeout(900)
def test_two_processes_resume_exactly(launched, one_thread):
    """IKL with DAFA under 2 processes, stopped after a mid-epoch checkpoint and after an epoch
    end and resumed each time, equals the run that was not stopped: the epoch's statistics and
    IKL's and DAFA's sums, split over processes, are whole in the checkpoint and continued by
    the first process only."""
    runs = launched / "runs"
    # tolerance: the same 2 processes, stopped and resumed: the same sums in the same order but for
    #   the checkpoint round trip; FP32_ELEMENTWISE
    ca, cb = _same_run(runs / "ikl2", runs / "ikl2-resumed", atol=1e-6)
    w = ca["objective"]["class_weights"]
    assert torch.allclose(w, cb["objective"]["class_weights"], atol=1e-6)
    wa, wb = ca["policy"]["weights"], cb["policy"]["weights"]
    assert not torch.allclose(wa, torch.ones_like(wa))  # DAFA did move the weights
    assert torch.allclose(wa, wb, atol=1e-6)


@pytest.mark.timeout(900)
def test_batchnorm_buffers_agree_across_processes(launched, one_thread):
    """Without sync_bn each process updates BatchNorm statistics from its half-batch; every
    process ends with the first one's (the checkpoint's), and the sharded final evaluation
    equals an evaluation of the saved checkpoint in one process (whose accuracies alone seldom
    show the difference: the per-process states do)."""
    from robustfair.config import load_config
    from robustfair.data import load_data
    from robustfair.engine.protocol import evaluate_split
    from robustfair.models import build_model

    run = launched / "runs" / "bn-split2"
    saved = load_checkpoint(run / "checkpoints" / "last.pt")["model"]
    ranks = [torch.load(launched / "dump-bn" / f"state-rank{r}.pt")["model"] for r in (0, 1)]
    for k in saved:
        for state in ranks:
            assert torch.equal(state[k], saved[k]), k
    cfg = load_config(str(run / "config.yaml"), None, [])
    data = load_data(cfg.data)
    model = build_model(cfg.model.name, data.in_channels, data.num_classes, data.image_size,
                        data.mean, data.std, **cfg.model.params)
    model.load_state_dict(saved)
    res, _ = evaluate_split(model, data, cfg, None, device=torch.device("cpu"))
    summary = json.loads((run / "eval" / "summary.json").read_text())
    assert res.summary()["attacks"]["clean"]["per_class"] == \
        summary["attacks"]["clean"]["per_class"]
