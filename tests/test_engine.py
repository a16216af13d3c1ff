"""The training engine: adversarial training works, resume is exact, divergence stops cleanly."""

from __future__ import annotations

import json

import pytest
import torch

from robustfair.commands.run import train_run
from robustfair.config import load_config
from robustfair.engine.io import load_checkpoint
from robustfair.engine.trainer import Trainer, TrainingDiverged, prepare_run_dir
from robustfair.errors import UserError

DIGITS = [
    "data.name=digits", "model.name=smallcnn", "model.params={dropout: 0.0}",
    "attack.eps=0.15", "attack.step_size=0.04", "attack.steps=5", "train.batch_size=64",
    "train.optimizer.lr=0.05", "validation.n=100", "validation.attack=pgd5",
    "eval.attacks=[clean, pgd20]", "logging.progress=false",
]


def cfg_for(tmp_path, *extra, recipe="mnist5k-trades"):
    return load_config(recipe=recipe, overrides=[*DIGITS, f"output_dir={tmp_path}", *extra])


def test_trades_is_far_more_robust_than_standard(tmp_path, one_thread):
    _, std = train_run(cfg_for(tmp_path, "name=std", "method.objective.name=standard",
                               "train.epochs=8"), quiet=True)
    _, tr = train_run(cfg_for(tmp_path, "name=trades", "train.epochs=8"), quiet=True)
    assert std["attacks"]["clean"]["avg"] > 0.85
    assert tr["attacks"]["pgd20"]["avg"] > std["attacks"]["pgd20"]["avg"] + 0.25
    # the run directory holds what the design says
    run = tmp_path / "trades"
    for f in ("config.yaml", "log.jsonl", "checkpoints/last.pt", "checkpoints/best.pt",
              "checkpoints/last.json", "eval/summary.json", "eval/summary_matrix.npz"):
        assert (run / f).exists(), f
    lines = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in lines] == list(range(1, 9))
    assert "per_class" in lines[-1]["val"]["robust"]


class Interrupt(Exception):
    pass


def test_interrupted_run_resumes_to_identical_weights(tmp_path, monkeypatch):
    extra = ["train.epochs=3", "train.checkpoint_every_steps=4", "deterministic=true",
             "data.train_limit=400", "train.schedule.name=cosine"]
    full_cfg = cfg_for(tmp_path, "name=full", *extra)
    t_full = Trainer(full_cfg, prepare_run_dir(full_cfg), quiet=True)
    t_full.fit()

    cut_cfg = cfg_for(tmp_path, "name=cut", *extra)
    t_cut = Trainer(cut_cfg, prepare_run_dir(cut_cfg), quiet=True)
    original = Trainer.train_step

    def dying(self, idx, stats):
        if self.global_step == 10:  # mid-epoch 2, after the checkpoint at step 8
            raise Interrupt
        return original(self, idx, stats)

    monkeypatch.setattr(Trainer, "train_step", dying)
    with pytest.raises(Interrupt):
        t_cut.fit()
    monkeypatch.setattr(Trainer, "train_step", original)
    ck = load_checkpoint(tmp_path / "cut" / "checkpoints" / "last.pt")
    assert ck["global_step"] == 8 and ck["step_in_epoch"] > 0

    t_res = Trainer(cut_cfg, tmp_path / "cut", quiet=True)
    t_res.fit(resume=True)
    for (k, a), b in zip(t_full.model.state_dict().items(), t_res.model.state_dict().values(),
                         strict=True):
        assert torch.equal(a, b), k
    full_log = (tmp_path / "full" / "log.jsonl").read_text().splitlines()
    cut_log = (tmp_path / "cut" / "log.jsonl").read_text().splitlines()
    assert json.loads(full_log[-1])["train_loss"] == json.loads(cut_log[-1])["train_loss"]


def test_nan_loss_stops_with_a_clear_message(tmp_path):
    cfg = cfg_for(tmp_path, "name=nan", "train.epochs=2", "train.optimizer.lr=1e12",
                  "train.optimizer.momentum=0.0", "data.train_limit=300")
    t = Trainer(cfg, prepare_run_dir(cfg), quiet=True)
    with pytest.raises(TrainingDiverged) as exc:
        t.fit()
    msg = str(exc.value)
    assert "step" in msg and "last good checkpoint" in msg and "\n" not in msg


def test_existing_run_dir_is_not_overwritten(tmp_path):
    cfg = cfg_for(tmp_path, "name=dup", "train.epochs=0")
    prepare_run_dir(cfg)
    (tmp_path / "dup" / "keep.txt").write_text("x")
    with pytest.raises(UserError, match="already exists"):
        prepare_run_dir(cfg)
    assert (tmp_path / "dup" / "keep.txt").exists()


def test_only_rank_zero_draws_progress_bars(tmp_path, monkeypatch):
    """Under torchrun every process but rank 0 is quiet, whatever logging.progress says."""
    from robustfair.engine import distributed

    cfg = cfg_for(tmp_path, "logging.progress=true", "data.train_limit=64", "train.epochs=1")
    monkeypatch.setattr(distributed, "init", lambda device: (1, 1, None))
    assert Trainer(cfg, prepare_run_dir(cfg)).quiet
    monkeypatch.setattr(distributed, "init", lambda device: (0, 1, None))
    cfg = cfg_for(tmp_path, "name=r0", "logging.progress=true", "data.train_limit=64")
    assert not Trainer(cfg, prepare_run_dir(cfg)).quiet


def test_kill_between_last_and_best_copy_is_repaired_on_resume(tmp_path, monkeypatch,
                                                              one_thread):
    """A kill after last.pt is written but before it is copied to best.pt: resume makes the
    copy, so best.pt is never left behind at an older epoch."""
    cfg = cfg_for(tmp_path, "name=b", "data.train_limit=128", "train.epochs=1",
                  "validation.n=50", "validation.attack=fgsm", "model.name=mlp",
                  "model.params={hidden: [16]}")

    def killed(self):
        raise Interrupt

    monkeypatch.setattr(Trainer, "_copy_best", killed)
    with pytest.raises(Interrupt):
        Trainer(cfg, prepare_run_dir(cfg), quiet=True).fit()
    monkeypatch.undo()
    ck = tmp_path / "b" / "checkpoints"
    assert (ck / "last.pt").exists() and not (ck / "best.pt").exists()
    Trainer(cfg, tmp_path / "b", quiet=True).resume()
    assert (ck / "best.pt").read_bytes() == (ck / "last.pt").read_bytes()
    assert json.loads((ck / "best.json").read_text())["epoch"] == 1
