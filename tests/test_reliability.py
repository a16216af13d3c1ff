"""Nothing lost, nothing run that should not be: kills at random moments, hostile files and
fuzzed input."""

from __future__ import annotations

import json
import os
import pickle
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from robustfair.cli import main
from robustfair.config import load_config
from robustfair.engine.io import load_checkpoint
from robustfair.errors import UserError

from conftest import run_cli

TINY = {
    "seed": 3, "deterministic": True,
    "data": {"name": "digits", "train_limit": 600},
    "model": {"name": "mlp", "params": {"hidden": [32]}},
    "method": {"objective": {"name": "pgd_at"}},
    "attack": {"eps": 0.1, "step_size": 0.03, "steps": 3},
    "train": {"epochs": 3, "batch_size": 64, "checkpoint_every_steps": 1,
              "optimizer": {"lr": 0.05}},
    "validation": {"n": 50, "attack": "fgsm"},
    "logging": {"progress": False},
}


def cli_proc(args: list[str], cwd: Path) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "robustfair.cli", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run / "checkpoints" / "last.pt")["model"]


def _progress(run: Path) -> int:
    try:
        return int(json.loads((run / "checkpoints" / "last.json").read_text())["global_step"])
    except (OSError, ValueError, KeyError):
        return 0


def _run_until(args: list[str], cwd: Path, should_kill) -> bool:  # noqa: ANN001
    """Run; SIGKILL as soon as ``should_kill()`` is true. Return whether it was killed."""
    p = cli_proc(args, cwd)
    while p.poll() is None:
        if should_kill():
            p.send_signal(signal.SIGKILL)
            p.wait()
            return True
        time.sleep(0.002)
    assert p.returncode == 0, p.stderr.read()
    return False


@pytest.mark.timeout(900)
def test_sigkill_at_random_moments_then_resume_is_bit_exact(tmp_path, capsys, one_thread):
    """Kill a training process (SIGKILL) at random steps and once in the middle of a checkpoint
    write, resume each time, and end with the very weights of an uninterrupted run."""
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump({**TINY, "output_dir": str(tmp_path / "runs")}))
    # the reference, uninterrupted, in this process (one thread, as the killed processes)
    code, _, err = run_cli(["train", str(cfg), "--set", "name=ref", "--no-eval", "-q"], capsys)
    assert code == 0, err
    total = _progress(tmp_path / "runs" / "ref")  # 3 epochs of 10 steps
    cut = tmp_path / "runs" / "cut"
    ck = cut / "checkpoints"
    args = ["train", str(cfg), "--set", "name=cut", "--no-eval", "-q"]
    rng = random.Random(0)
    targets = sorted(rng.sample(range(2, total - 1), 2))
    plans = [lambda t=t: _progress(cut) >= t for t in targets]
    # then while a checkpoint is being written (its temporary file exists), and between its
    # two files (the bytes wait beside the old checkpoint for the sidecar), if those are caught
    plans.append(lambda: ck.exists() and any(ck.glob(".*.tmp")))
    plans.append(lambda: (ck / ".last.pt.pending").exists())
    killed = 0
    for plan in plans:
        resume = (cut / "config.yaml").exists()
        killed += _run_until(args + (["--resume"] if resume else []), tmp_path, plan)
    assert not _run_until(args + ["--resume"], tmp_path, lambda: False)
    assert killed >= 2
    a, b = weights(tmp_path / "runs" / "ref"), weights(cut)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    log_ref = (tmp_path / "runs" / "ref" / "log.jsonl").read_text().splitlines()
    log_cut = (cut / "log.jsonl").read_text().splitlines()
    assert len(log_cut) == 3 and [json.loads(x)["train_loss"] for x in log_cut] == [
        json.loads(x)["train_loss"] for x in log_ref]
    assert not list(ck.glob(".*.tmp"))


class Payload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_malicious_pickle_is_refused_and_does_not_run(tmp_path):
    marker = tmp_path / "pwned"
    bad = tmp_path / "evil.pt"
    torch.save({"model": Payload(str(marker))}, bad)
    with pytest.raises(UserError, match="refused"):
        load_checkpoint(bad)
    assert not marker.exists()
    with open(tmp_path / "evil2.pt", "wb") as f:
        pickle.dump(Payload(str(marker)), f)
    with pytest.raises(UserError):
        load_checkpoint(tmp_path / "evil2.pt")
    assert not marker.exists()


def _trained_run(tmp_path: Path) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump({**TINY, "output_dir": str(tmp_path / "runs"),
                                   "train": {**TINY["train"], "epochs": 1}}))
    with pytest.raises(SystemExit) as exc:
        main(["train", str(cfg), "--set", "name=r", "--no-eval", "-q"])
    assert exc.value.code == 0
    return tmp_path / "runs" / "r"


