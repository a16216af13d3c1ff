"""Figures outside the run report (``analyze``, ``analyze --cam``, ``study disparity``), checked
on their matplotlib artists; the one-line warnings about silent pitfalls; evaluation progress."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from robustfair.config import load_config


@pytest.fixture
def logged(caplog: pytest.LogCaptureFixture) -> Any:
    """Captures the ``robustfair`` logger (which the CLI stops from propagating)."""
    logger = logging.getLogger("robustfair")
    propagate = logger.propagate
    logger.propagate = False  # each record once, through caplog's own handler
    logger.addHandler(caplog.handler)
    caplog.set_level(logging.INFO, logger="robustfair")
    yield caplog
    logger.removeHandler(caplog.handler)
    logger.propagate = propagate


def _colorbars(fig: Any) -> list[Any]:
    return [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]


# ---------------------------------------------------------------------------- analyze
def test_similarity_heatmap_is_in_percent_with_a_labelled_colour_bar() -> None:
    from robustfair.analysis.class_distance import similarity_figure

    p = torch.tensor([[0.7, 0.2, 0.1], [0.3, 0.6, 0.1], [0.05, 0.25, 0.7]])
    fig = similarity_figure(p, ["a", "b", "c"], "class similarity under pgd20", "pgd20")
    ax = fig.axes[0]
    assert ax.images[0].get_clim() == (0, 100)
    assert [t.get_text() for t in ax.texts] == [f"{100 * v:.0f}" for v in p.flatten().tolist()]
    (cbar,) = _colorbars(fig)
    assert "(%)" in cbar.get_ylabel() and "pgd20" in cbar.get_ylabel()
    assert cbar.get_ylim() == (0, 100)  # the bar runs over the cells' scale


# ---------------------------------------------------------------------------- analyze --cam
def _cam_panels(eps: float, eps_low: float) -> tuple[torch.Tensor, torch.Tensor, dict]:
    torch.manual_seed(0)
    x = torch.rand(2, 1, 8, 8)
    w = torch.zeros(2, 1, 8, 8)
    w[0, :, :4] = 1.0  # first image: top half important; second: nothing is
    eps_map = torch.lerp(torch.full_like(x, eps_low), torch.full_like(x, eps), w)
    panels = {"pred": torch.tensor([1, 0]), "cam": torch.rand(2, 8, 8), "weights": w,
              "eps_map": eps_map, "layer": "net.conv"}
    return x, torch.tensor([1, 2]), panels


def _overlap(a: Any, b: Any) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


@pytest.mark.parametrize("hypothetical", [False, True])
def test_cam_grid_labels_colour_bar_and_uniform_map(hypothetical: bool) -> None:
    from robustfair.cam.visualize import cam_figure

    x, y, panels = _cam_panels(0.2, 0.175)
    fig = cam_figure(x, y, panels, [str(k) for k in range(10)], "run: gradcam on net.conv",
                     0.2, 0.175, hypothetical=hypothetical)
    (cbar,) = _colorbars(fig)
    assert cbar.get_ylabel() == "ε per pixel"
    assert [t.get_text() for t in cbar.get_yticklabels()] == ["ε_low 0.175", "ε 0.2"]
    eps_axes = [ax for ax in fig.axes if "ε map" in ax.get_title()]
    assert len(eps_axes) == 2
    assert all(ax.images[0].get_clim() == (0.175, 0.2) for ax in eps_axes)
    # the uniform map says what it is, the varying one does not
    assert [t.get_text() for t in eps_axes[0].texts] == []
    assert [t.get_text() for t in eps_axes[1].texts] == ["uniform: ε_low = 0.175\nat every pixel"]
    title = fig._suptitle.get_text()
    assert "black" not in title and "dark" in title and "bright" in title
    assert ("hypothetical" in title) == hypothetical
    assert all(("hypothetical" in ax.get_title()) == hypothetical for ax in eps_axes)
    # no title overlaps another
    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    boxes = [fig._suptitle.get_window_extent(r)] + [ax.title.get_window_extent(r)
                                                    for ax in fig.axes if ax.get_title()]
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            assert not _overlap(a, b)


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One epoch of standard training of a SmallCNN on 64 digits, validation off."""
    from robustfair.engine.trainer import Trainer, prepare_run_dir

    cfg = load_config(recipe="mnist5k-standard", overrides=[
        f"output_dir={tmp_path_factory.mktemp('runs')}", "data.name=digits",
        "data.train_limit=64", "train.epochs=1", "validation.every=0", "device=cpu",
        "logging.progress=false", "eval.n=20", "eval.attacks=[clean]"])
    run = prepare_run_dir(cfg)
    Trainer(cfg, run, quiet=True).fit()
    return run


