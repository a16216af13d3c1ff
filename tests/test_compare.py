"""``robustfair compare``: the DAFA-style table, ρ against a baseline, mean ± std over seeds."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from robustfair.cli import main
from robustfair.errors import UserError
from robustfair.report.compare import compare_runs, to_markdown, write_outputs


def _figs(avg: float, worst: float) -> dict[str, Any]:
    return {"avg": avg, "worst": worst, "per_class": [worst, 2 * avg - worst], "counts": [5, 5],
            "worst_class": 0}


def make_run(root: Path, name: str, clean: tuple[float, float], robust: dict[str, tuple],
             seed: int = 0, method: str = "trades", config: bool = True) -> Path:
    """A run directory holding only what ``compare`` reads: config.yaml and the summary."""
    run = root / name
    (run / "eval").mkdir(parents=True)
    summary: dict[str, Any] = {"settings": {"seed": seed}, "n": 10, "num_classes": 2,
                               "attacks": {"clean": _figs(*clean)}}
    for attack, (avg, worst) in robust.items():
        if attack == "worst_case":
            summary["worst_case"] = {**_figs(avg, worst), "over": ["pgd20", "cw20"]}
        else:
            summary["attacks"][attack] = _figs(avg, worst)
    (run / "eval" / "summary.json").write_text(json.dumps(summary))
    if config:
        cfg = {"name": name, "seed": seed, "data": {"name": "digits"},
               "method": {"objective": {"name": "trades", "beta": 6.0},
                          "policy": {"name": method}}}
        (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    return run


def test_rho_against_a_hand_computation(tmp_path: Path) -> None:
    rob = lambda a, w: {"pgd20": (a, w)}  # noqa: E731
    base = make_run(tmp_path, "trades", (0.80, 0.60), rob(0.50, 0.20), method="none")
    dafa = make_run(tmp_path, "dafa", (0.79, 0.66), rob(0.49, 0.30), method="dafa")
    frl = make_run(tmp_path, "frl", (0.82, 0.70), rob(0.44, 0.25), method="frl")
    comp = compare_runs([dafa, base, frl], baseline=base)
    assert [r.label for r in comp.rows] == ["trades", "dafa", "frl"]  # baseline first
    assert comp.attack == "pgd20"
    rows = {r.label: r for r in comp.rows}
    # ρ = (worst − worst_base)/worst_base − (avg_base − avg)/avg_base
    assert rows["trades"].rho_nat == 0 and rows["trades"].rho_rob == 0
    assert rows["dafa"].rho_rob == pytest.approx((0.30 - 0.20) / 0.20 - (0.50 - 0.49) / 0.50)
    assert rows["dafa"].rho_rob == pytest.approx(0.48)
    assert rows["dafa"].rho_nat == pytest.approx(0.06 / 0.60 - 0.01 / 0.80)
    assert rows["frl"].rho_rob == pytest.approx(0.05 / 0.20 - 0.06 / 0.50)  # 0.13
    assert rows["frl"].rho_nat == pytest.approx(0.10 / 0.60 + 0.02 / 0.80)
    md = to_markdown(comp)
    assert "| dafa | 1 | 79.00 | 66.00 | 0.09 | 49.00 | 30.00 | 0.48 |" in md


def test_dafa_paper_table_rho_values(tmp_path: Path) -> None:
    """DAFA, Table 1 (CIFAR-10, TRADES baseline): ρ from the table's own means, to 2 decimals."""
    table = {  # clean avg, clean worst, ρ_nat, robust avg, robust worst, ρ_rob (percent)
        "trades": (82.04, 65.70, 0.00, 49.80, 21.31, 0.00),
        "frl": (82.97, 71.94, 0.11, 44.68, 25.84, 0.11),
        "cfa": (79.81, 65.18, -0.04, 50.78, 27.62, 0.32),
        "bat": (87.16, 74.02, 0.19, 45.89, 17.82, -0.24),
        "wat": (80.97, 70.57, 0.06, 46.30, 28.55, 0.27),
        "dafa": (81.63, 67.90, 0.03, 49.05, 30.53, 0.42),
    }
    runs = [make_run(tmp_path, m, (v[0] / 100, v[1] / 100), {"autoattack": (v[3] / 100,
                                                                             v[4] / 100)},
                     method=m) for m, v in table.items()]
    comp = compare_runs(runs)
    assert comp.attack == "autoattack" and comp.rows[0].label == "trades"
    for row in comp.rows:
        assert round(row.rho_nat, 2) == pytest.approx(table[row.label][2], abs=1e-9)
        assert round(row.rho_rob, 2) == pytest.approx(table[row.label][5], abs=1e-9)


