"""Nothing lost when a process dies, a disk fills or a file is damaged: each fault is injected
into the real process (a signal to its PID, an ``OSError`` raised by the write call itself, a
file cut or overwritten on disk), never by calling the error path directly."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import run_cli
from test_reliability import TINY, Payload, cli_proc

pytestmark = pytest.mark.usefixtures("one_thread")

#: the run's evaluation: cheap attacks on 60 test images
EVAL = {"attacks": ["clean", "fgsm"], "n": 60}


def _write_cfg(root: Path, **train) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    cfg = root / "tiny.yaml"
    cfg.write_text(yaml.safe_dump({**TINY, "output_dir": str(root / "runs"), "eval": EVAL,
                                   "train": {**TINY["train"], "epochs": 1, **train}}))
    return cfg


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A 1-epoch tiny run, evaluated (clean, fgsm), never changed: tests work on copies."""
    root = tmp_path_factory.mktemp("faults")
    cfg = _write_cfg(root)
    from robustfair.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["train", str(cfg), "--set", "name=r", "-q"])
    assert exc.value.code == 0
    return root / "runs" / "r"


def _copy(run: Path, tmp_path: Path, name: str = "r") -> Path:
    dst = tmp_path / "runs" / name
    shutil.copytree(run, dst)
    # the copy is its own run: its config says where it lives
    cfg = yaml.safe_load((dst / "config.yaml").read_text())
    cfg["output_dir"] = str(dst.parent)
    (dst / "config.yaml").write_text(yaml.safe_dump(cfg))
    return dst


