"""``robustfair report``: one HTML page per run whose numbers equal the JSON they come from."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from robustfair.cli import main
from robustfair.config import load_config
from robustfair.engine.evaluator import EvalResult
from robustfair.metrics.classwise import per_class_accuracy
from robustfair.report import eps_curve as eps_curve_mod
from robustfair.report.html import fmt_value
from robustfair.report.run_report import SECTIONS, ReportOptions, build_report

HAS_TB = importlib.util.find_spec("tensorboard") is not None
FACTORS = (0.0, 0.5, 1.0, 2.0)


# ------------------------------------------------------------------------------ page parsing
class _Page(HTMLParser):
    """Collects the sections, the numbers with their provenance, and the table cells."""

    def __init__(self) -> None:
        super().__init__()
        self.sections: dict[str, str] = {}
        self.nums: list[dict[str, str]] = []
        self.cells: list[tuple[dict[str, str], str]] = []
        self.images: list[str] = []
        self.missing: set[str] = set()
        self._section: str | None = None
        self._stack: list[tuple[str, dict[str, str], list[str]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "section":
            self._section = a["id"]
            self.sections[a["id"]] = ""
        if tag == "p" and "missing" in a.get("class", "") and self._section is not None:
            self.missing.add(self._section)
        if tag == "img":
            self.images.append(a["src"])
            return
        self._stack.append((tag, a, []))

    def handle_endtag(self, tag: str) -> None:
        if not self._stack:
            return
        t, a, text = self._stack.pop()
        joined = "".join(text)
        if self._stack:
            self._stack[-1][2].append(joined)
        if "data-src" in a:
            self.nums.append({**a, "text": joined})
        if t == "td":
            self.cells.append((a, joined))

    def handle_data(self, data: str) -> None:
        if self._stack:
            self._stack[-1][2].append(data)
        if self._section is not None:
            self.sections[self._section] += data


def parse(path: Path) -> _Page:
    p = _Page()
    p.feed(path.read_text(encoding="utf-8"))
    return p


def resolve(run_dir: Path, src: str) -> Any:
    """The value a ``data-src="FILE#/pointer"`` names (for log.jsonl the first token is the
    line)."""
    file, _, ptr = src.partition("#")
    path = run_dir / file
    if file.endswith(".jsonl"):
        doc: Any = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    elif file.endswith((".yaml", ".yml")):
        doc = yaml.safe_load(path.read_text())
    else:
        doc = json.loads(path.read_text())
    for tok in ptr.split("/")[1:]:
        tok = tok.replace("~1", "/").replace("~0", "~")
        doc = doc[int(tok)] if isinstance(doc, list) else doc[tok]
    return doc


def check_every_number(run_dir: Path, page: _Page) -> int:
    """Each number equals its source and is shown as its format says; no table cell shows a
    number without a source. Returns how many numbers were checked."""
    for n in page.nums:
        want = resolve(run_dir, n["data-src"])
        got = json.loads(n["data-value"])
        if isinstance(want, float) and np.isnan(want):
            want = None
        assert got == want, n["data-src"]
        assert n["text"] == fmt_value(want, n["data-fmt"]), n["data-src"]
    for attrs, text in page.cells:
        if "data-src" not in attrs and "text" not in attrs.get("class", ""):
            assert not any(ch.isdigit() for ch in text), f"number without a source: {text!r}"
    return len(page.nums)


def srcs(page: _Page) -> set[str]:
    return {n["data-src"] for n in page.nums}


def missing(page: _Page, sid: str) -> bool:
    """Whether the section says that its inputs are not available."""
    return sid in page.missing


# ------------------------------------------------------------------------------ a real run
@pytest.fixture
def real_run(built_run: Path, tmp_path: Path) -> Path:
    """A copy of the reported run for one test: a test that rebuilds the report or evaluates
    again changes only its copy, whatever order the tests run in."""
    copy = tmp_path / "shared-run" / built_run.name
    shutil.copytree(built_run, copy)
    return copy


@pytest.fixture(scope="module")
def built_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two epochs of TRADES on a small MLP on digits, evaluated with clean, PGD-3 and FGSM."""
    from robustfair.commands.run import train_run

    out = tmp_path_factory.mktemp("runs")
    cfg = load_config(recipe="mnist5k-trades", overrides=[
        "name=tiny", f"output_dir={out}", "data.name=digits", "data.train_limit=400",
        "model.name=mlp", "model.params={hidden: [32]}", "train.epochs=2",
        "train.batch_size=100", "attack.eps=0.1", "attack.step_size=0.04", "attack.steps=2",
        "validation.attack=pgd2", "validation.n=100", "eval.attacks=[clean, pgd3, fgsm]",
        f"logging.tensorboard={str(HAS_TB).lower()}", "device=cpu"])
    run_dir, _ = train_run(cfg, force=True, quiet=True)
    opts = ReportOptions(eps_factors=FACTORS, eps_attack="pgd3", eps_n=60)
    build_report(run_dir, opts)
    return run_dir


