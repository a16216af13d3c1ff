"""One evaluation protocol everywhere: the same class-stratified images for a given --n in every
path, training's final evaluation equal to ``robustfair eval``, attacks seeded independently,
evaluations added to the run's record (never replaced), resume checking the images, the sanity
checks saved and shown in the report, and the Python API of the README."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import run_cli as cli

import robustfair as rf
from robustfair.cli import main
from robustfair.config import load_config
from robustfair.engine import checks as checks_mod
from robustfair.engine import staged as staged_mod
from robustfair.engine.evaluator import EvalResult
from robustfair.engine.record import list_evaluations

TINY = ["data.name=digits", "data.train_limit=300", "model.name=mlp",
        "model.params={hidden: [16]}", "attack.eps=0.1", "attack.steps=2", "train.epochs=1",
        "train.batch_size=50", "validation.every=0", "eval.attacks=[clean, pgd3]",
        "eval.n=100", "eval.batch_size=70", "logging.progress=false", "device=cpu"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """An MLP trained for one epoch on 300 digits; final evaluation on eval.n=100."""
    cfg = load_config(recipe="mnist5k-standard",
                      overrides=[*TINY, f"output_dir={tmp_path_factory.mktemp('runs')}"])
    path = rf.train(cfg)
    first = json.loads((path / "eval" / "summary.json").read_text())
    return path, first


@pytest.fixture
def run(trained, tmp_path):
    """A copy of the trained run for one test (what a test evaluates into it stays there)."""
    path, first = trained
    copy = tmp_path / "shared-run" / path.name
    shutil.copytree(path, copy)
    return copy, first


def _per_class_counts(indices, labels):
    return torch.bincount(labels[torch.tensor(indices)], minlength=10).tolist()


def test_n_200_on_mnist5k_is_20_images_of_every_class():
    from robustfair.engine.subset import subset_indices

    labels = torch.arange(10).repeat_interleave(100)[torch.randperm(1000)]  # as mnist5k's test
    assert torch.bincount(labels[subset_indices(labels, 200)]).tolist() == [20] * 10
    assert len(subset_indices(labels, None)) == 1000


def test_every_path_takes_the_same_stratified_images(run, capsys, monkeypatch):
    from robustfair.engine.subset import subset_indices

    path, first = run
    test_y = rf.load_run(path).data.test.y
    sub = first["settings"]["subset"]
    assert sub["n"] == 100 and sub["of"] == len(test_y) and len(sub["indices"]) == 100
    want = subset_indices(test_y, 100).tolist()
    assert sub["indices"] == want  # class-stratified: 9 to 11 of each class of 34 to 37
    assert max(first["attacks"]["clean"]["counts"]) - min(first["attacks"]["clean"]["counts"]) \
        <= 2
    seen = {"train": sub["indices"]}
    # eval (a second attack, and --resume with nothing to resume)
    code, out, _ = cli(["eval", str(path), "--attack", "fgsm", "--n", "100", "-q"], capsys)
    assert code == 0 and f"100 of {len(test_y)} test images, class-stratified" in out
    code, _, _ = cli(["eval", str(path), "--attack", "apgd-ce5", "--resume", "-q"], capsys)
    assert code == 0
    main_s = json.loads((path / "eval" / "summary.json").read_text())
    assert {"clean", "pgd3", "fgsm", "apgd-ce5"} <= set(main_s["attacks"])
    seen["eval"] = main_s["settings"]["subset"]["indices"]
    # --checks (two of the checks, to stay short)
    monkeypatch.setattr(checks_mod, "CHECKS", {k: checks_mod.CHECKS[k] for k in
                                               ("logits", "deterministic")})
    code, out, _ = cli(["eval", str(path), "--checks", "--n", "100", "-q"], capsys)
    assert code == 0 and "saved:" in out
    seen["checks"] = json.loads((path / "eval" / "checks.json").read_text())[
        "settings"]["subset"]["indices"]
    # analyze and the report's ε curve
    from robustfair.analysis.class_distance import analyze_class_distance
    from robustfair.report.eps_curve import compute_eps_curve

    seen["analyze"] = analyze_class_distance(path, attack="fgsm", n=100, quiet=True)[
        "subset"]["indices"]
    curve = compute_eps_curve(path, factors=(0.0, 1.0), attack="fgsm", n=100)
    assert curve["counts"] == first["attacks"]["clean"]["counts"]
    seen["eps_curve"] = curve["subset"]["indices"]
    assert all(v == want for v in seen.values()), {k: v[:5] for k, v in seen.items()}
    # the report's section shows the saved checks
    from robustfair.report import run_report
    from robustfair.report.loading import load_run as load_files

    section = run_report._checks(run_report._Ctx(load_files(path), run_report.ReportOptions()))
    assert "deterministic" in section and "forward passes agree" in section


def test_eval_adds_to_the_record_and_equals_training(run, capsys):
    path, first = run
    again = rf.load_run(path)
    assert again.config.eval.n == 100
    s = __import__("robustfair.commands.evaluate", fromlist=["x"]).evaluate_run(path, "pgd3")
    # the same checkpoint and seed give the same numbers as training's final evaluation
    assert s["attacks"]["pgd3"]["per_class"] == first["attacks"]["pgd3"]["per_class"]
    # the second evaluation kept the first: one summary with every attack
    main_s = json.loads((path / "eval" / "summary.json").read_text())
    assert {"clean", "pgd3"} <= set(main_s["attacks"])
    assert main_s["attacks"]["clean"] == first["attacks"]["clean"]
    assert [h["by"] for h in main_s["settings"]["history"]][:2] == ["train", "eval"]
    # other settings: saved beside the main evaluation, which stays as it was
    code, out, _ = cli(["eval", str(path), "--attack", "pgd3", "--eps", "0.05", "-q"], capsys)
    assert code == 0 and "beside" in out
    after = json.loads((path / "eval" / "summary.json").read_text())
    assert after["attacks"]["pgd3"] == main_s["attacks"]["pgd3"]
    entries = {e["summary"]: e for e in list_evaluations(path / "eval")}
    other = [k for k in entries if k != "summary.json"]
    assert len(other) == 1 and entries[other[0]]["key"]["eps"] == pytest.approx(0.05)
    beside = json.loads((path / "eval" / other[0]).read_text())
    assert list(beside["attacks"]) == ["clean", "pgd3"]
    assert beside["attacks"]["pgd3"]["avg"] >= after["attacks"]["pgd3"]["avg"]


def test_resume_gives_the_same_matrix_and_checks_the_images(run, capsys, monkeypatch, tmp_path):
    path, _ = run
    base = ["eval", str(path), "--attack", "pgd3", "--n", "100", "--batch-size", "4",
            "--eps", "0.07", "-q"]
    code, _, _ = cli([*base, "--out", str(tmp_path / "whole")], capsys)
    assert code == 0
    real = staged_mod.batch_seed

    def stop(seed, row, batch):
        if row == "pgd3" and batch == 2:
            raise KeyboardInterrupt
        return real(seed, row, batch)

    monkeypatch.setattr(staged_mod, "batch_seed", stop)
    with pytest.raises(SystemExit):
        main([*base, "--out", str(tmp_path / "cut")])
    monkeypatch.setattr(staged_mod, "batch_seed", real)
    state = json.loads((tmp_path / "cut" / "eval_state.json").read_text())
    assert state["current"]["batches_done"] == 2
    other_n = [a if a != "100" else "90" for a in base]
    code, _, err = cli([*other_n, "--out", str(tmp_path / "cut"), "--resume"], capsys)
    assert code == 2 and "other settings" in err
    code, _, _ = cli([*base, "--out", str(tmp_path / "cut"), "--resume"], capsys)
    assert code == 0
    a = EvalResult.load(tmp_path / "whole" / "summary_matrix.npz")
    b = EvalResult.load(tmp_path / "cut" / "summary_matrix.npz")
    assert torch.equal(a.correct, b.correct) and torch.equal(a.pred, b.pred)
    sa, sb = (json.loads((tmp_path / d / "summary.json").read_text())["settings"]["subset"]
              for d in ("whole", "cut"))
    assert sa == sb and len(sa["indices"]) == 100


def test_an_attack_row_does_not_depend_on_the_other_attacks(digits, trained_mlp):
    x, y = digits.test.images(), digits.test.y
    alone = rf.evaluate(trained_mlp, x, y, eps=0.1, attacks=["pgd5"], n=120, batch_size=50)
    more = rf.evaluate(trained_mlp, x, y, eps=0.1, attacks=["clean", "cw5", "fgsm", "pgd5"],
                       n=120, batch_size=50)
    assert torch.equal(alone.result.row("pgd5"), more.result.row("pgd5"))
    assert 0 < alone.accuracy("pgd5") < alone.accuracy("clean")
    # a DataLoader and a dataset name give the same images and numbers
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=64)
    by_loader = rf.evaluate(trained_mlp, loader, eps=0.1, attacks=["pgd5"], n=120,
                            batch_size=50)
    by_name = rf.evaluate(trained_mlp, "digits", eps=0.1, attacks=["pgd5"], n=120,
                          batch_size=50)
    assert torch.equal(by_loader.result.row("pgd5"), alone.result.row("pgd5"))
    assert torch.equal(by_name.result.row("pgd5"), alone.result.row("pgd5"))
    assert by_name.summary()["settings"]["class_names"] == digits.class_names


def test_api_errors_are_one_line(trained_mlp, digits):
    from robustfair.errors import UserError

    with pytest.raises(UserError, match=r"in \[0, 1\]"):
        rf.evaluate(trained_mlp, digits.test.images() * 255, digits.test.y, eps=0.1)
    with pytest.raises(UserError, match="labels"):
        rf.evaluate(trained_mlp, digits.test.images(), eps=0.1)
    assert set(rf.__all__) >= {"evaluate", "load_run", "train", "Evaluation"}
    assert all(getattr(rf, n).__doc__ for n in rf.__all__ if n != "__version__")


def test_readme_python_example_runs(tmp_path, monkeypatch):
    text = (Path(__file__).parents[1] / "README.md").read_text()
    section = text[text.index("## Python API"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    assert (tmp_path / "digits-eval" / "summary.json").exists()
    assert (tmp_path / "runs" / "api-demo" / "eval" / "summary.json").exists()


def test_report_and_compare_say_which_evaluation_they_use(run, capsys):
    path, _ = run
    code, _, _ = cli(["eval", str(path), "--attack", "fgsm", "--n", "50", "-q"], capsys)
    assert code == 0
    from robustfair.report import run_report
    from robustfair.report.loading import load_run as load_files

    text = run_report._which_evaluation(run_report._Ctx(load_files(path),
                                                        run_report.ReportOptions()))
    assert text.startswith("Shown: eval/summary.json: eps 0.1 (linf), 100 of 360 test images")
    assert "Other evaluations" in text and "-n50-" in text
    from robustfair.report.compare import caption, compare_runs

    assert "eval/summary.json" in caption(compare_runs([path]))


def _copy_run(path, tmp_path, **eval_settings):
    """A copy of the run whose config.yaml has ``eval`` settings changed."""
    import shutil

    import yaml

    dst = tmp_path / path.name
    shutil.copytree(path, dst)
    cfg = yaml.safe_load((dst / "config.yaml").read_text())
    cfg["eval"].update(eval_settings)
    (dst / "config.yaml").write_text(yaml.safe_dump(cfg))
    return dst


class _AlwaysZero(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        out = torch.zeros(len(x), 10) + 0 * self.w
        out[:, 0] = 1.0
        return out + 0 * x.flatten(1).sum(1, keepdim=True)


def test_eps_curve_and_analysis_use_the_evaluated_model(run, tmp_path, monkeypatch):
    import shutil

    from robustfair.analysis.class_distance import analyze_class_distance
    from robustfair.engine.trainer import Trainer
    from robustfair.report.eps_curve import compute_eps_curve, eps_curve_for_report

    path = _copy_run(run[0], tmp_path, checkpoint="best")
    ck = path / "checkpoints"
    shutil.copy(ck / "last.pt", ck / "best.pt")
    shutil.copy(ck / "last.json", ck / "best.json")
    curve = eps_curve_for_report(path, None, (0.0,), "fgsm", 50)
    assert curve["checkpoint"] == "best"
    # the policy's averaged weights (CFA) are what the run evaluates, here a constant model
    monkeypatch.setattr(Trainer, "policy_eval_model", lambda self: _AlwaysZero())
    curve = compute_eps_curve(path, factors=(0.0, 1.0), attack="fgsm", n=50)
    assert curve["per_class"][0][0] == 1.0 and all(v == 0.0 for v in curve["per_class"][0][1:])
    res = analyze_class_distance(path, attack="fgsm", n=50, quiet=True)
    assert res["clean_acc"][0] == 1.0 and sum(res["clean_acc"][1:]) == 0.0


def test_the_weights_evaluated_are_part_of_the_record_key(run, tmp_path):
    from robustfair.commands.evaluate import load_run
    from robustfair.engine.record import evaluation_key, record_evaluation

    assert load_run(run[0]).fingerprint["weights"] == "raw"
    x, y = rf.load_run(run[0]).data.test.images()[:40], rf.load_run(run[0]).data.test.y[:40]
    model = rf.load_run(run[0]).model
    a = rf.evaluate(model, x, y, eps=0.1, attacks=["clean"]).result
    b = rf.evaluate(model, x, y, eps=0.1, attacks=["clean"]).result
    a.settings["weights"], b.settings["weights"] = "raw", "ema"
    assert evaluation_key(a.settings) != evaluation_key(b.settings)
    _, fa = record_evaluation(tmp_path, a)
    _, fb = record_evaluation(tmp_path, b)
    assert fa != fb


def test_merging_keeps_the_stage_times_of_both():
    from robustfair.engine.record import _merge_settings

    old = {"stage_time": {"pgd3": {"seconds": 1.0, "points": 5}}, "attacks": []}
    new = {"stage_time": {"fgsm": {"seconds": 0.5, "points": 4}}, "attacks": []}
    assert set(_merge_settings(old, new)["stage_time"]) == {"pgd3", "fgsm"}


def test_subset_refuses_fewer_than_one_image():
    from robustfair.engine.subset import subset_indices
    from robustfair.errors import UserError

    for n in (0, -3):
        with pytest.raises(UserError, match="at least 1"):
            subset_indices(torch.arange(10) % 2, n)


def test_final_evaluation_uses_eval_checkpoint(tmp_path):
    from robustfair.engine.io import sha256_file

    cfg = load_config(recipe="mnist5k-standard", overrides=[
        *TINY, "train.epochs=2", "validation.every=1", "eval.checkpoint=best",
        "data.val_size=0.1", f"output_dir={tmp_path}"])
    path = rf.train(cfg)
    s = json.loads((path / "eval" / "summary.json").read_text())["settings"]
    assert s["checkpoint"].endswith("best.pt")
    assert s["sha256"] == sha256_file(path / "checkpoints" / "best.pt")
    assert s["weights"] == "raw"


def test_checks_run_with_the_seed_they_record(run, capsys, monkeypatch, tmp_path):
    seen = []
    monkeypatch.setattr(checks_mod, "CHECKS", {
        "logits": lambda m, x, y, e, n, q, b, s=0: seen.append(s) or
        checks_mod.check_logits(m, x)})
    code, _, err = cli(["eval", str(run[0]), "--checks", "--n", "30", "--set", "seed=5",
                        "--out", str(tmp_path), "-q"], capsys)
    assert code == 0, err
    assert seen == [5]
    assert json.loads((tmp_path / "checks.json").read_text())["settings"]["seed"] == 5


def test_leaderboard_passes_its_settings_to_runs(run, capsys, tmp_path):
    code, _, err = cli(["leaderboard", str(run[0]), "--dataset", "digits", "-a", "fgsm",
                        "--set", "eval.checkpoint=first", "--out", str(tmp_path / "lb"), "-q"],
                       capsys)
    assert code == 2 and "checkpoint" in err and not (tmp_path / "lb").exists()
