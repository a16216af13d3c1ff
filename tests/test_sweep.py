"""``robustfair sweep``: spec expansion, a 2×2 sweep killed mid-way and resumed without
retraining finished runs, the comparison table, and the same sweep as Ray tasks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import yaml

from robustfair.engine.io import sha256_file
from robustfair.errors import UserError
from robustfair.sweep import expand, load_spec, plan, run_sweep

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
    ({"recipes": ["mnist5k-standard"], "grid": {"attack.eps": [0.1, 0.2]},
      "zip": {"attack.eps": [0.1, 0.2], "train.epochs": [1, 2]}}, "'attack.eps' is in both"),
    ("recipes: [mnist5k-standard]\n1: x\n", "top-level key 1 is not a name"),
])
def test_spec_mistakes_are_one_line(tmp_path, raw, match):
    with pytest.raises(UserError, match=match):
        load_spec(_spec(tmp_path, raw))


def test_spec_not_utf8_is_one_line(tmp_path):
    p = tmp_path / "latin1.yaml"
    p.write_bytes("recipes: [mnist5k-standard]\ndescription: caf\u00e9\n".encode("latin-1"))
    with pytest.raises(UserError, match="not UTF-8"):
        load_spec(p)


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
    # a summary of another checkpoint than the last (an evaluation made before training ended)
    # is not finished: the trial resumes, which only evaluates it again
    stale = runs / "mnist5k-trades-s1" / "eval" / "summary.json"
    summary = json.loads(stale.read_text())
    summary["settings"]["sha256"] = "0" * 64
    stale.write_text(json.dumps(summary))
    again = run_sweep(load_spec(spec), tmp_path / "out", workers=2)
    assert [p.trial.name for p in again.planned if p.action != "skip"] == ["mnist5k-trades-s1"]
    assert not again.failed and "| mnist5k-trades | 2 |" in again.compare["markdown"].read_text()
    # then nothing is left to do
    assert {p.action for p in plan(load_spec(spec), tmp_path / "out")} == {"skip"}


@pytest.mark.timeout(600)
def test_sweep_on_ray(tmp_path, monkeypatch):
    pytest.importorskip("ray", reason="Ray is not installed (pip install 'robustfair[ray]')")
    # Ray starts its workers at nice 15: beside a busy test process they would barely run
    monkeypatch.setenv("RAY_worker_niceness", "0")
    spec = load_spec(_spec(tmp_path, TINY, "ray"))
    res = run_sweep(spec, tmp_path / "out", engine="ray")
    assert not res.failed, [p.error for p in res.failed]
    assert all((p.run_dir / "eval" / "summary.json").exists() for p in res.planned)
    assert "| mnist5k-trades | 2 |" in res.compare["markdown"].read_text()


# --------------------------------------------------------------- planning on fake run folders
def _fake_run(p, epoch: int = 1, step: int = 0, evaluated: str | None = "last",
              eps: float = 0.1, acc: float = 0.5) -> None:
    """A run folder as training leaves it: config, checkpoint at ``epoch`` + ``step`` and, with
    ``evaluated``, a summary of the last checkpoint ("last") or of an earlier one ("earlier")."""
    ckpt = p.run_dir / "checkpoints" / "last.pt"
    ckpt.parent.mkdir(parents=True)
    (p.run_dir / "config.yaml").write_text(p.config)
    ckpt.write_bytes(f"{p.trial.name} {epoch} {step}".encode())
    (ckpt.parent / "last.json").write_text(json.dumps(
        {"epoch": epoch, "step_in_epoch": step, "global_step": 4 * epoch + step}))
    if evaluated is None:
        return
    sha = sha256_file(ckpt) if evaluated == "last" else "0" * 64
    fig = {"avg": acc, "worst": acc / 2}
    (p.run_dir / "eval").mkdir()
    (p.run_dir / "eval" / "summary.json").write_text(json.dumps({
        "n": 100, "num_classes": 10, "attacks": {"clean": fig, "pgd5": fig},
        "settings": {"eps": eps, "norm": "linf", "sha256": sha,
                     "attacks": [{"attack": "pgd5", "steps": 5}]}}))


def _one(**extra) -> dict:
    return {**TINY, "recipes": ["mnist5k-standard"], "seeds": [0], **extra}


def test_a_summary_that_is_not_of_the_final_checkpoint_is_not_finished(tmp_path):
    """``robustfair eval`` on a killed run writes eval/summary.json: the trial still resumes."""
    spec = load_spec(_spec(tmp_path, _one(seeds=[0, 1, 2])))
    killed, stale, done = plan(spec, tmp_path / "out")
    _fake_run(killed, epoch=0, step=3)  # evaluated mid-training
    _fake_run(stale, evaluated="earlier")  # trained on after that evaluation
    _fake_run(done)
    assert [p.action for p in plan(spec, tmp_path / "out")] == ["resume", "resume", "skip"]


def test_a_run_evaluated_on_its_best_checkpoint_is_finished(tmp_path):
    """With eval.checkpoint=best the main evaluation is of best.pt: that run is complete."""
    raw = _one()
    raw["set"] = [*raw["set"], "eval.checkpoint=best"]
    spec = load_spec(_spec(tmp_path, raw))
    (p,) = plan(spec, tmp_path / "out")
    _fake_run(p, evaluated=None)
    best = p.run_dir / "checkpoints" / "best.pt"
    best.write_bytes(b"an earlier epoch")
    (p.run_dir / "eval").mkdir()
    (p.run_dir / "eval" / "summary.json").write_text(json.dumps({
        "n": 100, "num_classes": 10, "attacks": {"clean": {"avg": 0.5, "worst": 0.2}},
        "settings": {"eps": 0.1, "norm": "linf", "sha256": sha256_file(best)}}))
    assert [q.action for q in plan(spec, tmp_path / "out")] == ["skip"]


def test_a_setting_added_since_is_no_change(tmp_path):
    """A run made before train.sync_bn existed is the same config, not one to retrain."""
    spec = load_spec(_spec(tmp_path, _one()))
    (p,) = plan(spec, tmp_path / "out")
    _fake_run(p)
    raw = yaml.safe_load(p.config)
    del raw["train"]["sync_bn"]
    (p.run_dir / "config.yaml").write_text(yaml.safe_dump(raw))
    assert [q.action for q in plan(spec, tmp_path / "out")] == ["skip"]


def test_a_killed_trial_resumes_when_the_sweep_folder_is_named_another_way(tmp_path,
                                                                          monkeypatch):
    from robustfair.config import build_config
    from robustfair.engine.history import record_resume_changes

    monkeypatch.chdir(tmp_path)
    spec = load_spec(_spec(tmp_path, _one()))
    (p,) = plan(spec, Path("out"))  # started as --out out, killed after a checkpoint
    _fake_run(p, epoch=0, step=2, evaluated=None)
    (q,) = plan(spec, tmp_path / "out")  # continued as --out /abs/out
    assert q.action == "resume" and yaml.safe_load(q.config)["output_dir"] == "out/runs"
    assert record_resume_changes(build_config(yaml.safe_load(q.config)), q.run_dir) == {}


def test_a_sweep_over_eps_gets_a_table_and_stale_files_go(tmp_path):
    spec = load_spec(_spec(tmp_path, _one(grid={"attack.eps": [0.1, 0.2]})))
    out = tmp_path / "out"
    for p, eps in zip(plan(spec, out), (0.1, 0.2), strict=True):
        _fake_run(p, eps=eps, acc=eps * 4)
    (out / "compare").mkdir(parents=True)
    (out / "compare" / "paired.md").write_text("from an earlier call with two seeds")
    res = run_sweep(spec, out, workers=1)  # every trial finished: nothing trains
    assert {p.action for p in res.planned} == {"skip"} and res.compare, res.notes
    table = res.compare["markdown"].read_text()
    assert "| mnist5k-standard_eps0.1 | 1 |" in table and "| mnist5k-standard_eps0.2 | 1 |" in table
    rows = {line.split(" | ")[0]: line for line in table.splitlines()}
    assert "| 0.1 | linf | 1 |" in rows["| mnist5k-standard_eps0.1"]
    assert "| 0.2 | linf | 1 |" in rows["| mnist5k-standard_eps0.2"]
    assert "ε differs by row" in table
    assert not (out / "compare" / "paired.md").exists()  # one seed: no intervals, none stale


# ------------------------------------------------------------------ crashes and interruptions
def _maybe_crash(payload: int) -> int:
    if payload < 0:
        time.sleep(1.0)
        os._exit(3)  # as a worker killed by the kernel (out of memory) dies: no exception
    return payload * 10


@pytest.mark.timeout(300)
def test_a_dead_local_worker_fails_its_job_and_the_others_go_on():
    from robustfair.sweep import run_jobs

    got = dict(run_jobs(_maybe_crash, [1, -1, 2, 3, 4], workers=2,
                        on_crash=lambda p, why: ("crashed", p, why)))
    assert sorted(got) == [0, 1, 2, 3, 4]
    assert got[1][:2] == ("crashed", -1) and "died" in got[1][2]
    assert {i: got[i] for i in (0, 2, 3, 4)} == {0: 10, 2: 20, 3: 30, 4: 40}


class _RayError(Exception):
    pass


class _FakeRay(types.ModuleType):
    """Just enough of Ray for the sweep: tasks run here, the first one's worker "crashes"."""

    exceptions = types.SimpleNamespace(
        RayError=_RayError, RayTaskError=type("RayTaskError", (_RayError,), {}),
        WorkerCrashedError=type("WorkerCrashedError", (_RayError,), {}))

    def __init__(self) -> None:
        super().__init__("ray")
        self.payloads: list[dict] = []

    def is_initialized(self) -> bool:
        return True

    def cluster_resources(self) -> dict:
        return {"CPU": 2}

    def remote(self, fn):  # noqa: ANN001
        fake = self

        class Task:
            def options(self, **_):  # noqa: ANN003
                return self

            def remote(self, payload):  # noqa: ANN001
                fake.payloads.append(payload)
                return len(fake.payloads) - 1

        return Task()

    def wait(self, refs, num_returns=1):  # noqa: ANN001
        return refs[:num_returns], refs[num_returns:]

    def get(self, ref):  # noqa: ANN001
        if ref == 0:
            raise self.exceptions.WorkerCrashedError("the worker died unexpectedly")
        return {"name": self.payloads[ref]["name"], "ok": True, "seconds": 0.0}

    def cancel(self, ref, force=False):  # noqa: ANN001
        pass