def test_real_run_report_has_every_section_and_its_numbers(real_run: Path) -> None:
    page = parse(real_run / "report.html")
    assert list(page.sections) == list(SECTIONS)
    for sid in ("settings", "training", "per-class", "confusion", "similarity", "eps-curve"):
        assert not missing(page, sid), sid
    for sid in ("groups", "method-state", "checks"):  # digits has no groups, no policy, no checks
        assert missing(page, sid), sid
    assert check_every_number(real_run, page) > 200
    summary = json.loads((real_run / "eval" / "summary.json").read_text())
    found = srcs(page)
    for attack, figs in summary["attacks"].items():
        for k in range(summary["num_classes"]):
            assert f"eval/summary.json#/attacks/{attack}/per_class/{k}" in found
        for key in ("avg", "worst", "gap", "std"):
            assert f"eval/summary.json#/attacks/{attack}/{key}" in found
        # the worst class of each attack is the highlighted cell
        worst = [n for n in page.nums if n.get("class") == "worst" and
                 n["data-src"].startswith(f"eval/summary.json#/attacks/{attack}/per_class/")]
        assert [int(n["data-src"].rsplit("/", 1)[1]) for n in worst] == [figs["worst_class"]]
    assert "eval/summary.json#/worst_case/avg" in found
    assert "per-sample worst case over the ensemble" in page.sections["per-class"]
    log_lines = (real_run / "log.jsonl").read_text().splitlines()
    for i in range(len(log_lines)):
        for part in ("clean", "robust"):
            for key in ("avg", "worst"):
                assert f"log.jsonl#/{i}/val/{part}/{key}" in found
    for key in ("attack/eps", "seed", "method/objective", "data/name", "model/name"):
        assert f"config.yaml#/{key}" in found
    assert all(src.startswith("data:image/png;base64,") for src in page.images)
    assert len(page.images) >= 6
    text = (real_run / "report.html").read_text()
    assert "http://" not in text and "https://" not in text  # nothing to fetch


def test_confusion_and_similarity_come_from_the_matrix(real_run: Path) -> None:
    data = json.loads((real_run / "report_data.json").read_text())
    res = EvalResult.load(real_run / "eval" / "summary_matrix.npz")
    summary = json.loads((real_run / "eval" / "summary.json").read_text())
    # default attack: the adversarial attack with the lowest average accuracy (no AutoAttack)
    adv = {a: v["avg"] for a, v in summary["attacks"].items() if a != "clean"}
    attack = min(adv, key=adv.get)
    assert data["confusion"]["attack"] == attack
    counts = res.confusion(attack)
    assert data["confusion"]["counts"] == counts.tolist()
    assert counts.sum(1).tolist() == summary["attacks"][attack]["counts"]
    diag = (counts.diag().double() / counts.sum(1).double()).tolist()
    assert diag == pytest.approx(summary["attacks"][attack]["per_class"], abs=1e-12)
    sim = np.array(data["similarity"]["matrix"])
    assert sim.sum(1) == pytest.approx(np.ones(len(sim)))
    assert sim == pytest.approx(counts.numpy() / counts.numpy().sum(1, keepdims=True))


