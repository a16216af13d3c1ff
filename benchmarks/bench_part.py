"""PART against its base methods on the reduced MNIST setting, over seeds and mask sources.

PART (Zhang et al., "Improving Accuracy-robustness Trade-off via Pixel Reweighted Adversarial
Training", ICML 2024, arXiv:2406.00685) claims higher natural accuracy than AT at about the same
robustness (≈ +1 point on CIFAR-10). This script trains, for every seed,

    AT      vs PART   (mask of the attacked batch)  vs PART   (stale mask, the official code)
    TRADES  vs PART-T (current)                     vs PART-T (stale)
    MART    vs PART-M (current)                     vs PART-M (stale)

with the recipes at-/trades-/mart-mnist5k-part and part-/part-t-/part-m-mnist5k, and evaluates
every model at the uniform ε: natural, PGD-20, MMA-20 and AutoAttack (when registered).

    python benchmarks/bench_part.py --quick            # minutes on a CPU
    python benchmarks/bench_part.py --pairs at         # AT vs PART only, full reduced recipes

This is a benchmark, not a test: it prints what it measures, whatever the direction.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from robustfair.attacks import ATTACKS
from robustfair.config import load_config
from robustfair.data import load_data
from robustfair.engine.evaluator import evaluate
from robustfair.engine.trainer import Trainer, prepare_run_dir

PAIRS = {"at": ("at-mnist5k-part", "part-mnist5k", "AT", "PART"),
         "trades": ("trades-mnist5k-part", "part-t-mnist5k", "TRADES", "PART-T"),
         "mart": ("mart-mnist5k-part", "part-m-mnist5k", "MART", "PART-M")}

QUICK = ["data.train_limit=1500", "data.test_limit=200", "train.epochs=3", "train.batch_size=32",
         "train.schedule.milestones=[2]"]
QUICK_WARMUP = 1


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="1,500 training images, 3 epochs (1 warm-up), batch 32, 200 test "
                        "images, AutoAttack on 50 of them")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--pairs", nargs="+", choices=list(PAIRS), default=list(PAIRS))
    p.add_argument("--aa-n", type=int, default=None,
                   help="test images for AutoAttack (default: all, 50 with --quick)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (1 is fastest on a shared CPU)")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    return p.parse_args()


def train_one(recipe: str, seed: int, extra: list[str], root: Path) -> tuple[Any, Any, float]:
    """Train one run; return the model, its data and the training time."""
    cfg = load_config(None, recipe, extra + [f"seed={seed}", f"output_dir={root}",
                                             f"name={recipe}-s{seed}", "device=cpu",
                                             "logging.progress=false"])
    data = load_data(cfg.data)
    t0 = time.perf_counter()
    trainer = Trainer(cfg, prepare_run_dir(cfg, force=True), data=data, quiet=True)
    trainer.fit()
    return trainer, data, time.perf_counter() - t0


def evaluate_one(trainer: Any, data: Any, aa_n: int | None) -> dict[str, float]:
    """Accuracy at the uniform ε: natural, PGD-20, MMA-20 and AutoAttack where registered."""
    cfg = trainer.cfg
    eps, norm, c = cfg.eval.eps or cfg.attack.eps, cfg.attack.norm, data.num_classes
    model = trainer.eval_model()
    res = evaluate(model, data.test, ["clean", "pgd20", "mma20"], eps, norm, c,
                   cfg.eval.batch_size, cfg.eval.step_size, seed=cfg.seed)
    out = {a: float(res.row(a).float().mean()) for a in res.attacks}
    if "autoattack" in ATTACKS:
        test = data.test
        if aa_n is not None and aa_n < len(test):
            idx = torch.linspace(0, len(test) - 1, aa_n).round().long()  # every class
            test = test.subset(idx)
        aa = evaluate(model, test, ["autoattack"], eps, norm, c, cfg.eval.batch_size,
                      seed=cfg.seed)
        out["autoattack"] = float(aa.row("autoattack").float().mean())
    return out


def summarise(results: dict[str, list[dict[str, float]]]) -> str:
    cols = ["clean", "pgd20", "mma20", "autoattack"]
    head = f"{'method':<22}" + "".join(f"{c:>16}" for c in cols) + f"{'train s':>10}"
    lines = [head, "-" * len(head)]
    for name, runs in results.items():
        row = f"{name:<22}"
        for c in cols:
            vals = [100 * r[c] for r in runs if c in r]
            if not vals:
                row += f"{'n/a':>16}"
                continue
            sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
            row += f"{statistics.mean(vals):>9.2f} ± {sd:4.2f}"
        row += f"{statistics.mean(r['time_s'] for r in runs):>10.0f}"
        lines.append(row)
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    extra = QUICK if args.quick else []
    warm = [f"method.budget.warmup={QUICK_WARMUP}"] if args.quick else []
    aa_n = args.aa_n if args.aa_n is not None else (50 if args.quick else None)
    if "autoattack" not in ATTACKS:
        print("autoattack is not registered: AutoAttack accuracy is not measured")
    results: dict[str, list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="bench_part_") as tmp:
        root = Path(tmp)
        for pair in args.pairs:
            base, part, base_name, part_name = PAIRS[pair]
            runs = [(base_name, base, []), (f"{part_name} (current)", part, warm),
                    (f"{part_name} (stale)", part, warm + ["method.budget.mask_source=stale"])]
            for seed in args.seeds:
                for label, recipe, more in runs:
                    trainer, data, secs = train_one(recipe, seed, extra + more, root)
                    acc = evaluate_one(trainer, data, aa_n)
                    acc["time_s"] = secs
                    results.setdefault(label, []).append(acc)
                    print(f"seed {seed} {label:<20} " + " ".join(
                        f"{k} {100 * v:.1f}" for k, v in acc.items() if k != "time_s")
                        + f"  ({secs:.0f} s)", flush=True)
    print()
    n_aa = f"AutoAttack on {aa_n} test images" if aa_n else "AutoAttack on the whole test split"
    print(f"accuracy (%) at the uniform eps, mean ± std over seeds {args.seeds}; {n_aa}")
    print(summarise(results))
    if args.out is not None:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