def test_broken_checkpoints_give_one_line_errors(tmp_path, capsys):
    run = _trained_run(tmp_path)
    ck = run / "checkpoints" / "last.pt"
    good = ck.read_bytes()
    (run / "checkpoints" / "last.json").unlink()  # reach the loader, past the sha256 check
    before = sorted(p.name for p in run.rglob("*"))
    cases = {
        "truncated": (good[: len(good) // 2], "truncated"),
        "html": (b"<!DOCTYPE html><html><body>Google Drive</body></html>", "HTML page"),
        "empty": (b"", "empty"),
    }
    for _name, (data, needle) in cases.items():
        ck.write_bytes(data)
        with pytest.raises(SystemExit) as exc:
            main(["train", str(run), "--resume", "-q", "--no-eval"])
        err = capsys.readouterr().err.strip().splitlines()
        assert exc.value.code == 2 and len(err) == 1 and needle in err[0], err
    # a modified checkpoint no longer matches the sha256 recorded beside it
    ck.write_bytes(good)
    run2 = _trained_run(tmp_path / "b")
    data = bytearray((run2 / "checkpoints" / "last.pt").read_bytes())
    data[-10] ^= 0xFF
    (run2 / "checkpoints" / "last.pt").write_bytes(bytes(data))
    with pytest.raises(SystemExit) as exc:
        main(["eval", str(run2), "-q"])
    assert exc.value.code == 2 and "sha256" in capsys.readouterr().err
    assert sorted(p.name for p in run.rglob("*")) == before


def test_checkpoint_of_another_model_is_refused(tmp_path, capsys):
    run = _trained_run(tmp_path)
    with pytest.raises(SystemExit) as exc:  # the run's record would be false
        main(["train", str(run), "--resume", "-q", "--set", "model.params.hidden=[16]"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "cannot change model.params.hidden" in err
    cfg = run / "config.yaml"  # edited by hand: the checkpoint no longer fits, and says why
    cfg.write_text(cfg.read_text().replace("- 32", "- 16"))
    with pytest.raises(SystemExit) as exc:
        main(["train", str(run), "--resume", "-q"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "does not fit this model (other shape: " in err


def test_injected_nan_stops_the_run(tmp_path, monkeypatch):
    from robustfair.commands.run import train_run
    from robustfair.engine.trainer import TrainingDiverged
    from robustfair.objectives.basic import PGDAT

    original = PGDAT.forward
    calls = {"n": 0}

    def poisoned(self, *a, **k):
        out = original(self, *a, **k)
        calls["n"] += 1
        if calls["n"] == 5:
            out.terms["robust"] = out.terms["robust"] * float("nan")
        return out

    monkeypatch.setattr(PGDAT, "forward", poisoned)
    raw = {**TINY, "output_dir": str(tmp_path)}
    from robustfair.config import build_config

    cfg = build_config(raw)
    with pytest.raises(TrainingDiverged, match=r"step 5 .*last good checkpoint: .*last\.pt"):
        train_run(cfg, quiet=True, evaluate=False)


KEYS = ["data", "model", "method", "attack", "train", "eval", "name", "seed", "epochs", "eps",
        "objective", "beta", "norm", "steps", "lr", "optimizer", "schedule", "attacks", "budget"]
values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 10**6) | st.floats(allow_nan=True) |
    st.text(max_size=12),
    lambda children: st.lists(children, max_size=3) |
    st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=6), children, max_size=4),
    max_leaves=12,
)


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.dictionaries(st.sampled_from(KEYS), values, max_size=5))
def test_fuzzed_configs_only_ever_raise_user_errors(tmp_path_factory, raw):
    p = tmp_path_factory.mktemp("fuzz") / "c.yaml"
    p.write_text(yaml.safe_dump(raw))
    try:
        load_config(p)
    except UserError as exc:
        assert "\n" not in str(exc)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(st.text(max_size=25), min_size=1, max_size=3))
def test_fuzzed_set_values_on_the_command_line(capsys, sets):
    args = ["train", "--recipe", "mnist5k-trades", "--check", "--set", "data.name=digits"]
    for s in sets:
        args += ["--set", s]
    try:
        main(args)
    except SystemExit as exc:
        assert exc.code in (0, 2), exc.code
    err = capsys.readouterr().err
    assert "Traceback" not in err


class _Killed(BaseException):
    """Stands for a SIGKILL at one moment of a checkpoint write."""


@pytest.mark.parametrize("moment", ["after the bytes", "after the sidecar"])
def test_kill_inside_a_checkpoint_write_leaves_a_pair_that_resume_completes(
        tmp_path, capsys, monkeypatch, moment):
    """The two files of a checkpoint (the .pt and the .json naming its sha256) are written so
    that a kill between any two of their writes never leaves a checkpoint refused as modified:
    a kill before the sidecar keeps the previous pair, a kill after it is completed by
    --resume (and named, not called corrupted, by anything that reads it before)."""
    from robustfair.engine import io as rio

    run = _trained_run(tmp_path)
    ck = run / "checkpoints" / "last.pt"
    old = load_checkpoint(ck)
    new_state = {**old, "best_metric": 0.123456}
    buf = __import__("io").BytesIO()
    torch.save(new_state, buf)
    target = rio.atomic_write_bytes if moment == "after the bytes" else rio.atomic_write_json

    def write_then_die(*a, **k):  # noqa: ANN002, ANN003
        target(*a, **k)
        raise _Killed

    monkeypatch.setattr(rio, target.__name__, write_then_die)
    with pytest.raises(_Killed):
        rio.save_with_sidecar(ck, buf.getvalue(), json.loads(ck.with_suffix(".json").read_text()))
    monkeypatch.undo()
    assert rio.pending_path(ck).exists()
    with pytest.raises(SystemExit) as exc:
        main(["eval", str(run), "-q", "--attack", "fgsm", "--n", "20"])
    err = capsys.readouterr().err.strip().splitlines()
    if moment == "after the bytes":  # the previous pair is whole and is used
        assert exc.value.code == 0, err
    else:
        assert exc.value.code == 2 and len(err) == 1 and "--resume" in err[0], err
        assert "interrupted" in err[0] and "sha256" not in err[0]
    with pytest.raises(SystemExit) as exc:
        main(["train", str(run), "--resume", "-q", "--no-eval"])
    assert exc.value.code == 0, capsys.readouterr().err
    assert not rio.pending_path(ck).exists()
    want = old if moment == "after the bytes" else new_state
    assert load_checkpoint(ck)["best_metric"] == want["best_metric"]
