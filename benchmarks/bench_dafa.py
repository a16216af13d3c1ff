"""The DAFA paper's main table on the reduced MNIST-5k setting: TRADES, +FRL, +CFA, +BAT, +WAT
and +DAFA over seeds.

Each method runs its reduced recipe (``trades-mnist5k-dafa``, ``frl-mnist5k``, ``cfa-mnist5k``,
``bat-mnist5k``, ``wat-mnist5k``, ``dafa-mnist5k``: the same data, model, ε, attack, optimiser
and epochs) and its last epoch is evaluated on the test images, clean and under PGD-20 (the
recipes' ``eval`` settings). The table has the paper's layout: mean ± std over seeds of the
average and worst-class clean and robust accuracy (%), and ρ against TRADES computed from the
means, ρ = (worst − worst_TRADES)/worst_TRADES − (avg_TRADES − avg)/avg_TRADES
(``robustfair.metrics.rho``). Each run's ``eval/summary.json`` is read back, so an interrupted
benchmark continues where it stopped (finished runs are kept unless ``--fresh``).

Usage::

    python benchmarks/bench_dafa.py --quick        # smoke version (CPU, minutes)
    python benchmarks/bench_dafa.py                # the reduced recipes, 3 seeds
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from robustfair.config import load_config
from robustfair.engine.trainer import Trainer, prepare_run_dir
from robustfair.metrics import rho

METHODS = {
    "TRADES": "trades-mnist5k-dafa",
    "+FRL": "frl-mnist5k",
    "+CFA": "cfa-mnist5k",
    "+BAT": "bat-mnist5k",
    "+WAT": "wat-mnist5k",
    "+DAFA": "dafa-mnist5k",
}
KEYS = ("clean_avg", "clean_worst", "robust_avg", "robust_worst")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true",
                   help="short version: 1,200 training images, 200 validation and 500 test "
                        "images, the recipes' 8 epochs")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--epochs", type=int, default=None,
                   help="override every recipe's epochs (DAFA's warm-up is rescaled: 0.64·E)")
    p.add_argument("--train-limit", type=int, default=None)
    p.add_argument("--test-limit", type=int, default=None)
    p.add_argument("--set", dest="extra", action="append", default=[], metavar="KEY=VALUE",
                   help="an override applied to every method (repeatable)")
    p.add_argument("--out", type=Path, default=Path("runs/bench_dafa"))
    p.add_argument("--fresh", action="store_true", help="retrain runs that already finished")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--json", type=Path, default=None, help="also write the table here")
    return p.parse_args(argv)


def overrides(args: argparse.Namespace, method: str, seed: int) -> list[str]:
    epochs = args.epochs
    train_limit = args.train_limit or (1200 if args.quick else None)
    test_limit = args.test_limit or (500 if args.quick else None)
    ov = [f"seed={seed}", f"output_dir={args.out}", f"name={slug(method)}-s{seed}",
          "logging.progress=false"]
    if epochs is not None:
        ov.append(f"train.epochs={epochs}")
        if method == "+DAFA":
            ov.append(f"method.policy.warmup={max(1, round(0.64 * epochs))}")
    if train_limit is not None:
        ov.append(f"data.train_limit={train_limit}")
    if test_limit is not None:
        ov.append(f"data.test_limit={test_limit}")
    if args.quick:
        ov.append("data.val_size=200")
    return ov + list(args.extra)


def slug(method: str) -> str:
    return method.strip("+").lower()


def run_one(args: argparse.Namespace, method: str, seed: int) -> dict[str, Any]:
    """Train and evaluate one method/seed (or read a finished run); return its figures."""
    cfg = load_config(recipe=METHODS[method], overrides=overrides(args, method, seed))
    summary_path = Path(cfg.output_dir) / cfg.name / "eval" / "summary.json"
    t0 = time.perf_counter()
    if args.fresh or not summary_path.exists():
        run_dir = prepare_run_dir(cfg, force=True)
        trainer = Trainer(cfg, run_dir, quiet=True)
        trainer.fit()
        trainer.final_eval(progress=False)
    summary = json.loads(summary_path.read_text())
    robust_name = next(a for a in summary["attacks"] if a != "clean")
    clean, robust = summary["attacks"]["clean"], summary["attacks"][robust_name]
    row = {"clean_avg": clean["avg"], "clean_worst": clean["worst"],
           "robust_avg": robust["avg"], "robust_worst": robust["worst"],
           "robust_attack": robust_name, "seconds": time.perf_counter() - t0,
           "run": str(summary_path.parent.parent)}
    print(f"  {method:<7} seed {seed}: clean {100 * row['clean_avg']:.1f} / "
          f"{100 * row['clean_worst']:.1f}, {robust_name} {100 * row['robust_avg']:.1f} / "
          f"{100 * row['robust_worst']:.1f}  ({row['seconds']:.0f} s)", flush=True)
    return row


def aggregate(rows: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Mean and std over seeds per method, and ρ_nat / ρ_rob from the means against TRADES."""
    table: dict[str, dict[str, Any]] = {}
    for method, runs in rows.items():
        entry: dict[str, Any] = {"seeds": len(runs)}
        for k in KEYS:
            vals = [r[k] for r in runs]
            entry[k] = statistics.fmean(vals)
            entry[k + "_std"] = statistics.pstdev(vals) if len(vals) > 1 else 0.0
        table[method] = entry
    base = table.get("TRADES")
    for entry in table.values():
        for kind in ("clean", "robust"):
            entry[f"rho_{kind}"] = float("nan") if base is None else rho(
                entry[f"{kind}_avg"], entry[f"{kind}_worst"], base[f"{kind}_avg"],
                base[f"{kind}_worst"])
    return table


def format_table(table: dict[str, dict[str, Any]], attack: str) -> str:
    def cell(e: dict[str, Any], k: str) -> str:
        return f"{100 * e[k]:5.2f}±{100 * e[k + '_std']:4.2f}"

    head = (f"{'Method':<8} | {'Clean avg':>11} | {'Clean worst':>11} | {'ρ_nat':>6} | "
            f"{'Rob. avg':>11} | {'Rob. worst':>11} | {'ρ_rob':>6}")
    lines = [f"robust = {attack}; mean ± std over seeds (%); ρ from the means vs TRADES",
             head, "-" * len(head)]
    for m, e in table.items():
        lines.append(f"{m:<8} | {cell(e, 'clean_avg'):>11} | {cell(e, 'clean_worst'):>11} | "
                     f"{e['rho_clean']:6.2f} | {cell(e, 'robust_avg'):>11} | "
                     f"{cell(e, 'robust_worst'):>11} | {e['rho_robust']:6.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    order = ["TRADES"] + [m for m in METHODS if m != "TRADES" and m in args.methods]
    methods = [m for m in order if m in args.methods or m == "TRADES"]
    rows: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
    t0 = time.perf_counter()
    for seed in args.seeds:
        for m in methods:
            rows[m].append(run_one(args, m, seed))
    table = aggregate(rows)
    attack = rows["TRADES"][0]["robust_attack"]
    print()
    print(format_table(table, attack))
    print(f"\n{len(args.seeds)} seed(s), {sum(map(len, rows.values()))} runs, "
          f"{time.perf_counter() - t0:.0f} s; runs in {args.out}")
    result = {"table": table, "runs": rows, "settings": {
        "seeds": args.seeds, "quick": args.quick, "overrides": overrides(args, "TRADES", 0)}}
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
