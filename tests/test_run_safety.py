"""Runs keep a true record: settings changed on --resume are recorded or refused, one trainer per
run directory, comparisons only of runs measured alike, read-only folders and Ctrl-C end in one
line, files honour the umask, and error messages say what is wrong."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
import yaml

from conftest import run_cli
from robustfair.engine.io import atomic_write_text, load_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {
    "seed": 0,
    "data": {"name": "digits", "train_limit": 200, "val_size": 0},
    "model": {"name": "mlp", "params": {"hidden": [16]}},
    "method": {"objective": {"name": "pgd_at"}},
    "attack": {"eps": 0.1, "step_size": 0.05, "steps": 1},
    "train": {"epochs": 1, "batch_size": 50, "optimizer": {"lr": 0.05},
              "schedule": {"name": "constant"}},
    "validation": {"every": 0},
    "eval": {"attacks": ["clean", "fgsm"], "n": 40},
    "logging": {"progress": False},
}


def write_cfg(root: Path, **train) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    cfg = root / "tiny.yaml"
    cfg.write_text(yaml.safe_dump({**TINY, "output_dir": str(root / "runs"),
                                   "train": {**TINY["train"], **train}}))
    return cfg


def one_error_line(err: str) -> str:
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("safety")


@pytest.fixture
def trained(trained_once: Path, tmp_path: Path) -> Path:
    """A copy of the trained run for one test (what a test writes into it stays in its copy)."""
    copy = tmp_path / "shared-run" / trained_once.name
    shutil.copytree(trained_once, copy)
    return copy


@pytest.fixture(scope="module")
def trained_once(base: Path) -> Path:
    """A 1-epoch run, evaluated, written under umask 022."""
    from robustfair.cli import main

    cfg = write_cfg(base / "trained")
    old = os.umask(0o022)
    try:
        with pytest.raises(SystemExit) as exc:
            main(["train", str(cfg), "--set", "name=r", "-q"])
    finally:
        os.umask(old)
    assert exc.value.code == 0
    return base / "trained" / "runs" / "r"


# ----------------------------------------------------------------------- 1: --resume --set
def test_resume_override_is_recorded_and_a_false_one_refused(tmp_path, capsys):
    cfg = write_cfg(tmp_path)
    run = tmp_path / "runs" / "r"
    assert run_cli(["train", str(cfg), "--set", "name=r", "--no-eval", "-q"], capsys)[0] == 0
    code, _, err = run_cli(["train", str(run), "--resume", "--set", "train.epochs=2",
                            "--set", "train.optimizer.lr=0.01", "--no-eval", "-q"], capsys)
    assert code == 0, err
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["train"]["epochs"] == 2 and saved["train"]["optimizer"]["lr"] == 0.01
    (entry,) = [json.loads(x) for x in (run / "config_history.jsonl").read_text().splitlines()]
    assert entry["from"] == {"epoch": 1, "step_in_epoch": 0, "global_step": 4}
    assert entry["changes"] == {"train.epochs": {"old": 1, "new": 2},
                                "train.optimizer.lr": {"old": 0.05, "new": 0.01}}
    log = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    assert [x["lr"] for x in log] == [0.05, 0.01]  # the override took effect in epoch 2

    # a change the checkpoint cannot follow is refused, and nothing is written
    before = (run / "config.yaml").read_bytes()
    code, _, err = run_cli(["train", str(run), "--resume", "--set", "model.params.hidden=[8]",
                            "--no-eval", "-q"], capsys)
    assert code == 2 and "model.params.hidden" in one_error_line(err)
    assert (run / "config.yaml").read_bytes() == before

    # a finished run is not trained or evaluated again
    mtime = (run / "checkpoints" / "last.pt").stat().st_mtime_ns
    code, out, _ = run_cli(["train", str(run), "--resume", "--no-eval", "-q"], capsys)
    assert code == 0 and "already complete" in out
    assert (run / "checkpoints" / "last.pt").stat().st_mtime_ns == mtime

    from robustfair.report.run_report import _history_rows

    assert [r[0] for r in _history_rows(run)] == ["changed on resume: train.epochs",
                                                  "changed on resume: train.optimizer.lr"]


# ----------------------------------------------------------------------- 3: one trainer
def test_a_held_lock_refuses_a_second_trainer_and_a_stale_one_is_taken(tmp_path, capsys):
    cfg = write_cfg(tmp_path)
    run = tmp_path / "runs" / "r"
    run.mkdir(parents=True)
    lock = run / "train.lock"
    held = {"pid": os.getppid(), "host": socket.gethostname(), "since": time.time()}
    lock.write_text(json.dumps(held))
    code, _, err = run_cli(["train", str(cfg), "--set", "name=r", "--no-eval", "-q"], capsys)
    line = one_error_line(err)
    assert code == 2 and f"being trained by PID {os.getppid()}" in line
    assert json.loads(lock.read_text()) == held and not (run / "config.yaml").exists()

    lock.write_text(json.dumps({**held, "host": "elsewhere"}))
    code, _, err = run_cli(["train", str(cfg), "--set", "name=r", "--no-eval", "-q"], capsys)
    assert code == 2 and "elsewhere" in one_error_line(err) and str(lock) in err

    from robustfair.engine.lock import _is_stale, _start_ticks

    if _start_ticks(os.getpid()) is not None:  # a live PID that a new process reused
        assert _is_stale({**held, "started": -1})
    dead = subprocess.Popen(["true"])
    dead.wait()
    lock.write_text(json.dumps({**held, "pid": dead.pid}))
    code, _, err = run_cli(["train", str(cfg), "--set", "name=r", "--no-eval", "-q"], capsys)
    assert code == 0 and "stale lock" in err
    assert not lock.exists() and (run / "checkpoints" / "last.pt").exists()


# ----------------------------------------------------------------------- 4: compare
def _fake_run(root: Path, name: str, eps: float, epochs: int, robust: float) -> Path:
    run = root / name
    (run / "eval").mkdir(parents=True)
    figs = lambda a: {"avg": a, "worst": a - 0.1, "per_class": [a - 0.1, a + 0.1],  # noqa: E731
                      "counts": [5, 5], "worst_class": 0}
    settings = {"eps": eps, "norm": "linf", "seed": 0, "attacks": [
        {"attack": "clean"}, {"attack": "pgd20", "steps": 20, "step_size": None}]}
    (run / "eval" / "summary.json").write_text(json.dumps({
        "settings": settings, "n": 10, "num_classes": 2,
        "attacks": {"clean": figs(0.8), "pgd20": figs(robust)}}))
    (run / "config.yaml").write_text(yaml.safe_dump({"name": name, "seed": 0,
                                                     "train": {"epochs": epochs}}))
    return run


def test_compare_refuses_runs_measured_at_different_eps_unless_allowed(tmp_path, capsys,
                                                                       monkeypatch):
    a = _fake_run(tmp_path, "a", 8 / 255, 10, 0.5)
    b = _fake_run(tmp_path, "b", 0.2, 10, 0.3)
    c = _fake_run(tmp_path, "c", 8 / 255, 20, 0.4)
    d = _fake_run(tmp_path, "d", 8 / 255, 10, 0.45)
    out = tmp_path / "cmp"
    code, _, err = run_cli(["compare", str(a), str(b), "--out", str(out)], capsys)
    assert code == 2 and "ε: 8/255 (a) vs 0.2 (b)" in one_error_line(err)
    assert not out.exists()
    code, _, err = run_cli(["compare", str(a), str(c), "--out", str(out)], capsys)
    assert code == 2 and "epochs" in one_error_line(err)

    from robustfair.report import compare as cmp_mod

    titles: list[str] = []
    real = cmp_mod.figures.to_png

    def keep(fig):
        titles.append(fig.axes[0].get_title())
        titles.extend(t.get_text() for t in fig.axes[0].texts)
        return real(fig)

    monkeypatch.setattr(cmp_mod.figures, "to_png", keep)
    code, out_text, err = run_cli(["compare", str(a), str(d), "--out", str(out)], capsys)
    assert code == 0, err
    assert "| ε | norm | epochs |" in out_text and "| 8/255 | linf | 10 |" in out_text
    assert "ε 8/255, norm linf" in titles[0] and "epochs 10" in titles[0]
    code, out_text, err = run_cli(["compare", str(a), str(b), "--allow-mixed", "--out",
                                   str(out)], capsys)
    assert code == 0 and "differ in ε" in err
    assert "| 0.2 | linf | 10 |" in out_text
    assert "b (ε 0.2, linf, 10 ep)" in titles
    rows = (out / "compare.csv").read_text().splitlines()
    assert rows[0].endswith(",eps,norm,epochs") and rows[2].endswith(",0.2,linf,10")


# ----------------------------------------------------------------------- 5: read-only folder
@contextlib.contextmanager
def read_only(folder: Path):
    """Make ``folder`` read-only: mode 0555, or, as root (who writes anyway), immutable."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        try:
            yield
        finally:
            folder.chmod(0o755)
        return
    if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode != 0:
        pytest.skip("as root, a read-only folder needs 'chattr +i', which fails here")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(folder)], check=True)