def _snapshot(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` (the file list is the keys)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _one_line(err: str) -> str:
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _children(pid: int) -> list[int]:
    """PIDs of the running (not zombie) processes whose parent is ``pid``."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            out.append(int(d.name))
    return out


def _running(pids: list[int]) -> list[int]:
    alive = []
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            alive.append(pid)
    return alive


def _global_step(run: Path) -> int:
    try:
        return int(json.loads((run / "checkpoints" / "last.json").read_text())["global_step"])
    except (OSError, ValueError, KeyError):
        return 0


def _wait(cond, proc: subprocess.Popen, timeout: float = 120) -> None:  # noqa: ANN001
    deadline = time.time() + timeout
    while not cond():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() < deadline, "timed out"
        time.sleep(0.01)


# ------------------------------------------------------------------ 1: a worker killed mid-sweep
SWEEP = {"recipes": ["mnist5k-standard"], "seeds": [0, 1],
         "set": ["data.name=digits", "data.train_limit=600", "data.val_size=50",
                 "validation.every=0", "model.name=mlp", "model.params={hidden: [32]}",
                 "attack.eps=0.1", "attack.steps=2", "train.epochs=2", "train.batch_size=64",
                 "train.checkpoint_every_steps=1", "eval.attacks=[clean, fgsm]", "eval.n=60",
                 "logging.progress=false"]}


def _sweep_spec(tmp_path: Path) -> Path:
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(SWEEP))
    return spec


def _kill_a_trial_worker(args: list[str], tmp_path: Path, env: dict | None = None
                         ) -> tuple[subprocess.Popen, int, int]:
    """Run the sweep; SIGKILL the process training the second trial (the PID in its run's
    train.lock) once it has checkpointed 3 steps. Return the sweep's process, the killed PID
    and the step checkpointed when it was killed."""
    run = tmp_path / "out" / "runs" / "mnist5k-standard-s1"
    proc = subprocess.Popen([sys.executable, "-m", "robustfair.cli", *args], cwd=tmp_path,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait(lambda: _global_step(run) >= 3 and (run / "train.lock").exists(), proc, 240)
    pid = json.loads((run / "train.lock").read_text())["pid"]
    step = _global_step(run)
    assert pid != proc.pid  # a worker, not the sweep itself
    os.kill(pid, signal.SIGKILL)
    return proc, pid, step


def _check_resumed_sweep(proc: subprocess.Popen, tmp_path: Path, step: int) -> None:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    state = json.loads((tmp_path / "out" / "sweep.json").read_text())
    trials = {t["name"]: t for t in state["trials"]}
    assert {t["status"] for t in trials.values()} == {"done"}
    killed = trials["mnist5k-standard-s1"]
    assert killed["attempts"] >= 2, err
    # it continued from the checkpoint written before the kill, not from scratch
    assert killed["resumed_from"]["global_step"] >= step > 0
    runs = tmp_path / "out" / "runs"  # and trained to the end, as the trial not killed
    assert _global_step(runs / "mnist5k-standard-s1") == _global_step(runs / "mnist5k-standard-s0")
    assert "| mnist5k-standard | 2 |" in (tmp_path / "out" / "compare" / "compare.md").read_text()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_killed_pool_worker_reruns_its_trial_from_the_checkpoint(tmp_path):
    spec = _sweep_spec(tmp_path)
    proc, _, step = _kill_a_trial_worker(["sweep", str(spec), "--out", "out", "--workers", "2",
                                          "-q"], tmp_path)
    _check_resumed_sweep(proc, tmp_path, step)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_killed_ray_worker_reruns_its_trial_from_the_checkpoint(tmp_path):
    pytest.importorskip("ray", reason="Ray is not installed (pip install 'robustfair[ray]')")
    spec = _sweep_spec(tmp_path)
    # the sweep (and Ray) run in their own process: this one's signal handlers stay as they are
    proc, _, step = _kill_a_trial_worker(
        ["sweep", str(spec), "--out", "out", "--engine", "ray", "-q"], tmp_path,
        {"RAY_worker_niceness": "0"})
    _check_resumed_sweep(proc, tmp_path, step)


# ------------------------------------------------------------------ 2: SIGTERM and Ctrl-C
def _signal_after(args: list[str], cwd: Path, ready, sig: int) -> tuple[int, str, list[int]]:  # noqa: ANN001
    """Run the CLI, send ``sig`` to it once ``ready()``; return its exit status, stderr and
    the processes it had started that still run afterwards."""
    proc = cli_proc(args, cwd)
    _wait(ready, proc, 240)
    kids = _children(proc.pid)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    time.sleep(0.2)
    return proc.returncode, err, _running(kids)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_sigint_and_sigterm_to_a_study_stop_its_workers_and_the_rerun_continues(tmp_path):
    args = ["study", "disparity", "--epochs", "5", "--seeds", "2,3", "--ratios", "1",
            "--workers", "2", "-o", "st", "-q"]
    cells = tmp_path / "st" / "cells"

    def n_cells() -> int:
        return len(list(cells.glob("*.json"))) if cells.exists() else 0

    kept: dict[str, int] = {}
    for sig, status in ((signal.SIGINT, 130), (signal.SIGTERM, 143)):
        before = n_cells()
        code, err, left = _signal_after(args, tmp_path, lambda b=before: n_cells() > b, sig)
        assert code == status, err
        assert "run the same command again to continue" in _one_line(err)
        assert left == []  # no worker outlives the study
        for p in cells.glob("*.json"):
            kept.setdefault(p.name, p.stat().st_mtime_ns)
    proc = cli_proc(args, tmp_path)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert n_cells() == 14
    # the cells finished before the signals were kept, not computed again
    assert all((cells / name).stat().st_mtime_ns == t for name, t in kept.items())


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_sigterm_and_sigint_to_a_sweep_stop_its_workers_and_the_rerun_continues(tmp_path):
    spec = _sweep_spec(tmp_path)
    args = ["sweep", str(spec), "--out", "out", "--workers", "2", "-q"]
    runs = tmp_path / "out" / "runs"
    steps = {}
    for sig, status in ((signal.SIGTERM, 143), (signal.SIGINT, 130)):
        before = max((_global_step(r) for r in runs.glob("*")), default=0)
        code, err, left = _signal_after(
            args, tmp_path, lambda b=before: max((_global_step(r) for r in runs.glob("*")),
                                                 default=0) > b + 1, sig)
        assert code == status, err
        line = _one_line(err)
        assert f"continue with: robustfair sweep {spec} --out out --workers 2" in line
        assert left == []
        steps[sig] = {r.name: _global_step(r) for r in runs.glob("*")}
    proc = cli_proc(args, tmp_path)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    state = json.loads((tmp_path / "out" / "sweep.json").read_text())
    # the rerun continued each trial from its checkpoint
    resumed = [t for t in state["trials"] if t["action"] == "resume"]
    assert resumed, state["trials"]
    for t in resumed:
        assert t["resumed_from"]["global_step"] >= steps[signal.SIGINT][t["name"]] > 0
    assert {t["status"] for t in state["trials"]} == {"done"}


# ------------------------------------------------------------------ 3: disk full, no permission
class _Faults:
    """``os.write`` raising ENOSPC, or ``os.open`` raising EACCES, for the files whose name
    contains ``needle`` (the atomic writer's temporary file ``.NAME.XXXX.tmp`` included)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.mp = monkeypatch

    def enospc(self, needle: str) -> None:
        real = os.write

        def write(fd: int, data) -> int:  # noqa: ANN001
            if needle in os.readlink(f"/proc/self/fd/{fd}").rsplit("/", 1)[-1]:
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(fd, data)

        self.mp.setattr(os, "write", write)

    def eacces(self, needle: str) -> None:
        real = os.open

        def open_(path, flags, *a, **k):  # noqa: ANN001, ANN002, ANN003
            if needle in str(path) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
                raise PermissionError(errno.EACCES, "Permission denied", str(path))
            return real(path, flags, *a, **k)

        self.mp.setattr(os, "open", open_)


CASES = {
    # what is written: (the command, the file it writes, the file it must leave intact)
    "checkpoint": (["train", "{run}", "--resume", "--set", "train.epochs=2", "--no-eval", "-q"],
                   "last.pt", "checkpoints/last.pt"),
    "log.jsonl": (["train", "{run}", "--resume", "--set", "train.epochs=2", "--no-eval", "-q"],
                  "log.jsonl", "log.jsonl"),
    "summary": (["eval", "{run}", "--attack", "pgd3", "--n", "60", "-q"], "summary.json",
                "eval/summary.json"),
    "eval_state.json": (["eval", "{run}", "--attack", "pgd3", "--n", "60", "-q"],
                        "eval_state.json", "eval/summary.json"),
    "index.json": (["eval", "{run}", "--attack", "pgd3", "--n", "60", "-q"], "index.json",
                   "eval/index.json"),
    "report": (["report", "{run}", "--no-eps-curve", "-q"], "report.html", "report.html"),
}


@pytest.mark.parametrize("fault", ["enospc", "eacces"])
@pytest.mark.parametrize("case", list(CASES))
def test_a_full_disk_or_a_refused_write_keeps_the_previous_file(trained, tmp_path, capsys,
                                                                monkeypatch, case, fault):
    run = _copy(trained, tmp_path)
    argv, needle, kept = CASES[case]
    argv = [a.replace("{run}", str(run)) for a in argv]
    if case == "report":  # a previous report to keep
        assert run_cli(argv, capsys)[0] == 0
    before = (run / kept).read_bytes()
    getattr(_Faults(monkeypatch), fault)(needle)
    code, _, err = run_cli(argv, capsys)
    monkeypatch.undo()
    line = _one_line(err)
    assert code == 2 and needle in line, line
    assert ("no space left" if fault == "enospc" else "permission denied") in line
    assert (run / kept).read_bytes() == before  # the previous file, whole
    if kept.endswith(".json"):
        json.loads((run / kept).read_text())
    if case == "summary":  # the matrix beside it is the previous one too
        assert (run / "eval" / "summary_matrix.npz").read_bytes() == \
            (trained / "eval" / "summary_matrix.npz").read_bytes()
    assert not [p for p in run.rglob("*") if p.name.endswith((".tmp", ".pending"))]


def test_eval_into_a_folder_that_cannot_be_written_fails_before_evaluating(
        trained, tmp_path, capsys, monkeypatch):
    from robustfair.engine import staged

    calls = []
    real = staged.evaluate_staged
    monkeypatch.setattr(staged, "evaluate_staged",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    out = tmp_path / "locked"
    out.mkdir()
    _Faults(monkeypatch).eacces(str(out))
    code, _, err = run_cli(["eval", str(trained), "--attack", "fgsm", "--n", "60", "--out",
                            str(out), "-q"], capsys)
    assert code == 2 and f"cannot write {out}" in _one_line(err)
    assert calls == [] and list(out.iterdir()) == []


# ------------------------------------------------------------------ 4: damaged files
def _cut(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_damaged_record_files_are_refused_with_one_line(trained, tmp_path, capsys):
    cases = {
        "summary.json": ("eval/summary.json", [["eval", "--attack", "fgsm", "--n", "60"],
                                               ["report", "--no-eps-curve"], ["compare"]]),
        "summary_matrix.npz": ("eval/summary_matrix.npz",
                               [["eval", "--attack", "fgsm", "--n", "60"],
                                ["report", "--no-eps-curve"]]),
        "log.jsonl": ("log.jsonl", [["report", "--no-eps-curve"],
                                    ["train", "--resume", "--set", "train.epochs=2"]]),
    }
    for name, (rel, commands) in cases.items():
        run = _copy(trained, tmp_path / name)
        if name == "log.jsonl":  # a damaged line before the last one
            text = (run / rel).read_text()
            (run / rel).write_text("{not json\n" + text)
        else:
            _cut(run / rel)
        before = _snapshot(run)
        for cmd in commands:
            argv = [cmd[0], str(run), *cmd[1:], "-q"]
            if cmd[0] == "compare":
                argv += ["--out", str(tmp_path / name / "cmp")]
            if cmd[0] == "report":
                argv += ["--out", str(tmp_path / name / "r.html")]
            code, _, err = run_cli(argv, capsys)
            line = _one_line(err)
            assert code == 2 and name in line, (cmd, line)
            assert "damaged" in line or "not readable" in line, (cmd, line)
        assert _snapshot(run) == before, name  # nothing replaced what the damaged file held


def test_a_damaged_evaluation_state_is_refused_on_resume(trained, tmp_path, capsys,
                                                        monkeypatch):
    from robustfair.engine import staged

    run = _copy(trained, tmp_path)
    state = run / "eval" / "eval_state.json"
    argv = ["eval", str(run), "--attack", "fgsm,pgd3", "--n", "60", "--resume", "-q"]
    # a real state, left by an evaluation interrupted after its first attacks
    real = staged.EvalState.finish

    def stop_after_fgsm(self, row, *a):  # noqa: ANN001, ANN002
        real(self, row, *a)
        if row == "fgsm":
            raise KeyboardInterrupt

    monkeypatch.setattr(staged.EvalState, "finish", stop_after_fgsm)
    assert run_cli(argv, capsys)[0] == 130
    monkeypatch.undo()
    whole = state.read_text()
    flags = json.loads(whole)["rows"]["fgsm"]["correct"]
    damaged = {"truncated": whole[: len(whole) // 2],
               "flags overwritten": whole.replace(flags, "x" * len(flags)),
               "not an object": "[1, 2]"}
    for what, text in damaged.items():
        state.write_text(text)
        code, _, err = run_cli(argv, capsys)
        assert code == 2 and "eval_state.json" in _one_line(err), what
    state.write_text(whole)  # the intact state resumes
    assert run_cli(argv, capsys)[0] == 0


def test_a_damaged_index_is_rebuilt_from_the_evaluation_folders(trained, tmp_path, capsys):
    run = _copy(trained, tmp_path)
    # a second evaluation with other settings, in its own folder
    assert run_cli(["eval", str(run), "--attack", "fgsm", "--n", "30", "-q"], capsys)[0] == 0
    index = run / "eval" / "index.json"
    whole = json.loads(index.read_text())
    _cut(index)
    code, _, err = run_cli(["report", str(run), "--no-eps-curve", "-q"], capsys)
    assert code == 0 and "index.json is damaged" in _one_line(err)
    code, _, err = run_cli(["eval", str(run), "--attack", "pgd3", "--n", "60", "-q"], capsys)
    assert code == 0 and "rebuilt" in _one_line(err)
    rebuilt = json.loads(index.read_text())
    assert [e["summary"] for e in rebuilt["evaluations"]] == \
        [e["summary"] for e in whole["evaluations"]]
    main = next(e for e in rebuilt["evaluations"] if e["summary"] == "summary.json")
    assert main["attacks"] == ["clean", "fgsm", "pgd3"]
    summary = json.loads((run / "eval" / "summary.json").read_text())
    assert summary["attacks"]["fgsm"] == json.loads(
        (trained / "eval" / "summary.json").read_text())["attacks"]["fgsm"]


def test_a_torn_last_log_line_is_left_out(trained, tmp_path, capsys):
    run = _copy(trained, tmp_path)
    with open(run / "log.jsonl", "a") as f:
        f.write('{"epoch": 2, "lr"')
    code, _, err = run_cli(["report", str(run), "--no-eps-curve", "-q"], capsys)
    assert code == 0 and "Traceback" not in err


# ------------------------------------------------------------------ 5: a refused resume
@pytest.mark.parametrize("damage", ["truncated", "pickle"])
def test_a_refused_resume_leaves_the_run_byte_for_byte(trained, tmp_path, capsys, damage):
    run = _copy(trained, tmp_path)
    ck = run / "checkpoints" / "last.pt"
    marker = tmp_path / "pwned"
    if damage == "truncated":
        _cut(ck)
    else:
        torch.save({"model": Payload(str(marker))}, ck)
    meta = json.loads((run / "checkpoints" / "last.json").read_text())  # the sidecar agrees
    meta["sha256"] = hashlib.sha256(ck.read_bytes()).hexdigest()
    (run / "checkpoints" / "last.json").write_text(json.dumps(meta))
    # the lock of the killed process that trained it (PID 2**22 + 1: no such process)
    (run / "train.lock").write_text(json.dumps({"pid": 2**22 + 1, "host": socket.gethostname(),
                                                "since": time.time()}) + "\n")
    before = _snapshot(run)
    code, _, err = run_cli(["train", str(run), "--resume", "-q", "--no-eval"], capsys)
    line = _one_line(err)
    assert code == 2 and "last.pt" in line
    assert ("truncated" if damage == "truncated" else "refused") in line
    assert _snapshot(run) == before and not marker.exists()


# ------------------------------------------------------------------ 6: two evaluations at once
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_evaluations_of_one_run_at_once_never_half_merge(trained, tmp_path):
    run = _copy(trained, tmp_path)
    attacks = ["pgd20", "cw20"]
    procs = [cli_proc(["eval", str(run), "--attack", a, "--n", "60", "-q"], tmp_path)
             for a in attacks]
    results = [(p.wait(timeout=240), p.stderr.read()) for p in procs]
    summary = json.loads((run / "eval" / "summary.json").read_text())
    index = json.loads((run / "eval" / "index.json").read_text())
    (main,) = [e for e in index["evaluations"] if e["summary"] == "summary.json"]
    for attack, (code, err) in zip(attacks, results, strict=True):
        if code == 0:  # kept, in the summary and in the index
            assert attack in summary["attacks"] and attack in main["attacks"]
        else:  # refused, naming the process that holds the run
            assert code == 2 and "being written by another evaluation, PID" in _one_line(err)
            assert attack not in summary["attacks"]
    assert sum(code == 0 for code, _ in results) >= 1
    assert set(main["attacks"]) == set(summary["attacks"])
    assert not (run / "eval" / "eval.lock").exists()


# ------------------------------------------------------------------ 7: torchrun
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_eval_under_torchrun_draws_and_prints_on_the_first_process_only(trained, tmp_path):
    run = _copy(trained, tmp_path)
    logs = tmp_path / "logs"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc_per_node=2", "--redirects", "3", "--log-dir", str(logs),
                        "-m", "robustfair.cli", "eval", str(run), "--attack", "pgd3",
                        "--set", "eval.n=60"], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=500)
    assert r.returncode == 0, r.stderr[-3000:]
    err = {int(p.parent.name): p.read_text() for p in logs.rglob("stderr.log")}
    out = {int(p.parent.name): p.read_text() for p in logs.rglob("stdout.log")}
    assert sorted(err) == [0, 1]
    assert "img" in err[0]  # the first process draws its bar
    assert "img" not in err[1] and "points attacked" not in err[1], err[1][-2000:]
    assert "accuracy (%) per class" in out[0] and out[1].strip() == ""
    summary = json.loads((run / "eval" / "summary.json").read_text())
    assert "pgd3" in summary["attacks"]