def test_eps_curve_starts_at_clean_accuracy_and_is_reused(real_run: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    curve = json.loads((real_run / "eval" / "eps_curve.json").read_text())
    assert curve["factors"] == list(FACTORS) and curve["attack"] == "pgd3"
    assert curve["eps"] == pytest.approx([f * 0.1 for f in FACTORS])
    assert len(curve["per_class"]) == len(FACTORS) and len(curve["per_class"][0]) == 10
    # ε = 0 is clean accuracy on the same test images: cross-check with the saved matrix
    res = EvalResult.load(real_run / "eval" / "summary_matrix.npz")
    idx = torch.tensor(curve["subset"]["indices"])  # the images of eval --n 60
    acc, counts = per_class_accuracy(res.row("clean")[idx], res.labels[idx], 10)
    assert curve["per_class"][0] == pytest.approx(acc.tolist())
    assert curve["counts"] == counts.tolist()
    # a larger radius never helps on average
    assert curve["avg"][-1] < curve["avg"][0]
    # the saved curve is current: a second report does not attack again
    monkeypatch.setattr(eps_curve_mod, "compute_eps_curve",
                        lambda *a, **k: pytest.fail("recomputed a current ε curve"))
    build_report(real_run, ReportOptions(eps_factors=FACTORS, eps_attack="pgd3", eps_n=60),
                 progress=None)


@pytest.mark.skipif(not HAS_TB, reason="the tensorboard package is not installed "
                                       "(pip install tensorboard)")
def test_tensorboard_event_files_hold_the_logged_scalars(real_run: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = list((real_run / "tensorboard").glob("events.out.tfevents.*"))
    assert files, "no TensorBoard event file written"
    acc = EventAccumulator(str(real_run / "tensorboard"))
    acc.Reload()
    lines = [json.loads(x) for x in (real_run / "log.jsonl").read_text().splitlines()]
    loss = acc.Scalars("train/train_loss")
    assert [e.step for e in loss] == [ln["epoch"] for ln in lines]
    assert [e.value for e in loss] == pytest.approx([ln["train_loss"] for ln in lines],
                                                    rel=1e-6)
    robust = acc.Scalars("val/robust_worst")
    assert [e.value for e in robust] == pytest.approx(
        [ln["val"]["robust"]["worst"] for ln in lines], rel=1e-6)


# ------------------------------------------------------------------------------ hand-made files
def _hand_made_run(root: Path) -> Path:
    """An evaluation made by hand: 3 classes, 2 groups, 12 samples, clean / pgd20 / cw20, plus
    a log with DAFA-like and Dr-Fairness-like state, checks, an analysis JSON, a saved ε curve
    and a CAM image."""
    run = root / "hand"
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2])
    groups = torch.tensor([0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1])
    pred = torch.tensor([
        [0, 0, 0, 1, 1, 1, 1, 1, 2, 2, 2, 0],  # clean: 3 + 4 + 3 = 10 correct
        [0, 1, 2, 1, 1, 0, 1, 1, 2, 0, 0, 2],  # pgd20: 1 + 3 + 2 = 6
        [0, 1, 0, 1, 1, 0, 0, 1, 2, 0, 0, 0],  # cw20: 2 + 2 + 1 = 5
    ])
    correct = pred == labels
    settings = {"eps": 8 / 255, "norm": "linf", "seed": 3, "n": 12,
                "attacks": [{"attack": "clean"}, {"attack": "pgd20", "steps": 20},
                            {"attack": "cw20", "steps": 20}],
                "class_names": ["cat", "dog", "bird"], "group_names": ["young", "old"]}
    EvalResult(["clean", "pgd20", "cw20"], correct, pred, labels, 3, groups,
               settings).save(run / "eval")
    lines = []
    for e in (1, 2, 3):
        lines.append({
            "epoch": e, "lr": 0.1, "train_loss": 2.0 / e,
            "val": {"clean": {"avg": 0.5 + 0.1 * e, "worst": 0.1 * e, "worst_class": 2},
                    "robust": {"avg": 0.2 + 0.05 * e, "worst": 0.05 * e, "worst_class": 2},
                    "robust_attack": "pgd10"},
            "policy": {"class_weights": [1.0, 1.0 - 0.1 * e, 1.0 + 0.1 * e],
                       "eps_scale": [1.0, 0.9, 1.1 + 0.01 * e], "stage": "warmup"},
            "sampler": {"lambda": [[0.5, 0.5 - 0.05 * e], [0.4, 0.6], [0.3, 0.7]],
                        "mu": [0.25 * e, 1.0 - 0.25 * e], "inner": {"temperature": 1.0 / e},
                        "history": [{"step": e, "gap": 0.1}]},
        })
    (run / "log.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    (run / "eval" / "checks.json").write_text(json.dumps({"checks": [
        {"name": "eps0_equals_clean", "passed": True, "clean": 0.8333, "eps0": 0.8333},
        {"name": "monotone_in_eps", "passed": False, "message": "accuracy rose from 0.4 to 0.5"},
        {"name": "unbounded_attack_reaches_zero", "status": "warn", "accuracy": 0.02},
    ]}))
    (run / "analysis").mkdir()
    (run / "analysis" / "class_distance.json").write_text(json.dumps({
        "attack": "pgd20", "similarity": [[0.7, 0.2, 0.1], [0.3, 0.6, 0.1], [0.25, 0.05, 0.7]]}))
    (run / "eval" / "eps_curve.json").write_text(json.dumps({
        "attack": "pgd20", "norm": "linf", "eps": [0.0, 4 / 255, 8 / 255], "n": 12,
        "avg": [10 / 12, 8 / 12, 6 / 12], "worst": [0.75, 0.5, 0.25],
        "per_class": [[0.75, 1.0, 0.75], [0.5, 1.0, 0.5], [0.25, 0.75, 0.5]]}))
    from PIL import Image

    Image.new("RGB", (24, 12), (200, 30, 30)).save(run / "cam_examples.png")
    return run


