"""Paired statistics (``robustfair.metrics.stats``), ``robustfair compare --paired`` and the
effect benchmark (``benchmarks/effects.py``): smoke runs, verdicts, the README table."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from robustfair.cli import main as cli
from robustfair.metrics.stats import VERDICTS, paired_interval, t_interval, verdict

ROOT = Path(__file__).resolve().parents[1]


def test_t_interval_matches_a_hand_computation() -> None:
    iv = t_interval([1.0, 2.0, 3.0, 4.0, 5.0])
    # mean 3, sd (ddof 1) √2.5, t_{0.975, 4} = 2.776445105
    half = 2.776445105 * math.sqrt(2.5) / math.sqrt(5)
    assert iv.mean == pytest.approx(3.0) and iv.sd == pytest.approx(math.sqrt(2.5))
    assert (iv.low, iv.high) == (pytest.approx(3 - half), pytest.approx(3 + half))
    assert iv.n == 5
    one = t_interval([2.0])
    assert one.low == -math.inf and one.high == math.inf and verdict(one.low, one.high, "up") \
        == "not shown"


def test_pairing_removes_what_the_seeds_share() -> None:
    # the seeds spread the figures by 10 points, the method adds 1 ± 0.2 on each seed
    base, method = [50.0, 60.0, 70.0], [51.0, 61.2, 70.8]
    iv = paired_interval(method, base)
    assert iv.diffs == pytest.approx((1.0, 1.2, 0.8))
    assert iv.low > 0 and verdict(iv.low, iv.high, "up") == "shown"
    unpaired_half = 4.302652729 * 10.0 / math.sqrt(3)  # the spread of one arm alone
    assert iv.high - iv.low < unpaired_half / 10
    with pytest.raises(ValueError, match="same seeds"):
        paired_interval([1.0, 2.0], [1.0])


@pytest.mark.parametrize(("low", "high", "direction", "margin", "expected"), [
    (-1.0, 2.0, "up", 0, "not shown"),  # includes 0
    (0.5, 2.0, "up", 0, "shown"),
    (-2.0, -0.5, "up", 0, "contradicted"),
    (-2.0, -0.5, "down", 0, "shown"),
    (-0.5, 0.3, "down", 0, "not shown"),
    (0.1, 0.2, "down", 0, "contradicted"),
    (-0.4, 0.8, "same", 1.0, "shown"),
    (-0.4, 1.8, "same", 1.0, "not shown"),
    (1.2, 1.8, "same", 1.0, "contradicted"),
    (-3.0, -1.5, "same", 1.0, "contradicted"),
    (float("nan"), float("nan"), "up", 0, "not shown"),
])
def test_verdict_on_hand_made_intervals(low: float, high: float, direction: str, margin: float,
                                        expected: str) -> None:
    assert verdict(low, high, direction, margin) == expected  # type: ignore[arg-type]


# ------------------------------------------------------------------------- compare --paired
def _run(root: Path, name: str, seed: int, robust_worst: float, clean_avg: float = 0.8) -> Path:
    run = root / name
    (run / "eval").mkdir(parents=True)
    figs = lambda a, w: {"avg": a, "worst": w, "per_class": [w, 2 * a - w],  # noqa: E731
                         "counts": [5, 5], "worst_class": 0}
    (run / "eval" / "summary.json").write_text(json.dumps({
        "settings": {"seed": seed}, "n": 10, "num_classes": 2,
        "attacks": {"clean": figs(clean_avg, 0.6), "pgd20": figs(0.5, robust_worst)}}))
    method = name.split("-")[0]
    (run / "config.yaml").write_text(yaml.safe_dump({
        "name": name, "seed": seed, "data": {"name": "digits"},
        "method": {"policy": {"name": method}}}))
    return run


def test_compare_paired_prints_per_seed_differences_and_t_intervals(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = [_run(tmp_path, f"none-s{s}", s, w) for s, w in enumerate([0.20, 0.25, 0.30])]
    dafa = [_run(tmp_path, f"dafa-s{s}", s, w) for s, w in enumerate([0.23, 0.27, 0.34])]
    out = tmp_path / "cmp"
    with pytest.raises(SystemExit) as exc:
        cli(["compare", *map(str, dafa + base), "--baseline", str(base[0]), "--paired",
             "--out", str(out)])
    assert exc.value.code == 0
    printed = capsys.readouterr().out
    # differences 3, 2, 4 points: mean 3, sd 1, t_{0.975, 2} = 4.3027 → ±2.48
    assert "| dafa | 0,1,2 |" in printed
    assert "+3.00 [+0.52, +5.48] (+3.0, +2.0, +4.0)" in printed
    data = json.loads((out / "paired.json").read_text())
    row = data["rows"][0]
    assert row["robust worst"]["diffs"] == pytest.approx([3.0, 2.0, 4.0])
    assert row["clean avg"]["mean"] == pytest.approx(0.0)
    # a setting that shares fewer than 2 seeds with the baseline: one line, exit 2
    lone = _run(tmp_path, "frl-s7", 7, 0.3)
    with pytest.raises(SystemExit) as exc:
        cli(["compare", *map(str, base), str(lone), "--paired", "--out", str(tmp_path / "c2")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "common seeds" in err
    assert not (tmp_path / "c2").exists()


# ------------------------------------------------------------------------- benchmarks/effects.py
@pytest.fixture(scope="module")
def effects() -> Any:
    spec = importlib.util.spec_from_file_location("effects_bench", ROOT / "benchmarks" /
                                                  "effects.py")
    mod = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    sys.modules["effects_bench"] = mod
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


@pytest.mark.parametrize("method", ["dafa", "lbgat", "frl", "cfa", "wat", "bat", "part",
                                    "drfairness"])
def test_effect_smoke_runs_and_reports(effects: Any, method: str, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str],
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from robustfair.data import DATASETS

    DATASETS.names()  # robustfair's own datasets first; the benchmark's go to a copy, dropped after
    monkeypatch.setattr(DATASETS, "_members", dict(DATASETS._members))
    (res,) = effects.main([method, "--smoke", "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    saved = json.loads((tmp_path / f"{method}.json").read_text())
    assert saved["smoke"] is True and saved["seeds"] == [0, 1]
    assert saved["provenance"]["torch"] and saved["provenance"]["commit"]
    assert len(saved["rows"]) == sum(len(c.claims) for c in effects.EFFECTS[method].comparisons)
    for row in saved["rows"]:
        iv = row["interval"]
        assert iv["n"] == 2 and row["verdict"] in VERDICTS
        assert iv["low"] <= iv["mean"] <= iv["high"]
        diffs = [m - b for m, b in zip(row["method"], row["base"], strict=True)]
        assert iv["diffs"] == pytest.approx(diffs)
        assert row["verdict"] == verdict(iv["low"], iv["high"], row["direction"], row["margin"])
        assert f"→ {row['verdict'].upper()}" in printed
    assert f"{method} (synthetic:" in printed and "paper:" in printed


def test_readme_table_is_written_from_results(effects: Any, tmp_path: Path) -> None:
    rows = [{"comparison": "TRADES → TRADES+DAFA", "claim": "worst-class PGD-20 accuracy up",
             "metric": "robust_worst", "direction": "up", "margin": 0.0, "unit": "points",
             "base_mean": 40.0, "method_mean": 41.0, "base": [40.0] * 3, "method": [41.0] * 3,
             "interval": {"mean": 1.0, "low": -0.5, "high": 2.5, "n": 3},
             "verdict": "not shown"}]
    res = {"method": "dafa", "setting": "synthetic:chain", "rows": rows, "smoke": False,
           "provenance": {"commit": "abc1234", "torch": "2.x", "python": "3.x",
                          "numpy": "1", "scipy": "1", "command": "python benchmarks/effects.py "
                                                                 "dafa"}}
    (tmp_path / "res").mkdir()
    (tmp_path / "res" / "dafa.json").write_text(json.dumps(res))
    readme = tmp_path / "README.md"
    readme.write_text(f"# Benchmarks\n\nintro\n\n{effects.BEGIN}\nold\n{effects.END}\n\nafter\n")
    effects.write_readme(tmp_path / "res", readme)
    text = readme.read_text()
    assert text.startswith("# Benchmarks\n\nintro") and text.endswith("after\n")
    assert "old" not in text
    assert ("| dafa | synthetic:chain | TRADES → TRADES+DAFA | worst-class PGD-20 accuracy up | "
            "40.00 → 41.00 | +1.00 pts [-0.50, +2.50] | 3 | **not shown** | abc1234 |") in text
    assert "| part | synthetic:region | – | – | – | – | – | not run | – |" in text
    assert "| dafa | mnist5k | – | – | – | – | – | not run | – |" in text
    assert "`python benchmarks/effects.py dafa`" in text
