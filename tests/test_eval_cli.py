"""``robustfair eval``: AutoAttack per stage and per class, the confusion matrix under attack,
stopping and resuming without repeating finished attacks, model files in the RobustBench
convention, and ``--checks``."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from conftest import run_cli
from robustfair.attacks import apgd as apgd_mod
from robustfair.attacks import apgdt as apgdt_mod
from robustfair.attacks import autoattack as aa_mod
from robustfair.attacks import fab as fab_mod
from robustfair.commands.evaluate import STATE_FILE, evaluate_run
from robustfair.config import DataConfig, load_config
from robustfair.data import load_data
from robustfair.engine.evaluator import EvalResult
from robustfair.engine.trainer import Trainer, prepare_run_dir
from robustfair.errors import UserError
from robustfair.models import build_model

TINY = [
    "data.name=digits", "data.train_limit=400", "model.name=mlp", "model.params={hidden: [32]}",
    "attack.eps=0.1", "attack.step_size=0.04", "attack.steps=2", "train.epochs=3",
    "train.batch_size=32", "train.optimizer.lr=0.05", "train.schedule.name=constant",
    "validation.every=0", "eval.attacks=[clean]", "logging.progress=false", "device=cpu",
]
EVAL = ["eval.n=60", "eval.eps=0.1", "eval.batch_size=25"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained_run(one_thread, tmp_path_factory):
    """A small run on digits (an MLP trained with 2-step PGD for 3 epochs)."""
    cfg = load_config(recipe="mnist5k-standard",
                      overrides=[*TINY, f"output_dir={tmp_path_factory.mktemp('runs')}"])
    t = Trainer(cfg, prepare_run_dir(cfg), quiet=True)
    t.fit()
    return t.run_dir


@pytest.fixture
def run_dir(trained_run, tmp_path):
    """A copy of the trained run for one test: what one test evaluates and stores in it is not
    seen by the next, whatever their order."""
    copy = tmp_path / "shared-run" / trained_run.name
    shutil.copytree(trained_run, copy)
    return copy


@pytest.fixture(autouse=True)
def short_square(monkeypatch):
    """Square with 200 queries instead of the product's 5,000, to keep these tests short."""
    real = aa_mod._component_params

    def capped(name, aa, extra):
        kw = real(name, aa, extra)
        if "n_queries" in kw:
            kw["n_queries"] = min(kw["n_queries"], 200)
        return kw

    monkeypatch.setattr(aa_mod, "_component_params", capped)


cli = run_cli  # (exit code, stdout, stderr) of robustfair ARGV


def test_autoattack_per_stage_per_class_and_confusion(run_dir, capsys):
    code, out, _ = cli(["eval", str(run_dir), "--attack", "pgd10,autoattack", "--n", "60",
                        "--eps", "0.1", "-q"], capsys)
    assert code == 0
    s = json.loads((run_dir / "eval" / "summary.json").read_text())
    assert list(s["attacks"]) == ["clean", "pgd10", "autoattack"]
    stages = s["stages"]["autoattack"]
    assert list(stages) == ["apgd-ce", "apgd-t", "fab-t", "square"]
    avgs = [s["attacks"]["clean"]["avg"]] + [v["avg"] for v in stages.values()]
    assert avgs == sorted(avgs, reverse=True)  # cumulative: never rises
    assert avgs[-1] == s["attacks"]["autoattack"]["avg"]
    assert s["attacks"]["autoattack"]["per_class"] == stages["square"]["per_class"]
    assert s["worst_case"]["over"] == ["pgd10", "autoattack"]
    assert s["worst_case"]["avg"] <= min(s["attacks"]["pgd10"]["avg"],
                                         s["attacks"]["autoattack"]["avg"])
    conf = np.array(s["confusion"]["autoattack"])
    assert conf.shape == (10, 10) and conf.sum() == 60
    assert conf.sum(1).tolist() == s["attacks"]["autoattack"]["counts"]
    assert np.trace(conf) == round(60 * s["attacks"]["autoattack"]["avg"])
    res = EvalResult.load(run_dir / "eval" / "summary_matrix.npz")
    assert "autoattack/fab-t" in res.attacks
    assert not (run_dir / "eval" / STATE_FILE).exists()  # removed once complete
    assert "after each stage" in out and "confusion under autoattack" in out
    assert "per-sample worst case" in out


def _matrix_of(run_dir, batch_size):
    """The matrix of the run's evaluation with this batch size (see eval/index.json)."""
    from robustfair.engine.record import list_evaluations

    hits = [e["summary"] for e in list_evaluations(run_dir / "eval")
            if e["key"]["batch_size"] == batch_size]
    assert len(hits) == 1, hits
    return EvalResult.load((run_dir / "eval" / hits[0]).with_name("summary_matrix.npz"))