def test_hand_made_evaluation_report(tmp_path: Path) -> None:
    run = _hand_made_run(tmp_path)
    build_report(run, ReportOptions())
    page = parse(run / "report.html")
    assert list(page.sections) == list(SECTIONS)
    for sid in SECTIONS:
        assert not missing(page, sid), sid
    check_every_number(run, page)
    summary = json.loads((run / "eval" / "summary.json").read_text())
    # the summary holds the hand-counted figures, and the page shows them
    assert summary["attacks"]["clean"]["per_class"] == [0.75, 1.0, 0.75]
    assert summary["attacks"]["pgd20"]["per_class"] == [0.25, 0.75, 0.5]
    assert summary["attacks"]["cw20"]["avg"] == pytest.approx(5 / 12)
    assert summary["worst_case"]["per_class"] == [0.25, 0.5, 0.25]
    shown = {n["data-src"]: n["text"] for n in page.nums}
    assert shown["eval/summary.json#/attacks/pgd20/per_class/0"] == "25.00"
    assert shown["eval/summary.json#/attacks/cw20/avg"] == "41.67"
    assert shown["eval/summary.json#/settings/eps"] == "0.03137 (= 8/255)"
    # groups: young = even samples (clean: all 6 right), old = odd ones (3 and 11 wrong)
    g = summary["groups"]["attacks"]
    assert g["clean"]["per_group"] == [1.0, pytest.approx(4 / 6)]
    assert g["pgd20"]["per_group"] == [pytest.approx(4 / 6), pytest.approx(2 / 6)]
    assert shown["eval/summary.json#/groups/attacks/clean/per_group/1"] == "66.67"
    assert "eval/summary.json#/groups/attacks/pgd20/dp_diff" in shown
    assert "young" in page.sections["groups"] and "old" in page.sections["groups"]
    # method state: every per-class / per-group list of the log, per epoch
    for i in range(3):
        for key, n in (("policy/class_weights", 3), ("policy/eps_scale", 3), ("sampler/mu", 2)):
            for j in range(n):
                assert f"log.jsonl#/{i}/{key}/{j}" in shown
        for y in range(3):  # Dr-Fairness' λ per (label, group)
            for z in range(2):
                assert f"log.jsonl#/{i}/sampler/lambda/{y}/{z}" in shown
        assert f"log.jsonl#/{i}/sampler/inner/temperature" in shown
        assert not any(k.startswith(f"log.jsonl#/{i}/sampler/history") for k in shown)
    assert shown["log.jsonl#/2/policy/class_weights/2"] == "1.3"
    state = page.sections["method-state"]
    assert "dog / old" in state and "young" in state  # columns named by class and group
    assert "cam_examples.png" in page.sections["method-state"]
    # similarity read from the analysis JSON, not recomputed
    assert shown["analysis/class_distance.json#/similarity/1/0"] == "0.3"
    assert "similarity" not in json.loads((run / "report_data.json").read_text())
    # the saved ε curve is shown as it is
    assert shown["eval/eps_curve.json#/per_class/2/1"] == "75.00"
    # sanity-check verdicts
    verdicts = {n["data-src"]: (n["text"], n.get("class")) for n in page.nums
                if n["data-fmt"] == "verdict"}
    assert verdicts == {"eval/checks.json#/checks/0/passed": ("PASS", "pass"),
                        "eval/checks.json#/checks/1/passed": ("FAIL", "fail"),
                        "eval/checks.json#/checks/2/status": ("WARN", "warn")}
    # confusion under the strongest attack (cw20: 5/12 < pgd20: 6/12), from the matrix
    data = json.loads((run / "report_data.json").read_text())
    assert data["confusion"]["attack"] == "cw20"
    assert data["confusion"]["counts"] == [[2, 2, 0], [2, 2, 0], [3, 0, 1]]