def test_a_read_only_folder_gives_one_line_and_exit_2_in_every_writing_command(
        trained, base, capsys):
    ro = base / "read-only"
    ro.mkdir()
    cfg = write_cfg(base / "ro-cfg")
    cfg.write_text(cfg.read_text().replace(str(base / "ro-cfg" / "runs"), str(ro)))
    commands = {
        "train": ["train", str(cfg), "--set", "name=x", "-q"],
        "eval": ["eval", str(trained), "--attack", "clean", "--n", "20", "--out",
                 str(ro / "ev"), "-q"],
        "report": ["report", str(trained), "--no-eps-curve", "--out", str(ro / "r.html"),
                   "-q"],
        "compare": ["compare", str(trained), "--out", str(ro / "cmp"), "-q"],
        "generate": ["generate", str(ro / "gen"), "--per-cell", "2", "-q"],
        "study": ["study", "disparity", "--epochs", "1", "--seeds", "2", "--ratios", "1",
                  "-o", str(ro / "study"), "-q"],
    }
    with read_only(ro):
        results = {name: run_cli(argv, capsys) for name, argv in commands.items()}
    for name, (code, _, err) in results.items():
        assert code == 2, (name, err)
        assert "Traceback" not in err and "cannot write" in one_error_line(err), (name, err)
    assert list(ro.iterdir()) == []


