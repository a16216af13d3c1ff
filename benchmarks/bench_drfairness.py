"""Uniform sampling vs FairBatch vs Dr-Fairness on the offline group benchmark, with good and
with poor generated data (a benchmark script, not a test).

The grid is ``specs/drfairness.yaml`` (``--quick``: ``specs/drfairness-quick.yaml``, 2 epochs and
250 generated images per cell): ``mnist5k-groups`` (label = digit ≥ 5, group = inverted digits,
10% minority group within each label in training, balanced test groups), the recipe's MLP
trained with plain cross-entropy, Adam 1e-3, batch 64. Rows:

- ``uniform-real``: uniform over the real training data only;
- ``fairbatch``: FairBatch (equalized odds) over the real data;
- ``uniform-all-{good,poor}``: uniform over real and generated data;
- ``drfairness-{good,poor}``: Dr-Fairness (equalized odds, the paper's k = 20);
- ``drfairness-k1-{good,poor}``: the same with k = 1 (more weight on the fairness gap).

Printed on the test split, mean ± std over seeds: accuracy, equalized-odds difference (fairlearn
definition), worst (label, group) cell accuracy, and Dr-Fairness's final μ (share of real data,
averaged over the cells, read from each run's checkpoint). Usage::

    python benchmarks/bench_drfairness.py --quick
    python benchmarks/bench_drfairness.py --seeds 0 1 2 --json results.json
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from _sweep import mean_std, parse_args, run, summaries, write_json

from robustfair.engine.io import load_checkpoint


def sampler_mu(run_dir: str) -> float | None:
    """Dr-Fairness's final μ averaged over the cells (None for other samplers)."""
    state = load_checkpoint(Path(run_dir) / "checkpoints" / "last.pt")["sampler"]
    psi = state.get("psi") if isinstance(state, dict) else None  # mu = sigmoid(psi)
    return None if psi is None else float(psi.double().sigmoid().mean())


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(__doc__, argv)
    rows = summaries(run("drfairness", args))
    out: dict[str, Any] = {}
    print(f"{'method':<20}{'accuracy':>14}{'EqOdds diff':>14}{'worst cell':>14}{'mu':>8}")
    for row, runs in rows.items():
        groups = [r["groups"]["attacks"]["clean"] for r in runs]
        mus = [m for m in (sampler_mu(r["run_dir"]) for r in runs) if m is not None]
        out[row] = {"acc": [r["attacks"]["clean"]["avg"] for r in runs],
                    "eqodds": [g["eqodds_diff"] for g in groups],
                    "worst_cell": [g["worst_label_group"] for g in groups], "mu": mus}
        mu = f"{sum(mus) / len(mus):8.3f}" if mus else f"{'':>8}"
        print(f"{row:<20}{mean_std(out[row]['acc']):>14}{mean_std(out[row]['eqodds']):>14}"
              f"{mean_std(out[row]['worst_cell']):>14}{mu}")
    print("figures in %, mean ± std over seeds; EqOdds diff: fairlearn's definition")
    write_json(args.json, out)
    return out


if __name__ == "__main__":
    main()
