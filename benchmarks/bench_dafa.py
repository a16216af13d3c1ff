"""The DAFA paper's main table on the reduced MNIST-5k setting: TRADES, +FRL, +CFA, +BAT, +WAT
and +DAFA over seeds.

The grid is ``specs/dafa.yaml`` (``specs/dafa-quick.yaml`` with ``--quick``: 1,200 training,
200 validation and 500 test images), run by ``robustfair sweep``'s runner: every method's
reduced recipe, its last epoch evaluated clean and under PGD-20. The table has the paper's
layout: mean ± std over seeds of the average and worst-class clean and robust accuracy (%), and
ρ against TRADES from the means. Finished runs are kept: an interrupted benchmark continues.

Usage::

    python benchmarks/bench_dafa.py --quick        # smoke version (CPU, minutes)
    python benchmarks/bench_dafa.py                # the reduced recipes, 3 seeds
    python benchmarks/bench_dafa.py --engine ray --address auto   # on a Ray cluster
"""

from __future__ import annotations

from typing import Any

from _sweep import parse_args, run, write_json


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(__doc__, argv)
    res = run("dafa", args)
    table = res.compare.get("csv")
    result = {"compare": {k: str(v) for k, v in res.compare.items()},
              "table_csv": table.read_text() if table else None}
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