def test_stop_and_resume_without_repeating_attacks(run_dir, monkeypatch):
    done = evaluate_run(run_dir, "autoattack", EVAL, quiet=True)
    full = _matrix_of(run_dir, 25)
    calls = {"n": 0}
    real_fab = fab_mod.FABBase.perturb

    def stop_on_second_batch(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real_fab(self, *a, **k)

    monkeypatch.setattr(fab_mod.FABBase, "perturb", stop_on_second_batch)
    with pytest.raises(KeyboardInterrupt):
        evaluate_run(run_dir, "autoattack", EVAL, quiet=True)
    state = json.loads((run_dir / "eval" / STATE_FILE).read_text())
    assert state["finished"] == ["clean", "autoattack/apgd-ce", "autoattack/apgd-t"]
    assert state["current"]["row"] == "autoattack/fab-t"
    assert state["current"]["batches_done"] == 1
    with pytest.raises(UserError, match="other settings"):
        evaluate_run(run_dir, "autoattack", [*EVAL, "eval.eps=0.2"], quiet=True, resume=True)

    def must_not_run(self, *a, **k):
        raise AssertionError("a finished attack ran again")

    monkeypatch.setattr(fab_mod.FABBase, "perturb", real_fab)
    monkeypatch.setattr(apgd_mod.APGDBase, "perturb", must_not_run)
    monkeypatch.setattr(apgdt_mod.APGDT, "perturb", must_not_run)
    resumed = evaluate_run(run_dir, "autoattack", EVAL, quiet=True, resume=True)
    again = _matrix_of(run_dir, 25)
    assert torch.equal(again.correct, full.correct) and torch.equal(again.pred, full.pred)
    assert resumed["attacks"] == done["attacks"]
    assert not (run_dir / "eval" / STATE_FILE).exists()


@pytest.fixture(scope="module")
def weights(one_thread):
    """An MLP trained briefly on digits, and its clean accuracy on the first 50 test images."""
    from conftest import train_quick

    data = load_data(DataConfig(name="digits"))
    torch.manual_seed(0)
    m = build_model("mlp", 1, 10, 8, data.mean, data.std, hidden=[32])
    train_quick(m, data, epochs=5)
    with torch.no_grad():
        a = float((m(data.test.images()[:50]).argmax(1) == data.test.y[:50]).float().mean())
    return m, a


def _layouts(m):
    net = m.net.state_dict()
    return {
        "wrapped": {"state_dict": {f"module.{k}": v for k, v in m.state_dict().items()}},
        "net_mu_sigma": {**{f"model.{k}": v for k, v in net.items()},
                         "mu": m.normalize.mean.clone(), "sigma": m.normalize.std.clone()},
    }


@pytest.mark.parametrize("layout", ["wrapped", "net_mu_sigma"])
def test_model_file_in_the_robustbench_convention(weights, tmp_path, capsys, layout):
    m, clean = weights
    f = tmp_path / f"{layout}.pt"
    torch.save(_layouts(m)[layout], f)
    code, out, _ = cli(["eval", "--checkpoint", str(f), "--model", "mlp", "--dataset", "digits",
                        "--set", "model.params.hidden=[32]", "--n", "50", "--eps", "0.1",
                        "--attack", "apgd-ce20", "-q"], capsys)
    assert code == 0, out
    s = json.loads((tmp_path / f"{layout}-eval" / "summary.json").read_text())
    assert s["attacks"]["clean"]["avg"] == pytest.approx(clean)
    assert s["attacks"]["apgd-ce20"]["avg"] < clean
    assert s["settings"]["checkpoint"] == str(f) and len(s["settings"]["sha256"]) == 64


def test_model_file_errors_name_the_fix(weights, tmp_path, capsys):
    m, _ = weights
    f = tmp_path / "w.pt"
    torch.save(m.state_dict(), f)
    code, _, err = cli(["eval", "--checkpoint", str(f), "--dataset", "digits"], capsys)
    assert code == 2 and "--model" in err
    code, _, err = cli(["eval", "--checkpoint", str(f), "--model", "mlp", "--dataset", "digits",
                        "--set", "model.params.hidden=[16]", "-q"], capsys)
    assert code == 2 and "do not fit" in err and "model.params" in err


def test_checks_print_a_verdict_for_each(run_dir, capsys):
    code, out, _ = cli(["eval", str(run_dir), "--checks", "--n", "60", "--eps", "0.1"], capsys)
    lines = [ln for ln in out.splitlines() if ln.startswith(("PASS", "FAIL"))]
    names = ["logits", "deterministic", "zero_gradients", "eps_zero", "monotone_eps",
             "monotone_steps", "unbounded", "square_vs_whitebox"]
    assert [ln.split()[1] for ln in lines] == names
    failed = sum(ln.startswith("FAIL") for ln in lines)
    assert code == (1 if failed else 0)
    assert out.count("fix:") == failed


def test_bf16_evaluation_is_stated_and_kept_beside_the_fp32_one(run_dir, capsys):
    """--set eval.precision=bf16: the table says which rows ran in bf16, the summary keeps the
    checks, and the evaluation is recorded under its own key (its numbers may differ)."""
    args = ["eval", str(run_dir), "--attack", "pgd10", "--n", "40", "--eps", "0.1",
            "--batch-size", "20", "--out", str(run_dir / "eval-prec")]
    code, _, err = cli([*args, "-q"], capsys)
    assert code == 0, err
    code, out, err = cli([*args, "-q", "--set", "eval.precision=bf16"], capsys)
    assert code == 0, err
    root = run_dir / "eval-prec"
    fp32 = json.loads((root / "summary.json").read_text())
    assert fp32["settings"]["precision"] == "fp32"
    (beside,) = [p for p in root.glob("*/summary.json")]
    prec = json.loads(beside.read_text())["settings"]["precision"]
    assert prec["requested"] == "bf16" and set(prec["checks"]) == {"pgd10"}
    stated = "attacked in bf16 (checked against fp32 on each row's first batch, verdicts in " \
             "fp32): pgd10" in out
    assert stated == (prec["checks"]["pgd10"]["used"] == "bf16"), (prec, out)
    code, _, err = cli([*args, "-q", "--set", "eval.precision=fp16"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "precision" in err, err