# ----------------------------------------------------------------------- 7: umask
def test_files_honour_the_umask(trained, tmp_path):
    files = ["config.yaml", "log.jsonl", "checkpoints/last.pt", "checkpoints/last.json",
             "checkpoints/best.pt", "eval/summary.json"]
    modes = {f: oct((trained / f).stat().st_mode & 0o777) for f in files}
    assert set(modes.values()) == {"0o644"}, modes
    old = os.umask(0o027)
    try:
        atomic_write_text(tmp_path / "x.txt", "x")
    finally:
        os.umask(old)
    assert (tmp_path / "x.txt").stat().st_mode & 0o777 == 0o640


# ----------------------------------------------------------------------- 6: Ctrl-C
#: a training process that sends itself SIGINT, as the terminal does on Ctrl-C, at its third
#: step (after the checkpoint of step 2); run in a process of its own, so that what earlier
#: tests did to this process (its signal handlers and masks, its threads) cannot change it
_CTRL_C_AT_STEP_2 = """
import os, signal, sys, time
from robustfair.cli import main
from robustfair.engine.trainer import Trainer

original = Trainer.train_step

def ctrl_c(self, idx, stats):
    if self.global_step == 2:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)  # the default handler raises KeyboardInterrupt here
    return original(self, idx, stats)

Trainer.train_step = ctrl_c
main(sys.argv[1:])
"""


