"""Benchmark: both rows of AT-on-AD's Figure 1 (Hu et al., ICML 2023, arXiv:2211.15762) on the
stable mixtures, measured with ``robustfair study disparity`` next to the closed form.

For each mixture (Gaussian α = 2, Holtsmark α = 1.5, Cauchy α = 1) it prints the gap of accuracy
disparity (row 1) and the gap of standard accuracy (row 2) per norm, ε and R as mean ± SE over
seeds, beside the closed form of :mod:`robustfair.studies.oracle` (the best standard and robust
linear rules of the population), then the paper's claims and whether they hold (whatever the
outcome, the measured numbers are printed):

1. Gaussian mixture: adversarial training lowers standard accuracy (gap of standard accuracy
   > 0) and raises accuracy disparity more as the imbalance ratio R grows.
2. Holtsmark and Cauchy mixtures: R acts differently on the AD gap (heavy tails).

``--preset figure1`` (default) uses the mixtures on which the robust direction differs from the
best one; ``--preset official`` the scalar mixture ±μ·1 + σz, where row 2 is ≈ 0 by construction.

Usage (from the repository root)::

    python benchmarks/bench_disparity.py --quick        # minutes on 2 CPU cores
    python benchmarks/bench_disparity.py                # the paper's grid (long)
    python benchmarks/bench_disparity.py --quick --selection robust --min-epochs 5

Cells are cached under ``--output-dir`` (one study folder per α), so a second run only prints.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from robustfair.studies.disparity import build_study_config, results_table, run_disparity_study
from robustfair.studies.presets import study_preset

MIXTURES = [(2.0, "Gaussian"), (1.5, "Holtsmark"), (1.0, "Cauchy")]


def study_settings(alpha: float, quick: bool, preset: str = "figure1",
                   selection: str = "clean", min_epochs: int = 0) -> dict[str, Any]:
    raw = study_preset("stable-mixture", alpha, preset)
    raw["train"].update(selection=selection, min_epochs=min_epochs)
    if quick:
        raw.update(seeds=[2, 22, 42], ratios=[1, 5, 10], lrs_standard=[1e-2], lrs_robust=[1e-2])
        raw["data_params"].update(n_major=2000, n_val_major=500)
        raw["train"].update(epochs=40, patience=10)
    return raw


def trend(values: list[float]) -> str:
    """'rises' (monotone up), 'falls', or 'mixed' across R."""
    d = np.diff(values)
    if np.all(d > 0):
        return "rises"
    if np.all(d < 0):
        return "falls"
    return "mixed"


def summarise(res: dict[str, Any]) -> dict[str, Any]:
    """Fractions over the (norm, ε) rows: acc gap > 0 (all R, and at R = 1), AD gap rising."""
    rows = [row for n in res["norms"] for row in res["gaps"][n]]
    acc = np.array([row["acc_gap_mean"] for row in rows])
    ad = np.array([row["ad_gap_mean"] for row in rows])
    return {
        "acc_gap_mean": float(acc.mean()), "acc_gap_pos": int((acc > 0).sum()),
        "acc_gap_r1_mean": float(acc[:, 0].mean()), "cells": int(acc.size),
        "ad_rise": sum(trend(list(r)) == "rises" for r in ad), "rows": len(rows),
        "ad_first": float(ad[:, 0].mean()), "ad_last": float(ad[:, -1].mean()),
        "ad_max_at": [res["ratios"][int(i)] for i in ad.argmax(1)],
    }


def findings(summary: dict[str, dict[str, Any]], ratios: list[float]) -> list[str]:
    r0, r1 = f"{ratios[0]:g}", f"{ratios[-1]:g}"
    g = summary["Gaussian"]
    out = [f"{'finding':<58} {'measured':<62} holds", "-" * 128]

    def line(claim: str, measured: str, ok: bool) -> None:
        out.append(f"{claim:<58} {measured:<62} {'yes' if ok else 'NO'}")

    line("Gaussian: AT lowers standard accuracy (acc gap > 0)",
         f"mean {100 * g['acc_gap_mean']:+.2f} pts; > 0 in {g['acc_gap_pos']}/{g['cells']} "
         f"(norm, eps, R); at R=1 {100 * g['acc_gap_r1_mean']:+.2f}",
         g["acc_gap_mean"] > 0 and g["acc_gap_pos"] > g["cells"] / 2)
    line("Gaussian: AD gap grows with R",
         f"rises in {g['ad_rise']}/{g['rows']} (norm, eps); mean R={r0} "
         f"{100 * g['ad_first']:+.2f} -> R={r1} {100 * g['ad_last']:+.2f} pts",
         g["ad_rise"] > g["rows"] / 2 and g["ad_last"] > g["ad_first"])
    for name in ("Holtsmark", "Cauchy"):
        s = summary[name]
        line(f"{name}: AT lowers standard accuracy (acc gap > 0)",
             f"mean {100 * s['acc_gap_mean']:+.2f} pts; > 0 in {s['acc_gap_pos']}/{s['cells']}; "
             f"at R=1 {100 * s['acc_gap_r1_mean']:+.2f}", s["acc_gap_mean"] > 0)
        differs = s["ad_rise"] <= s["rows"] / 2 or (
            s["ad_last"] - s["ad_first"]) < 0.5 * (g["ad_last"] - g["ad_first"])
        line(f"{name}: R acts differently on the AD gap than for Gaussian",
             f"rises in {s['ad_rise']}/{s['rows']}; R={r0} {100 * s['ad_first']:+.2f} -> "
             f"R={r1} {100 * s['ad_last']:+.2f} pts (Gaussian "
             f"{100 * (g['ad_last'] - g['ad_first']):+.2f})", differs)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="3 seeds, R in {1, 5, 10}, learning "
                    "rate 0.01, N = 2000, at most 40 epochs (patience 10)")
    ap.add_argument("--preset", choices=["figure1", "official"], default="figure1")
    ap.add_argument("--selection", choices=["clean", "robust"], default="clean",
                    help="validation loss that selects epoch and lr (official: clean)")
    ap.add_argument("--min-epochs", type=int, default=0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--output-dir", default="runs/bench-disparity")
    ap.add_argument("--json", default=None, help="also write the summary here")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args()
    t0 = time.perf_counter()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"AT-on-AD disparity benchmark ({'quick' if args.quick else 'full'}, preset "
          f"{args.preset}); load average {load:.1f}")
    results, summary, lines = {}, {}, []
    tag = (f"{args.preset}-{args.selection}{args.min_epochs or ''}"
           f"{'-quick' if args.quick else ''}")
    for alpha, name in MIXTURES:
        cfg = build_study_config(study_settings(alpha, args.quick, args.preset, args.selection,
                                                args.min_epochs))
        out = Path(args.output_dir) / f"alpha{alpha:g}-{tag}"
        res = run_disparity_study(cfg, out, workers=args.workers, quiet=args.quiet)
        results[name], summary[name] = res, summarise(res)
        lines += [results_table(res), ""]
    cfg0 = results["Gaussian"]
    print(f"\nRow 1 (AD gap) and row 2 (acc gap) in points, mean ± SE over "
          f"{len(cfg0['seeds'])} seeds, and the closed form; linear models, closed-form AT")
    print("\n".join(lines))
    print("\n".join(findings(summary, cfg0["ratios"])))
    print(f"\n({time.perf_counter() - t0:.0f} s; figures under {args.output_dir})")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
