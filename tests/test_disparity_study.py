"""The disparity study end to end: grid cells, caching and resuming, aggregation into the two
gaps of AT-on-AD's Figure 1, the PNG/JSON outputs, worker processes and the command line."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from robustfair.cli import cli
from robustfair.errors import UserError
from robustfair.studies import disparity as study
from robustfair.studies.disparity import (
    DisparityStudyConfig,
    aggregate,
    build_study_config,
    cell_key,
    run_disparity_study,
)
from robustfair.studies.presets import study_preset
from robustfair.studies.trainer import Method

TINY_DATA = {"alpha": 2.0, "d": 8, "mu": 1.0, "sigma": 2.0, "n_major": 80, "n_val_major": 40,
             "n_test": 60}


def tiny_config(**over) -> DisparityStudyConfig:
    raw = {"dataset": "stable-mixture", "data_params": TINY_DATA, "eps": {"l2": [1.0],
           "linf": [0.3, 0.2]}, "ratios": [1, 4], "seeds": [2, 22], "lrs_standard": [0.01],
           "lrs_robust": [0.01, 0.001], "train": {"epochs": 4, "patience": 2, "batch_size": 32}}
    raw.update(over)
    return build_study_config(raw)


def test_study_writes_cells_results_and_figures_then_resumes(tmp_path, monkeypatch):
    cfg = tiny_config()
    res = run_disparity_study(cfg, tmp_path, workers=1, quiet=True)
    cells = sorted(p.name for p in (tmp_path / "cells").glob("*.json"))
    assert len(cells) == 2 * 2 * 4  # R × seed × (standard + 3 AT methods)
    for name in ("results.json", "study.json", "figure1.png", "figure1_ad_gap.png",
                 "figure1_acc_gap.png"):
        assert (tmp_path / name).exists()
    assert (tmp_path / "figure1.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((tmp_path / "results.json").read_text())
    assert np.array(saved["gaps"]["linf"][0]["ad_gap"]).shape == (2, 2)  # R × seed
    assert len(res["gaps"]["linf"]) == 2 and len(res["gaps"]["l2"]) == 1

    # the gaps are the paired differences of the cells, as defined in specs/README.md
    def cell(r, s, m):
        return json.loads((tmp_path / "cells" / f"{cell_key(r, s, m)}.json").read_text())

    std, adv = cell(4, 22, Method()), cell(4, 22, Method("linf", 0.3))
    assert saved["gaps"]["linf"][0]["ad_gap"][1][1] == pytest.approx(adv["ad"] - std["ad"])
    assert saved["gaps"]["linf"][0]["acc_gap"][1][1] == pytest.approx(
        std["test"]["acc"] - adv["test"]["acc"])
    assert adv["lr"] in (0.01, 0.001) and len(adv["runs"]) == 2
    assert adv["val_loss"] == min(r["val_loss"] for r in adv["runs"])
    assert adv["ad"] == pytest.approx(
        adv["balanced"]["per_class"][0] - adv["balanced"]["per_class"][1])
    assert len(adv["closed_form_per_class"]) == 2

    # a second run trains nothing; more seeds train only the new cells
    def no_training(*a, **k):
        raise AssertionError("a cached cell was trained again")

    monkeypatch.setattr(study, "_fit_job", no_training)
    again = run_disparity_study(cfg, tmp_path, workers=1, quiet=True)
    assert again["gaps"] == res["gaps"]
    monkeypatch.undo()
    trained = []
    original = study._fit_job
    monkeypatch.setattr(study, "_fit_job",
                        lambda c, job, d: trained.append(job) or original(c, job, d))
    run_disparity_study(tiny_config(seeds=[2, 22, 42]), tmp_path, workers=1, quiet=True)
    assert {(j.ratio, j.seed) for j in trained} == {(1, 42), (4, 42)}
    # changed settings do not reuse cells
    trained.clear()
    run_disparity_study(tiny_config(seeds=[2], ratios=[1], train={"epochs": 3, "patience": 2,
                        "batch_size": 32}), tmp_path, workers=1, quiet=True)
    assert len(trained) == 1 and len(trained[0].methods) == 4


def test_aggregate_mean_and_standard_error_by_hand():
    cfg = tiny_config(eps={"l2": [1.0]}, norms=["l2"], ratios=[2], seeds=[1, 2, 3])
    cells = {}
    ads = {Method(): [0.0, 0.1, 0.2], Method("l2", 1.0): [0.3, 0.1, 0.5]}
    accs = {Method(): [0.9, 0.9, 0.9], Method("l2", 1.0): [0.8, 0.85, 0.9]}
    for m in ads:
        for j, s in enumerate([1, 2, 3]):
            cells[cell_key(2, s, m)] = {"ad": ads[m][j], "test": {"acc": accs[m][j]}}
    row = aggregate(cfg, cells)["gaps"]["l2"][0]
    gaps = np.array([0.3, 0.0, 0.3])
    assert row["ad_gap"][0] == pytest.approx(list(gaps))
    assert row["ad_gap_mean"][0] == pytest.approx(0.2)
    assert row["ad_gap_se"][0] == pytest.approx(gaps.std(ddof=0) / np.sqrt(3))
    assert row["acc_gap_mean"][0] == pytest.approx(0.05)


@pytest.mark.slow
def test_two_worker_processes_give_the_same_cells_as_one(tmp_path):
    cfg = tiny_config(seeds=[2], eps={"l2": [1.0], "linf": [0.3]})
    a = run_disparity_study(cfg, tmp_path / "one", workers=1, quiet=True)
    b = run_disparity_study(cfg, tmp_path / "two", workers=2, quiet=True)
    assert a["gaps"] == b["gaps"]


def test_presets_follow_the_official_grids():
    gauss = study_preset("stable-mixture", 2)
    assert gauss["eps"] == {"l2": [5.0, 3.75, 2.5], "linf": [1.0, 0.75, 0.5]}
    assert study_preset("stable-mixture", 1.5)["eps"]["linf"] == [0.555, 0.4163, 0.2775]
    assert study_preset("stable-mixture", 1)["eps"]["l2"][0] == 23.425
    cifar = study_preset("cifar10-binary")
    assert cifar["model"] == "mlp" and cifar["lrs_robust"] == [5e-3, 1e-3, 5e-4, 2e-4, 1e-4]
    assert cifar["train"] == {"optimizer": "sgd", "momentum": 0.9}
    cfg = build_study_config(gauss)
    assert len(cfg.methods) == 7 and cfg.seeds == [2, 22, 42, 62, 82]
    assert cfg.ratios == [1, 2, 5, 10, 20] and cfg.train.epochs == 500
    assert cfg.train.patience == 50 and cfg.train.batch_size == 64
    assert cfg.train.accumulate_attack_grads is False
    with pytest.raises(UserError, match="eps.linf"):
        build_study_config({**gauss, "eps": {"l2": [1.0]}})
    with pytest.raises(UserError, match="closed-form needs model linear"):
        build_study_config({**gauss, "model": "mlp", "train": {"attack": "closed-form"}})


def test_cli_study_disparity(tmp_path):
    runner = CliRunner()
    args = ["study", "disparity", "--alpha", "2", "--ratios", "1,4", "--seeds", "2",
            "--lrs", "0.01", "--eps-l2", "1", "--eps-linf", "0.3", "--epochs", "3",
            "--patience", "2", "--workers", "1", "--quiet", "-o", str(tmp_path)]
    for kv in ("d=8", "mu=1", "sigma=2", "n_major=60", "n_val_major=30", "n_test=40"):
        args += ["--set", f"data_params.{kv}"]
    out = runner.invoke(cli, args)
    assert out.exit_code == 0, out.output
    assert "AD gap" in out.output and (tmp_path / "figure1.png").exists()
    assert json.loads((tmp_path / "study.json").read_text())["data_params"]["alpha"] == 2.0
    bad = runner.invoke(cli, ["study", "disparity", "--eps-l2", "big", "-o", str(tmp_path)])
    assert isinstance(bad.exception, UserError) and "--eps-l2" in str(bad.exception)
    bad = runner.invoke(cli, ["study", "disparity", "--dataset", "digits", "--eps-l2", "1",
                              "--eps-linf", "0.1", "-o", str(tmp_path / "d"), "-q"])
    assert isinstance(bad.exception, UserError) and "binary" in str(bad.exception)