def test_ray_worker_crash_fails_one_trial_and_paths_are_absolute(tmp_path, monkeypatch):
    fake = _FakeRay()
    monkeypatch.setitem(sys.modules, "ray", fake)
    monkeypatch.chdir(tmp_path)
    spec = load_spec(_spec(tmp_path, TINY))
    res = run_sweep(spec, Path("out"), engine="ray", compare=False, retries=0)
    assert [p.status for p in res.planned] == ["failed", "done", "done", "done"]
    assert "WorkerCrashedError" in res.planned[0].error
    for payload in fake.payloads:
        assert Path(payload["run_dir"]).is_absolute()
        assert Path(yaml.safe_load(payload["config"])["output_dir"]).is_absolute()
    state = json.loads((tmp_path / "out" / "sweep.json").read_text())
    assert [t["status"] for t in state["trials"]] == ["failed", "done", "done", "done"]
    # by default a trial whose worker died is run again (here the second run succeeds)
    fake.payloads.clear()
    res = run_sweep(spec, Path("out2"), engine="ray", compare=False)
    assert [p.status for p in res.planned] == ["done"] * 4
    assert [p.attempts for p in res.planned] == [2, 1, 1, 1]
    assert [p["name"] for p in fake.payloads][-1] == res.planned[0].trial.name


def test_ctrl_c_is_an_interruption_with_the_command_to_continue(tmp_path, capsys, monkeypatch):
    import robustfair.sweep
    from robustfair.cli import main

    def interrupted(*args, **kwargs):  # noqa: ANN002, ANN003
        raise KeyboardInterrupt

    monkeypatch.setattr(robustfair.sweep, "run_sweep", interrupted)
    p = _spec(tmp_path, _one())
    with pytest.raises(SystemExit) as exit_info:
        main(["sweep", str(p), "--out", str(tmp_path / "out"), "--set", "train.epochs=2"])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 130 and len(err.splitlines()) == 1
    assert not err.startswith("error:")
    assert f"robustfair sweep {p} --out {tmp_path / 'out'} --set train.epochs=2" in err
