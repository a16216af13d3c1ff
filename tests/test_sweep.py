"""``robustfair sweep``: spec expansion, a 2×2 sweep killed mid-way and resumed without
retraining finished runs, the comparison table, and the same sweep as Ray tasks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from robustfair.errors import UserError
from robustfair.sweep import expand, load_spec, run_sweep

MINIMAL = """\
recipes: [mnist5k-standard, mnist5k-trades]
seeds: [0, 1]
set: [train.epochs=1, data.train_limit=300]
"""
#: the two reduced recipes on tiny data: digits, 200 training images, one epoch, 100 test images
TINY = {"recipes": ["mnist5k-standard", "mnist5k-trades"], "seeds": [0, 1],
        "set": ["train.epochs=1", "data.name=digits", "data.train_limit=200", "data.val_size=50",
                "validation.every=0", "attack.eps=0.1", "attack.steps=2",
                "eval.attacks=[clean, pgd5]", "eval.n=100", "model.params.width=0.25"]}


def _spec(tmp_path: Path, raw: dict | str, name: str = "spec") -> Path:
    p = tmp_path / f"{name}.yaml"
    p.write_text(raw if isinstance(raw, str) else yaml.safe_dump(raw))
    return p


def test_minimal_spec_expands_to_four_trials(tmp_path):
    trials = expand(load_spec(_spec(tmp_path, MINIMAL, "minimal")))
    assert [t.name for t in trials] == ["mnist5k-standard-s0", "mnist5k-standard-s1",
                                        "mnist5k-trades-s0", "mnist5k-trades-s1"]
    assert all(t.overrides == ["train.epochs=1", "data.train_limit=300"] for t in trials)


def test_grid_is_a_product_and_zip_advances_together(tmp_path):
    spec = load_spec(_spec(tmp_path, {
        "recipes": ["mnist5k-standard", {"recipe": "mnist5k-trades", "label": "T",
                                         "set": ["method.objective.beta=3"]}],
        "seeds": [0], "grid": {"attack.eps": [0.1, 0.2]},
        "zip": {"train.epochs": [1, 2], "train.batch_size": [32, 64]}}))
    trials = expand(spec)
    assert len(trials) == 2 * 2 * 2
    pts = {(t.row.split("_")[0], t.axes["attack.eps"], t.axes["train.epochs"],
            t.axes["train.batch_size"]) for t in trials}
    assert ("T", 0.2, 2, 64) in pts and ("T", 0.2, 1, 64) not in pts
    t = next(t for t in trials if t.row.startswith("T"))
    assert t.overrides[:1] == ["method.objective.beta=3"] and "attack.eps=0.1" in t.overrides


@pytest.mark.parametrize("raw,match", [
    ({"seeds": [0]}, "recipes: required"),
    ({"recipes": ["mnist5k-standard"], "zip": {"a.b": [1], "c": [1, 2]}}, "same length"),
    ({"recipes": ["mnist5k-standard"], "sets": []}, "sets: unknown key"),
    ({"recipes": ["mnist5k-standard"], "compare": {"baseline": "x"}}, "none of the rows"),
])
def test_spec_mistakes_are_one_line(tmp_path, raw, match):
    with pytest.raises(UserError, match=match):
        load_spec(_spec(tmp_path, raw))


def test_bad_override_names_the_trial(tmp_path, capsys):
    from robustfair.cli import main

    p = _spec(tmp_path, {"recipes": ["mnist5k-standard"], "set": ["train.epochz=1"]})
    with pytest.raises(SystemExit) as exit_info:
        main(["sweep", str(p), "--dry-run", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.strip().splitlines()) == 1
    assert "mnist5k-standard-s0" in err and "epochz" in err
    assert not (tmp_path / "out").exists()  # nothing half-written


def _summary_mtime(run: Path) -> int:
    return (run / "eval" / "summary.json").stat().st_mtime_ns


@pytest.mark.timeout(600)
def test_sweep_killed_and_resumed_writes_compare(tmp_path):
    spec = _spec(tmp_path, TINY, "tiny")
    runs = tmp_path / "out" / "runs"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "robustfair.cli", "sweep", str(spec), "-q",
                             "--workers", "1", "--out", str(tmp_path / "out")], cwd=tmp_path,
                            env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    second = runs / "mnist5k-standard-s1"
    deadline = time.time() + 300
    while not (second / "config.yaml").exists():  # the second run has started: kill the sweep
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.time() < deadline
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    first = runs / "mnist5k-standard-s0"
    assert (first / "eval" / "summary.json").exists()
    assert not (second / "eval" / "summary.json").exists()
    before = _summary_mtime(first)

    res = run_sweep(load_spec(spec), tmp_path / "out", workers=2)
    actions = {p.trial.name: p.action for p in res.planned}
    assert actions == {"mnist5k-standard-s0": "skip", "mnist5k-standard-s1": "resume",
                       "mnist5k-trades-s0": "train", "mnist5k-trades-s1": "train"}
    assert not res.failed and _summary_mtime(first) == before  # not retrained
    table = res.compare["markdown"].read_text()
    assert "| mnist5k-standard | 2 |" in table and "| mnist5k-trades | 2 |" in table
    assert "±" in table and "robust = pgd5" in table
    paired = res.compare["paired"].read_text()  # seeds 0 and 1 on both rows: one interval row
    assert "| mnist5k-trades | 0,1 |" in paired and "Paired differences against" in paired
    # a third call has nothing left to do
    again = run_sweep(load_spec(spec), tmp_path / "out", workers=2)
    assert {p.action for p in again.planned} == {"skip"}


@pytest.mark.timeout(600)
def test_sweep_on_ray(tmp_path):
    pytest.importorskip("ray", reason="Ray is not installed (pip install 'robustfair[ray]')")
    spec = load_spec(_spec(tmp_path, TINY, "ray"))
    res = run_sweep(spec, tmp_path / "out", engine="ray")
    assert not res.failed, [p.error for p in res.failed]
    assert all((p.run_dir / "eval" / "summary.json").exists() for p in res.planned)
    assert "| mnist5k-trades | 2 |" in res.compare["markdown"].read_text()
