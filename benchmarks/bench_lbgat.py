"""TRADES vs LBGAT0 / LBGAT6 vs DKL (IKL) on the reduced MNIST-5k setting, over seeds.

The grid is ``specs/lbgat.yaml``: each method's reduced recipe (``mnist5k-trades``,
``lbgat-mnist5k``, ``lbgat6-mnist5k``, ``dkl-mnist5k``; same data, ε, attack and epochs, each
method's own optimiser settings), evaluated on the test images clean, under PGD-20 and under
AutoAttack (standard). ``--quick`` (``specs/lbgat-quick.yaml``) trains on 1,000 images for 4
epochs in batches of 32 (125 steps: LBGAT's robust model learns only through the natural
model's logits and stays a constant classifier for its first ~50-100 steps) and evaluates clean
and PGD-20 on 200 test images. Printed: the comparison table (ρ against TRADES) and average and
worst-class accuracy per attack, mean ± std over seeds.

Usage::

    python benchmarks/bench_lbgat.py --quick          # a small smoke version (CPU, minutes)
    python benchmarks/bench_lbgat.py                  # the full reduced recipes, 3 seeds
"""

from __future__ import annotations

import sys

from _sweep import attack_table, parse_args, run, summaries, write_json


def main(argv: list[str] | None = None) -> int:
    args = parse_args(__doc__, argv)
    res = run("lbgat", args)
    rows = summaries(res)
    attacks = [a for a in ("clean", "pgd20", "autoattack")
               if any(a in r["attacks"] for runs in rows.values() for r in runs)]
    print("accuracy (%), mean ± std over seeds (average | worst class)")
    print(attack_table(rows, attacks))
    write_json(args.json, {"attacks": attacks, "rows": {
        k: [{a: r["attacks"][a] for a in attacks if a in r["attacks"]} for r in v]
        for k, v in rows.items()}})
    return 1 if res.failed else 0


if __name__ == "__main__":
    sys.exit(main())