def test_sigint_during_training_prints_the_resume_command_and_exits_130(tmp_path):
    cfg = write_cfg(tmp_path, epochs=3, checkpoint_every_steps=1)
    run = tmp_path / "runs" / "r"
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-c", _CTRL_C_AT_STEP_2, "train", str(cfg), "--set",
                        "name=r", "--no-eval", "-q"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 130, p.stderr
    assert p.stderr.strip() == (f"interrupted; the run is saved up to epoch 0 + 2 steps; resume "
                                f"with: robustfair train {run} --resume")
    assert not (run / "train.lock").exists()


def test_ctrl_c_during_eval_prints_the_resume_command(trained, capsys, monkeypatch):
    from robustfair.commands import evaluate

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(evaluate, "_evaluate", interrupted)
    code, _, err = run_cli(["eval", str(trained), "--attack", "fgsm"], capsys)
    assert code == 130
    assert f"continue with: robustfair eval {trained} --attack fgsm --resume" in err


# ----------------------------------------------------------------------- 8, 9: messages
def test_truncated_checkpoint_message_keeps_whole_words(trained, tmp_path):
    from robustfair.errors import UserError

    cut = tmp_path / "cut.pt"
    cut.write_bytes((trained / "checkpoints" / "last.pt").read_bytes()[:1000])
    with pytest.raises(Exception) as torch_exc:
        torch.load(cut, weights_only=True)
    with pytest.raises(UserError) as exc:
        load_checkpoint(cut)
    inner = re.search(r"checkpoint \((.*)\); use an intact file", str(exc.value)).group(1)
    assert str(torch_exc.value).startswith(inner + ".")  # torch's first sentence, whole


def test_poor_messages_are_now_clear(trained, tmp_path, capsys):
    from robustfair.attacks import build_attack
    from robustfair.attacks.base import InputRangeError
    from robustfair.errors import UserError

    with pytest.raises(UserError, match="no parameter 'stepsize' \\(did you mean 'step_size'"):
        build_attack("pgd20", stepsize=0.5)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2))
    with pytest.raises(InputRangeError, match="divide them by 255"):
        build_attack("pgd2")(model, torch.full((2, 1, 2, 2), 200.0), torch.tensor([0, 1]), 0.1)

    code, _, err = run_cli(["study", "disparity", "--dataset", "foo"], capsys)
    assert code == 2 and "stable-mixture" in one_error_line(err) and "{" not in err
    code, _, err = run_cli(["study", "disparity", "--alpha", "3"], capsys)
    assert code == 2 and "--eps-l2" in one_error_line(err) and "{" not in err

    # a checkpoint of another architecture: the keys that differ are named
    from robustfair.commands.evaluate import load_run

    ck = load_checkpoint(trained / "checkpoints" / "last.pt")
    ck["model"]["net.extra.weight"] = torch.zeros(1)
    ck["model"].pop(next(k for k in ck["model"] if k.endswith("bias")))
    other = tmp_path / "run"
    other.mkdir()
    (other / "config.yaml").write_bytes((trained / "config.yaml").read_bytes())
    (other / "checkpoints").mkdir()
    torch.save(ck, other / "checkpoints" / "last.pt")
    with pytest.raises(UserError, match="missing: .*bias; unexpected: net.extra.weight"):
        load_run(other)

    # analyze: output on stdout, -q still prints where it went
    code, out, err = run_cli(["analyze", str(trained), "--attack", "fgsm", "--n", "20"], capsys)
    assert code == 0 and "saved:" in out and "class" in out
    code, out, _ = run_cli(["analyze", str(trained), "--attack", "fgsm", "--n", "20", "-q"],
                           capsys)
    assert code == 0 and out.startswith("saved:") and out.count("\n") == 1

    # train --check says where the run would be written
    code, out, _ = run_cli(["train", str(trained / "config.yaml"), "--check"], capsys)
    stored = yaml.safe_load((trained / "config.yaml").read_text())
    assert code == 0 and f"# run directory: {Path(stored['output_dir']) / stored['name']}" in out