def test_groups_recomputed_from_the_matrix_when_the_summary_has_none(tmp_path: Path) -> None:
    run = _hand_made_run(tmp_path)
    summary = json.loads((run / "eval" / "summary.json").read_text())
    del summary["groups"]
    (run / "eval" / "summary.json").write_text(json.dumps(summary))
    build_report(run, ReportOptions())
    page = parse(run / "report.html")
    assert not missing(page, "groups")
    check_every_number(run, page)
    g = json.loads((run / "report_data.json").read_text())["groups"]["attacks"]
    assert g["clean"]["per_class"] == [1.0, pytest.approx(4 / 6)]
    assert g["pgd20"]["per_class"] == [pytest.approx(4 / 6), pytest.approx(2 / 6)]
    assert g["worst_case"]["per_class"] == [0.5, pytest.approx(1 / 6)]


def test_report_tolerates_a_run_with_only_a_config(tmp_path: Path) -> None:
    run = tmp_path / "fresh"
    run.mkdir()
    (run / "config.yaml").write_text("name: fresh\nseed: 4\ndata: {name: digits}\n"
                                     "model: {name: mlp}\nattack: {eps: 0.1, norm: linf}\n")
    (run / "checkpoints").mkdir()  # a download gone wrong: HTML instead of a checkpoint
    (run / "checkpoints" / "last.pt").write_text("<html>not a checkpoint</html>")
    build_report(run, ReportOptions())
    page = parse(run / "report.html")
    check_every_number(run, page)
    assert not missing(page, "settings")
    assert all(missing(page, sid) for sid in SECTIONS if sid != "settings")
    assert "could not be computed" in page.sections["eps-curve"]