def test_seeds_of_one_setting_are_pooled(tmp_path: Path) -> None:
    base = make_run(tmp_path, "trades", (0.80, 0.60), {"pgd20": (0.50, 0.20)}, method="none")
    s0 = make_run(tmp_path, "dafa-s0", (0.78, 0.64), {"pgd20": (0.48, 0.28)}, seed=0,
                  method="dafa")
    s1 = make_run(tmp_path, "dafa-s1", (0.80, 0.68), {"pgd20": (0.50, 0.32)}, seed=1,
                  method="dafa")
    comp = compare_runs([base, s0, s1])
    assert len(comp.rows) == 2
    dafa = comp.rows[1]
    assert dafa.label == "dafa" and len(dafa.runs) == 2
    assert dafa.robust_worst.mean == pytest.approx(0.30)
    assert dafa.robust_worst.std == pytest.approx(0.02)  # population std of 0.28, 0.32
    assert dafa.clean_avg.std == pytest.approx(np.std([0.78, 0.80]))
    # ρ from the means: (0.30 − 0.20)/0.20 − (0.50 − 0.49)/0.50
    assert dafa.rho_rob == pytest.approx(0.48)
    assert "| dafa | 2 | 79.00 ± 1.00 | 66.00 ± 2.00 |" in to_markdown(comp)
    # the same seeds grouped by name when the runs carry no config
    for p in (s0, s1):
        (p / "config.yaml").unlink()
    comp = compare_runs([base, s0, s1], group_by="name")
    assert [len(r.runs) for r in comp.rows] == [1, 2]


def test_strongest_attack_is_chosen_and_can_be_overridden(tmp_path: Path) -> None:
    three = {"pgd20": (0.5, 0.2), "cw20": (0.48, 0.18), "worst_case": (0.46, 0.15)}
    a = make_run(tmp_path, "a", (0.8, 0.6), three, method="none")
    b = make_run(tmp_path, "b", (0.8, 0.6), three, method="dafa")
    assert compare_runs([a, b]).attack == "worst_case"
    assert compare_runs([a, b], attack="cw20").attack == "cw20"
    assert compare_runs([a, b], attack="worst-case").rows[1].robust_worst.mean == 0.15
    with pytest.raises(UserError, match="autoattack"):
        compare_runs([a, b], attack="autoattack")
    c = make_run(tmp_path, "c", (0.8, 0.6), {"pgd20": (0.5, 0.2)}, method="frl")
    assert compare_runs([a, b, c]).attack == "pgd20"  # the strongest that every run has
    d = make_run(tmp_path, "d", (0.8, 0.6), {}, method="x")
    with pytest.raises(UserError, match="no attack in common"):
        compare_runs([a, d])


def test_outputs_and_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = make_run(tmp_path, "trades", (0.80, 0.60), {"pgd20": (0.50, 0.20)}, method="none")
    dafa = make_run(tmp_path, "dafa", (0.79, 0.66), {"pgd20": (0.49, 0.30)}, method="dafa")
    frl = make_run(tmp_path, "frl", (0.82, 0.70), {"pgd20": (0.44, 0.25)}, method="frl")
    out = tmp_path / "cmp"
    with pytest.raises(SystemExit) as exc:
        main(["compare", str(dafa), str(frl), "--baseline", str(base), "--out", str(out)])
    assert exc.value.code == 0
    printed = capsys.readouterr().out
    assert "| trades | 1 | 80.00 | 60.00 | 0.00 | 50.00 | 20.00 | 0.00 |" in printed
    assert "| dafa | 1 | 79.00 | 66.00 | 0.09 | 49.00 | 30.00 | 0.48 |" in printed
    rows = list(csv.DictReader((out / "compare.csv").open()))
    assert [r["method"] for r in rows] == ["trades", "dafa", "frl"]
    assert [r["baseline"] for r in rows] == ["1", "0", "0"]
    assert float(rows[1]["robust_worst"]) == 0.30
    assert float(rows[1]["rho_rob"]) == pytest.approx(0.48)
    assert float(rows[2]["rho_rob"]) == pytest.approx(0.13)
    assert (out / "compare.md").read_text() == printed.split("saved:")[0].rstrip("\n") + "\n"
    html = (out / "compare.html").read_text()
    assert "<td>0.48</td>" in html and "data:image/png;base64," in html
    png = (out / "avg_vs_worst.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    # --quiet prints only the saved paths; a run without an evaluation is a one-line error
    with pytest.raises(SystemExit) as exc:
        main(["compare", str(base), str(dafa), "--out", str(out), "-q"])
    assert exc.value.code == 0 and capsys.readouterr().out.startswith("saved:")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as exc:
        main(["compare", str(base), str(tmp_path / "empty")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "robustfair eval" in err


def test_same_name_different_settings_get_distinct_labels(tmp_path: Path) -> None:
    a = make_run(tmp_path / "x", "run", (0.8, 0.6), {"pgd20": (0.5, 0.2)}, method="none")
    b = make_run(tmp_path / "y", "run", (0.8, 0.6), {"pgd20": (0.5, 0.3)}, method="dafa")
    comp = compare_runs([a, b], baseline=a)
    labels = [r.label for r in comp.rows]
    assert labels == ["run [method.policy.name=none]", "run [method.policy.name=dafa]"]
    assert write_outputs(comp, tmp_path / "o")["csv"].exists()


def test_attack_settings_text_names_the_fast_versions_budgets() -> None:
    from robustfair.attacks import build_attack
    from robustfair.report.compare import _attack_text

    fast = _attack_text(build_attack("autoattack-fast").describe())
    assert fast == ("autoattack-fast (steps 100, n_queries 5000, version fast, fast_queries 1000, "
                    "near 1.0)")
    std = _attack_text(build_attack("autoattack").describe())
    assert std == "autoattack (steps 100, n_queries 5000, version standard)"
