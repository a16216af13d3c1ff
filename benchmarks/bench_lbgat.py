"""TRADES vs LBGAT0 / LBGAT6 vs DKL (IKL) on the reduced MNIST-5k setting, over seeds.

Each method runs its reduced recipe (``mnist5k-trades``, ``lbgat-mnist5k``, ``lbgat6-mnist5k``,
``dkl-mnist5k``, the IKL loss of the DKL code; same data, ε, attack and epochs, each method's own optimiser settings) and is
evaluated on the same test images with clean and PGD-20 and, when the ``autoattack`` attack is
registered, AutoAttack (standard) on a class-stratified subset of ``--aa-n`` of them (all by
default). ``--quick`` trains on 1,000 images for 4 epochs in batches of 32 (125 steps: LBGAT's
robust model learns only through the natural model's logits and stays a constant classifier for
its first ~50-100 steps) and runs only AutoAttack's APGD-CE and APGD-T stages (FAB-T and Square take many minutes per model on a CPU, most of all on a model
that has not learned yet). Printed: average and worst-class accuracy per seed, and the
mean ± std over seeds.

Usage::

    python benchmarks/bench_lbgat.py --quick          # a small smoke version (CPU, minutes)
    python benchmarks/bench_lbgat.py                  # the full reduced recipes, 3 seeds
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from robustfair.attacks import ATTACKS
from robustfair.config import load_config
from robustfair.engine.evaluator import evaluate
from robustfair.engine.trainer import Trainer, prepare_run_dir

METHODS = {
    "TRADES": "mnist5k-trades",
    "LBGAT0": "lbgat-mnist5k",
    "LBGAT6": "lbgat6-mnist5k",
    "DKL": "dkl-mnist5k",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true",
                   help="smoke version: 1000 training images, 4 epochs, batch 32, 200 test images, "
                        "AutoAttack's APGD stages only, on 50 test images")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--epochs", type=int, default=None, help="override every recipe's epochs")
    p.add_argument("--train-limit", type=int, default=None)
    p.add_argument("--test-limit", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--aa-n", type=int, default=None,
                   help="test images for AutoAttack (default: all; 100 with --quick)")
    p.add_argument("--out", type=Path, default=None, help="run directories (default: a temp dir)")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    return p.parse_args(argv)


def overrides(args: argparse.Namespace, seed: int, out: Path, name: str) -> list[str]:
    epochs = args.epochs if args.epochs is not None else (4 if args.quick else None)
    train_limit = args.train_limit if args.train_limit is not None else (1000 if args.quick else None)
    test_limit = args.test_limit if args.test_limit is not None else (200 if args.quick else None)
    ov = [f"seed={seed}", f"output_dir={out}", f"name={name}", "logging.progress=false",
          "validation.every=0", "eval.attacks=[clean, pgd20]"]
    if epochs is not None:
        ov.append(f"train.epochs={epochs}")
    if train_limit is not None:
        ov.append(f"data.train_limit={train_limit}")
    if test_limit is not None:
        ov.append(f"data.test_limit={test_limit}")
    batch_size = args.batch_size if args.batch_size is not None else (32 if args.quick else None)
    if batch_size is not None:
        ov.append(f"train.batch_size={batch_size}")
    return ov


def stratified_subset(y: torch.Tensor, n: int) -> torch.Tensor:
    """About n indices with every class in proportion (round-robin over the classes)."""
    rank = torch.zeros_like(y)
    for c in y.unique():
        idx = (y == c).nonzero().squeeze(1)
        rank[idx] = torch.arange(len(idx))
    order = torch.argsort(rank * (int(y.max()) + 1) + y)
    return order[:n].sort().values


def autoattack_summary(trainer: Trainer, n: int | None, lite: bool) -> dict[str, Any]:
    """AutoAttack accuracy of the evaluated model on (a stratified subset of) the test images,
    per class: standard, or only its APGD-CE and APGD-T stages when ``lite``."""
    cfg, data = trainer.cfg, trainer.data
    split = data.split(cfg.eval.split)
    if n is not None and n < len(split):
        split = split.subset(stratified_subset(split.y.cpu(), n))
    model = trainer.eval_model()
    if trainer.ema is not None and cfg.train.ema.evaluate:
        model = trainer.ema.copy_into(trainer.model)
    from robustfair.attacks.autoattack import AutoAttack

    attack = AutoAttack(norm=cfg.attack.norm, attacks=["apgd-ce", "apgd-t"] if lite else None)
    attack.spec = "autoattack"
    res = evaluate(model, split, [attack], cfg.attack.eps, cfg.attack.norm,
                   data.num_classes, cfg.eval.batch_size, device=trainer.device, seed=cfg.seed)
    return res.summary()["attacks"]["autoattack"]


def run_one(recipe: str, ov: list[str], aa: bool, aa_n: int | None, lite: bool
            ) -> tuple[dict[str, Any], float, float]:
    cfg = load_config(recipe=recipe, overrides=ov)
    t0 = time.perf_counter()
    trainer = Trainer(cfg, prepare_run_dir(cfg, force=True), quiet=True)
    trainer.fit()
    train_s = time.perf_counter() - t0
    acc = dict(trainer.final_eval(progress=False)["attacks"])
    if aa:
        acc["autoattack"] = autoattack_summary(trainer, aa_n, lite)
    return acc, train_s, time.perf_counter() - t0 - train_s


def fmt(values: list[float]) -> str:
    m = 100 * statistics.mean(values)
    s = 100 * statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{m:5.1f}±{s:4.1f}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    has_aa = "autoattack" in ATTACKS
    attacks = ["clean", "pgd20"] + (["autoattack"] if has_aa else [])
    print(f"attacks: {', '.join(attacks)}"
          + ("" if has_aa else "  (AutoAttack: the 'autoattack' attack is not registered)"))
    out = args.out or Path(tempfile.mkdtemp(prefix="bench_lbgat_"))
    aa_n = args.aa_n if args.aa_n is not None else (50 if args.quick else None)
    if has_aa:
        print(f"AutoAttack: {'APGD-CE + APGD-T only' if args.quick else 'standard'}, on "
              f"{aa_n or 'all'} class-stratified test images")
    results: dict[str, list[dict[str, Any]]] = {m: [] for m in args.methods}
    for seed in args.seeds:
        for method in args.methods:
            name = f"{METHODS[method]}-s{seed}"
            acc, train_s, eval_s = run_one(METHODS[method], overrides(args, seed, out, name),
                                           has_aa, aa_n, args.quick)
            results[method].append({a: {"avg": acc[a]["avg"], "worst": acc[a]["worst"]}
                                    for a in attacks})
            cells = "  ".join(f"{a} {100 * acc[a]['avg']:5.1f}/{100 * acc[a]['worst']:5.1f}"
                              for a in attacks)
            print(f"seed {seed} {method:9s} {cells}   (train {train_s:.0f} s, eval {eval_s:.0f} s)",
                  flush=True)
    print(f"\naccuracy % over seeds {args.seeds}, mean±std (avg | worst class)")
    print(f"{'method':9s} " + " ".join(f"{a + ' avg':>12s} {a + ' worst':>14s}" for a in attacks))
    for method, runs in results.items():
        row = [f"{fmt([r[a]['avg'] for r in runs]):>12s} {fmt([r[a]['worst'] for r in runs]):>14s}"
               for a in attacks]
        print(f"{method:9s} " + " ".join(row))
    if args.json is not None:
        args.json.write_text(json.dumps({"attacks": attacks, "seeds": args.seeds,
                                         "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
