"""PART against its base methods on the reduced MNIST setting, over seeds and mask sources.

PART (Zhang et al., "Improving Accuracy-robustness Trade-off via Pixel Reweighted Adversarial
Training", ICML 2024, arXiv:2406.00685) claims higher natural accuracy than AT at about the same
robustness (≈ +1 point on CIFAR-10). The grid is ``specs/part.yaml``: for every seed,

    AT      vs PART   (mask of the attacked batch)  vs PART-stale   (the official code's mask)
    TRADES  vs PART-T (current)                     vs PART-T-stale
    MART    vs PART-M (current)                     vs PART-M-stale

with the recipes at-/trades-/mart-mnist5k-part and part-/part-t-/part-m-mnist5k, each evaluated
at the uniform ε: natural, PGD-20, MMA-20 and AutoAttack. ``--quick`` (``specs/part-quick.yaml``):
1,500 training images, 3 epochs (1 warm-up), batch 32, 200 test images, no AutoAttack.

    python benchmarks/bench_part.py --quick            # minutes on a CPU
    python benchmarks/bench_part.py --set device=cuda  # the full reduced recipes

This is a benchmark, not a test: it prints what it measures, whatever the direction.
"""

from __future__ import annotations

from _sweep import attack_table, parse_args, run, summaries, write_json


def main(argv: list[str] | None = None) -> None:
    args = parse_args(__doc__, argv)
    rows = summaries(run("part", args))
    attacks = [a for a in ("clean", "pgd20", "mma20", "autoattack")
               if any(a in r["attacks"] for runs in rows.values() for r in runs)]
    print("accuracy (%) at the uniform eps, mean ± std over seeds (average | worst class)")
    print(attack_table(rows, attacks))
    write_json(args.json, {k: [{a: r["attacks"][a]["avg"] for a in attacks if a in r["attacks"]}
                               for r in v] for k, v in rows.items()})


if __name__ == "__main__":
    main()
