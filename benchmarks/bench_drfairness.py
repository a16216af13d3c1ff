"""Uniform sampling vs FairBatch vs Dr-Fairness on the offline group benchmark, with good and
with poor generated data (a benchmark script, not a test).

Setting: ``mnist5k-groups`` (label = digit ≥ 5, group = inverted digits, 10% minority group
within each label in training, balanced test groups), generated data from the package's
(label, group)-conditional generator at quality ``--good`` and ``--poor``; the recipe's MLP
(one hidden layer of 256) trained with plain cross-entropy, Adam 1e-3, batch 64. Methods:

- ``uniform-real``: uniform over the real training data only;
- ``uniform-all``: uniform over real and generated data;
- ``fairbatch``: FairBatch (equalized odds) over the real data;
- ``drfairness``: Dr-Fairness (equalized odds, the paper's k = 20) over real and generated data;
- ``drfairness-k1``: the same with k = 1 (more weight on the fairness gap).

Reported on the test split, mean ± std over seeds: accuracy, equalized-odds difference (fairlearn
definition), worst (label, group) cell accuracy, and Dr-Fairness's final μ (share of real data,
averaged over the cells) and the per-cell μ. Usage::

    python benchmarks/bench_drfairness.py --quick
    python benchmarks/bench_drfairness.py --epochs 8 --seeds 3 --out results.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from robustfair.config import DataConfig, load_config
from robustfair.data import load_data
from robustfair.engine.trainer import Trainer

METHODS = {
    "uniform-real": {"name": "uniform"},
    "uniform-all": {"name": "uniform"},
    "fairbatch": {"name": "fairbatch", "fairness": "eqodds", "alpha": 0.01, "update_every": 5},
    "drfairness": {"name": "drfairness", "fairness": "eqodds", "k": 20.0, "lr": 0.02,
                   "probe": 128},
    "drfairness-k1": {"name": "drfairness", "fairness": "eqodds", "k": 1.0, "lr": 0.02,
                      "probe": 128},
}


def real_only(bundle: Any) -> Any:
    keep = torch.nonzero(bundle.train.source == 0).flatten()
    return replace(bundle, train=bundle.train.subset(keep))


def run_one(bundle: Any, method: str, seed: int, epochs: int) -> dict[str, Any]:
    overrides = [f"seed={seed}", f"train.epochs={epochs}", "attack.eps=0", "validation.every=0", "logging.progress=false"]
    cfg = load_config(recipe="mnist5k-groups-uniform", overrides=overrides)
    cfg.method.sampler = METHODS[method]
    data = real_only(bundle) if method in ("uniform-real", "fairbatch") else bundle
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "run").mkdir()
        tr = Trainer(cfg, Path(tmp) / "run", data=data, quiet=True)
        t0 = time.perf_counter()
        tr.fit()
        s = tr.final_eval(attacks=["clean"], progress=False)
        secs = time.perf_counter() - t0
    g = s["groups"]["attacks"]["clean"]
    out = {"acc": s["attacks"]["clean"]["avg"], "eqodds": g["eqodds_diff"],
           "worst_cell": g["worst_label_group"], "worst_group": g["worst_group"],
           "seconds": secs}
    sampler = tr.sampler
    if hasattr(sampler, "mu"):
        out["mu"] = sampler.mu.tolist()
        out["mu_mean"] = float(sampler.mu.mean())
    if hasattr(sampler, "lam"):
        out["lambda"] = sampler.lam.tolist()
    return out


def mean_std(values: list[float]) -> str:
    m = statistics.fmean(values)
    s = statistics.pstdev(values) if len(values) > 1 else 0.0
    return f"{100 * m:5.1f} ± {100 * s:4.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="2 epochs, 250 generated per cell")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--per-cell", type=int, default=400)
    ap.add_argument("--good", type=float, default=1.0, help="quality of the good generator")
    ap.add_argument("--poor", type=float, default=0.2, help="quality of the poor generator")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--out", type=Path, default=None, help="write every run's figures as JSON")
    args = ap.parse_args()
    if args.quick:
        args.epochs, args.per_cell = 2, 250
    torch.set_num_threads(2)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    results: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for label, quality in (("good", args.good), ("poor", args.poor)):
        t0 = time.perf_counter()
        bundle = load_data(DataConfig(name="mnist5k-groups", params={
            "generated": "auto", "quality": quality, "per_cell": args.per_cell}))
        print(f"[{label} generated data, quality {quality}: loaded and generated in "
              f"{time.perf_counter() - t0:.0f} s]", flush=True)
        results[label] = {}
        for method in methods:
            runs = [run_one(bundle, method, seed, args.epochs)
                    for seed in range(args.seeds)]
            results[label][method] = runs
            mu = (f"  μ {statistics.fmean(r['mu_mean'] for r in runs):.3f}"
                  if "mu_mean" in runs[0] else "")
            print(f"  {method:<13} acc {mean_std([r['acc'] for r in runs])}  "
                  f"EqOdds {mean_std([r['eqodds'] for r in runs])}  "
                  f"worst cell {mean_std([r['worst_cell'] for r in runs])}{mu}  "
                  f"({statistics.fmean(r['seconds'] for r in runs):.0f} s/run)", flush=True)
    print("\nsetting: mnist5k-groups (label digit>=5, group inverted, 10% minority), MLP 256, "
          f"{args.epochs} epochs, {args.seeds} seeds, "
          f"{args.per_cell} generated per cell; figures in %, mean ± std over seeds")
    for label in results:
        for method in [m for m in results[label] if m.startswith("drfairness")]:
            runs = results[label][method]
            per_cell = torch.tensor([r["mu"] for r in runs]).mean(0)
            lam = torch.tensor([r["lambda"] for r in runs]).mean(0)
            print(f"{method} final μ ({label} data; rows label small/large, columns group "
                  f"plain/inverted): {[[round(v, 3) for v in row] for row in per_cell.tolist()]}"
                  f"; λ {[[round(v, 3) for v in row] for row in lam.tolist()]}")
    if args.out is not None:
        args.out.write_text(json.dumps({"args": vars(args) | {"out": str(args.out)},
                                        "results": results}, indent=1))
        print(f"saved: {args.out}")


if __name__ == "__main__":
    main()
