"""robustfair's AutoAttack (standard) beside the reference implementation (Croce & Hein, the
``pyautoattack`` package) on the same model, images and seed: robust images per class and CPU
time of each.

    python benchmarks/bench_aa_reference.py [--n 200] [--norm linf] [--queries 5000]

The model is an MLP trained for 10 epochs on digits (seconds); the images are the
class-stratified subset of ``robustfair eval --n``.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time

import torch

import robustfair as rf
from robustfair.attacks.autoattack import AutoAttack
from robustfair.engine.subset import subset_indices

EPS = {"linf": 0.1, "l2": 0.8}


def robust_per_class(model: torch.nn.Module, x_adv: torch.Tensor, y: torch.Tensor) -> list[int]:
    with torch.no_grad():
        ok = model(x_adv).argmax(1) == y
    return torch.bincount(y[ok], minlength=10).tolist()


def main() -> None:
    import pyautoattack

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--norm", choices=list(EPS), default="linf")
    ap.add_argument("--queries", type=int, default=5000, help="Square's queries (both)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    logging.getLogger("auto-attack").setLevel(logging.ERROR)
    path = rf.train("mnist5k-standard", overrides=[
        "name=bench-aa-reference", f"output_dir={tempfile.mkdtemp()}", "data.name=digits",
        "model.name=mlp", "model.params={hidden: [64]}", "train.epochs=10",
        "validation.every=0", "eval.attacks=[clean]"])
    _, model, data, _ = rf.load_run(path)
    idx = subset_indices(data.test.y, args.n)
    x, y = data.test.images(idx), data.test.y[idx]
    eps = EPS[args.norm]
    t = time.process_time()
    torch.manual_seed(0)
    ours = AutoAttack(norm=args.norm, n_queries=args.queries).run(model, x, y, eps).x_adv
    t_ours = time.process_time() - t
    ref = pyautoattack.AutoAttack(model, norm={"linf": "Linf", "l2": "L2"}[args.norm], eps=eps,
                                  seed=0, version="standard", device="cpu")
    ref.verbose = False
    ref.square.n_queries = args.queries
    t = time.process_time()
    theirs, _ = ref.run_standard_evaluation(x, y, batch_size=len(y))
    t_ref = time.process_time() - t
    a, b = robust_per_class(model, ours, y), robust_per_class(model, theirs, y)
    print(f"AutoAttack standard, {args.norm} eps {eps}, {len(y)} digits test images, seed 0, "
          f"Square {args.queries} queries; robust images per class")
    print(f"{'':<12}" + "".join(f"{c:>5}" for c in range(10)) + f"{'total':>7}{'CPU s':>8}")
    for name, row, sec in (("robustfair", a, t_ours), ("reference", b, t_ref)):
        print(f"{name:<12}" + "".join(f"{v:>5}" for v in row) + f"{sum(row):>7}{sec:>8.1f}")


if __name__ == "__main__":
    main()