def test_cam_on_a_run_without_pixel_budget_is_labelled_hypothetical(
        plain_run: Path, logged: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from robustfair.cam import visualize

    kept = []
    original = visualize.cam_figure

    def keep(*a: Any, **k: Any) -> Any:
        kept.append(original(*a, **k))
        return kept[-1]

    monkeypatch.setattr(visualize, "cam_figure", keep)
    visualize.analyze_cam(plain_run, n=2, quiet=True)
    (warning,) = [m for m in logged.messages if m.startswith("warning:")]
    assert "no pixel budget" in warning and "0.175" in warning
    title = kept[0]._suptitle.get_text()
    assert "hypothetical" in title and "0.175" in title


# ---------------------------------------------------------------------------- study disparity
def test_study_figure_says_error_bars_are_standard_errors(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from robustfair.studies import figures

    kept = []
    monkeypatch.setattr(figures, "_save", lambda fig, path: kept.append(fig))
    row = {"eps": 0.5, "ad_gap_mean": [0.01, 0.05], "ad_gap_se": [0.01, 0.02],
           "acc_gap_mean": [0.02, 0.03], "acc_gap_se": [0.005, 0.01],
           "ad_gap": [[0.0, 0.01, 0.02], [0.03, 0.05, 0.07]],  # (R, seed)
           "acc_gap": [[0.015, 0.02, 0.025], [0.02, 0.03, 0.04]]}
    results = {"ratios": [1, 5], "norms": ["l2"], "gaps": {"l2": [row]},
               "dataset": "stable-mixture", "model": "linear", "seeds": [1, 2, 3]}
    figures.plot_figure1(results, tmp_path)
    assert len(kept) == 3
    for fig in kept:
        assert "standard error" in fig._suptitle.get_text()
        assert "3 seeds" in fig._suptitle.get_text()


# ---------------------------------------------------------------------------- warnings
def test_step_larger_than_eps_after_an_override_is_named(logged: Any) -> None:
    cfg = load_config(recipe="dafa-mnist5k", overrides=["attack.eps=8/255"])
    assert cfg.attack.step_size == 0.05  # the config's value is kept...
    (msg,) = logged.messages  # ...and said, in one line, with the fix
    assert "\n" not in msg and "attack.step_size 0.05" in msg and "attack.eps=8/255" in msg
    assert "--set attack.step_size=" in msg
    logged.clear()
    load_config(recipe="dafa-mnist5k", overrides=["attack.eps=8/255", "attack.step_size=2/255"])
    load_config(recipe="dafa-mnist5k")
    assert logged.messages == []


def test_dafa_warmup_not_shorter_than_the_run_warns(logged: Any) -> None:
    from robustfair.policies.dafa import DAFA

    ctx = SimpleNamespace(num_classes=3, extra={"epochs": 4})
    never = DAFA(DAFA.Params(warmup=4), ctx)
    never.on_epoch_start(1)
    never.on_epoch_start(2)
    assert len(logged.messages) == 1 and "method.policy.warmup" in logged.messages[0]
    DAFA(DAFA.Params(warmup=3), ctx).on_epoch_start(1)
    assert len(logged.messages) == 1


def test_use_best_without_validation_warns(plain_run: Path, logged: Any) -> None:
    from robustfair.commands.evaluate import load_run

    load_run(plain_run, which="last")
    assert not [m for m in logged.messages if "best.pt" in m]
    load_run(plain_run, which="best")
    (msg,) = [m for m in logged.messages if "best.pt" in m]
    assert "same as --use last" in msg and "validation.every=1" in msg


# ---------------------------------------------------------------------------- progress
def test_evaluation_bar_moves_within_a_batch_and_changes_no_number(trained_mlp: Any,
                                                                   digits: Any) -> None:
    from robustfair.engine.evaluator import evaluate
    from robustfair.engine.progress import EvalProgress

    data = digits.test.subset(torch.arange(60))
    attacks = ["clean", "pgd5"]
    plain = evaluate(trained_mlp, data, attacks, 0.1, batch_size=30, seed=1)
    shown: list[float] = []
    with EvalProgress(len(data), attacks, "test") as bar:
        bar._show = lambda v: shown.append(v)  # type: ignore[method-assign]
        res = evaluate(bar.wrap(trained_mlp), data, attacks, 0.1, batch_size=30, seed=1,
                       progress=bar.batch_done)
    assert torch.equal(res.correct, plain.correct) and torch.equal(res.pred, plain.pred)
    # two batches, yet the bar moved at every model call: 5 PGD steps + 2 predictions each
    assert len(shown) == 2 * (5 + 2 + 1) and shown[-1] == 60
    assert shown == sorted(shown) and 0 < shown[0] < 30