def test_cli_report_quiet_and_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                    ) -> None:
    run = _hand_made_run(tmp_path)
    out = tmp_path / "r.html"
    with pytest.raises(SystemExit) as exc:
        main(["report", str(run), "--quiet", "--out", str(out)])
    assert exc.value.code == 0
    cap = capsys.readouterr()
    assert cap.out.strip() == f"report: {out}" and cap.err == ""
    assert out.exists()
    for argv, needle in (([str(tmp_path / "nope")], "not found"),
                         ([str(run), "--attack", "apgd-x"], "--attack"),
                         ([str(run), "--eps-factors", "a,b"], "--eps-factors"),
                         ([str(run), "--eps-attack", "nope3"], "unknown attack"),
                         ([str(tmp_path)], "not a run directory")):
        with pytest.raises(SystemExit) as exc:
            main(["report", *argv, "-q"])
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("error:") and needle in err and "Traceback" not in err


# ------------------------------------------------------------------------------ rendering
def _browser() -> str | None:
    return next((b for b in ("chromium", "chromium-browser", "google-chrome") if
                 shutil.which(b)), None)


@pytest.mark.skipif(_browser() is None, reason="no headless browser (chromium) installed; "
                                               "install it with 'apt-get install chromium'")
def test_report_renders_in_headless_chromium(real_run: Path, tmp_path: Path) -> None:
    from PIL import Image

    shot = tmp_path / "report.png"
    cmd = [_browser(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
           "--no-first-run", "--disable-background-networking", "--disable-component-update",
           "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}",
           "--window-size=1200,3000", (real_run / "report.html").resolve().as_uri()]
    subprocess.run(cmd, capture_output=True, timeout=120, check=False)
    assert shot.exists() and shot.stat().st_size > 20_000
    img = np.asarray(Image.open(shot).convert("RGB"))
    assert img.shape[:2] == (3000, 1200)
    # not blank: many colours, and the figures' dark blue bars are drawn
    assert len(np.unique(img.reshape(-1, 3), axis=0)) > 200
    assert img.std() > 20


# ------------------------------------------------------------------------------ figures
@pytest.fixture
def drawn(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """The matplotlib figures the report draws, in page order (kept, and drawn once)."""
    from robustfair.report import figures as fig_mod

    kept: list[Any] = []
    original = fig_mod.to_base64

    def keep(fig: Any) -> str:
        kept.append(fig)
        return original(fig)

    monkeypatch.setattr(fig_mod, "to_base64", keep)
    return kept


def _titles(fig: Any) -> list[str]:
    return [ax.get_title() for ax in fig.axes]


def _by_title(figs: list[Any], needle: str) -> Any:
    return next(f for f in figs if any(needle in t for t in _titles(f)))


def _legend_texts(ax: Any) -> list[str]:
    leg = ax.get_legend()
    return [t.get_text() for t in leg.get_texts()] if leg is not None else []


def _colorbar_label(fig: Any) -> str:
    """The label of the figure's colour bar (the axes that holds no title)."""
    cbars = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]
    assert len(cbars) == 1
    return cbars[0].get_ylabel()


def assert_no_empty_axes(fig: Any) -> None:
    for ax in fig.axes:
        if ax.get_label() == "<colorbar>":
            continue
        drawn_items = ax.lines + ax.images + ax.patches + ax.collections
        assert ax.get_visible() and drawn_items, f"empty axes {ax.get_title()!r}"


def test_report_figures_label_what_they_show(tmp_path: Path, drawn: list[Any]) -> None:
    run = _hand_made_run(tmp_path)
    lines = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    for ln in lines:
        ln["policy"]["warmup"] = 5  # DAFA logs its warm-up every epoch: constant
    (run / "log.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    build_report(run, ReportOptions())
    for fig in drawn:
        assert_no_empty_axes(fig)
    # the similarity read from the analysis JSON: the colour bar names the quantity and attack
    sim = _by_title(drawn, "class similarity")
    assert "pgd20" in _colorbar_label(sim) and "softmax" in _colorbar_label(sim)
    conf = _by_title(drawn, "confusion under")
    assert "cw20" in _colorbar_label(conf)
    # a constant quantity is a table row, not a flat line
    state = _by_title(drawn, "policy/class_weights")
    assert "policy/warmup" not in _titles(state)
    page = parse(run / "report.html")
    assert "unchanged over training" in page.sections["method-state"]
    assert "policy/warmup" in page.sections["method-state"]
    assert {n["data-src"] for n in page.nums} >= {"log.jsonl#/0/policy/warmup"}
    check_every_number(run, page)
    # legends sit beside their panel, not over the lines
    state.canvas.draw()
    for ax in state.axes:
        if ax.get_legend() is None:
            continue
        box = ax.get_window_extent()
        assert ax.get_legend().get_window_extent().x0 >= box.x1 - 1, ax.get_title()
    lam = next(ax for ax in state.axes if ax.get_title() == "sampler/lambda")
    assert _legend_texts(lam)[:2] == ["cat / young", "cat / old"]


def test_label_by_group_legend_when_labels_and_groups_are_as_many(tmp_path: Path,
                                                                  drawn: list[Any]) -> None:
    """FairBatch's λ is (label, group): with 2 labels and 2 groups the columns are still the
    groups."""
    run = tmp_path / "fb"
    labels = torch.tensor([0, 0, 1, 1])
    settings = {"eps": 0.1, "norm": "linf", "seed": 0, "n": 4, "attacks": [{"attack": "clean"}],
                "class_names": ["small", "large"], "group_names": ["plain", "thick"]}
    EvalResult(["clean"], torch.ones(1, 4, dtype=torch.bool), labels[None], labels, 2,
               torch.tensor([0, 1, 0, 1]), settings).save(run / "eval")
    (run / "log.jsonl").write_text("".join(json.dumps(
        {"epoch": e, "train_loss": 1.0, "sampler": {"lambda": [[0.5 + 0.1 * e, 0.5 - 0.1 * e],
                                                              [0.5, 0.5]]}}) + "\n"
        for e in (1, 2)))
    build_report(run, ReportOptions(eps_curve=False))
    lam = _by_title(drawn, "sampler/lambda").axes[0]
    assert _legend_texts(lam) == ["small / plain", "small / thick", "large / plain",
                                  "large / thick"]


def test_standard_training_shows_no_adversarial_accuracy_and_no_empty_panel(
        tmp_path: Path, drawn: list[Any]) -> None:
    from robustfair.engine.trainer import Trainer, prepare_run_dir

    cfg = load_config(recipe="mnist5k-standard", overrides=[
        "name=std", f"output_dir={tmp_path}", "data.name=digits", "data.train_limit=200",
        "model.name=mlp", "model.params={hidden: [16]}", "train.epochs=2",
        "train.batch_size=100", "validation.every=0", "device=cpu"])
    run = prepare_run_dir(cfg)
    Trainer(cfg, run, quiet=True).fit()
    lines = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    assert all("train_adv_acc" not in ln and "train_clean_acc" in ln for ln in lines)
    build_report(run, ReportOptions(eps_curve=False))
    curves = _by_title(drawn, "loss")
    assert_no_empty_axes(curves)
    assert _titles(curves) == ["loss", "accuracy on the training batches (validation is off)"]
    assert _legend_texts(curves.axes[1]) == ["clean (training batches)"]
    page = parse(run / "report.html")
    assert "train adv acc" not in page.sections["training"]
    assert "did not validate" in page.sections["training"]
    check_every_number(run, page)
    # an older log that wrote 0.00 for standard training: hidden because of the objective
    for ln in lines:
        ln["train_adv_acc"] = 0.0
    (run / "log.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    drawn.clear()
    build_report(run, ReportOptions(eps_curve=False))
    assert "train adv acc" not in parse(run / "report.html").sections["training"]
    assert _legend_texts(_by_title(drawn, "loss").axes[1]) == ["clean (training batches)"]


def test_validation_curves_keep_two_panels(real_run: Path, drawn: list[Any]) -> None:
    build_report(real_run, ReportOptions(eps_curve=False))
    curves = _by_title(drawn, "validation accuracy")
    assert_no_empty_axes(curves)
    assert "pgd2: worst class" in _legend_texts(curves.axes[1])
    assert "train adv acc" in parse(real_run / "report.html").sections["training"]