def test_nan_stop_has_no_torch_warning(tmp_path):
    from robustfair.config import load_config
    from robustfair.engine.trainer import Trainer, TrainingDiverged, prepare_run_dir

    raw = {**TINY, "output_dir": str(tmp_path), "name": "nan"}
    cfg_file = tmp_path / "nan.yaml"
    cfg_file.write_text(yaml.safe_dump(raw))
    cfg = load_config(cfg_file, None, ["train.optimizer.lr=1e12", "train.epochs=3"])
    t = Trainer(cfg, prepare_run_dir(cfg), quiet=True)
    with warnings.catch_warnings(record=True) as caught, pytest.raises(TrainingDiverged):
        warnings.simplefilter("always")
        t.fit()
    assert not [w for w in caught if "requires_grad" in str(w.message)]


# ----------------------------------------------------------------------- 16: images/s
def test_images_per_second_of_a_resumed_epoch_counts_only_new_images(tmp_path, monkeypatch):
    from robustfair.config import load_config
    from robustfair.engine.trainer import Trainer, prepare_run_dir

    cfg_file = write_cfg(tmp_path, checkpoint_every_steps=1)
    cfg = load_config(cfg_file, None, ["name=ips"])
    original = Trainer.train_step

    def dying(self, idx, stats):
        if self.global_step == 3:  # after the checkpoint of step 3 (150 of 200 images)
            raise KeyboardInterrupt
        return original(self, idx, stats)

    monkeypatch.setattr(Trainer, "train_step", dying)
    with pytest.raises(KeyboardInterrupt):
        Trainer(cfg, prepare_run_dir(cfg), quiet=True).fit()
    monkeypatch.setattr(Trainer, "train_step", original)
    Trainer(cfg, tmp_path / "runs" / "ips", quiet=True).fit(resume=True)
    (line,) = [json.loads(x) for x in (tmp_path / "runs" / "ips" / "log.jsonl").read_text()
               .splitlines()]
    assert line["images_per_s"] * line["time_s"] == pytest.approx(50)  # not all 200


def test_lock_taken_by_exactly_one_of_many_racing_processes(tmp_path):
    """Processes that try to take one run's lock at the same moment: exactly one gets it, and a
    lock file that another process has just created (still empty) is not taken over."""
    import multiprocessing as mp

    from robustfair.engine import lock as lock_mod

    run = tmp_path / "run"
    run.mkdir()
    ctx = mp.get_context("fork")
    start, results = ctx.Event(), ctx.Queue()

    def contender() -> None:
        start.wait()
        try:
            lock_mod.acquire(run)
            results.put("got")
            time.sleep(1.0)  # hold it while the others try
        except Exception as exc:  # noqa: BLE001 - reported to the parent
            results.put(type(exc).__name__)

    procs = [ctx.Process(target=contender) for _ in range(6)]
    for p in procs:
        p.start()
    start.set()
    got = [results.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert got.count("got") == 1 and got.count("UserError") == 5, got

    if lock_mod.fcntl is not None:  # an empty lock file held (flock) by a process writing it
        path = run / lock_mod.LOCK_NAME
        path.unlink()  # the winner above exited without releasing it
        fd = os.open(path, os.O_RDWR | os.O_CREAT)
        lock_mod.fcntl.flock(fd, lock_mod.fcntl.LOCK_EX)
        try:
            with pytest.raises(lock_mod.UserError, match="being trained by another process"):
                lock_mod.acquire(run)
        finally:
            os.close(fd)
