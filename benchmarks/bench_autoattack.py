"""robustfair's AutoAttack against torchattacks' AutoAttack run with the reference's 100
iterations, on the same model and images (a benchmark script, not a test).

torchattacks builds its APGD, APGD-T and FAB with 10 iterations; here they are set to 100 (the
reference protocol of Croce & Hein 2020), 9 target classes (``n_classes=10``), Square with 5,000
queries, seed 0. The model is a small network trained with PGD on the embedded digits (8×8) or
mnist5k (28×28) data, so that many test points survive the first attacks and every component
does real work.

Printed: robust accuracy of each (ours per stage), wall time and CPU time (process time, which
the load of a shared machine affects less), and the ratios ours / torchattacks. Usage::

    python benchmarks/bench_autoattack.py --quick
    python benchmarks/bench_autoattack.py --dataset mnist5k --model smallcnn --n 500
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import torch
import torch.nn.functional as F

from robustfair.attacks import build_attack
from robustfair.attacks.autoattack import AutoAttack
from robustfair.config import DataConfig
from robustfair.data import load_data
from robustfair.models import build_model


def train(model: torch.nn.Module, data: Any, epochs: int, eps: float, seed: int) -> None:
    """PGD adversarial training (Madry et al.), 5 steps, SGD with momentum."""
    torch.manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x, y = data.train.images(), data.train.y
    pgd = build_attack("pgd5", "linf")
    for _ in range(epochs):
        perm = torch.randperm(len(y))
        for i in range(0, len(y), 128):
            idx = perm[i:i + 128]
            xb = pgd(model, x[idx], y[idx], eps)
            model.train()
            loss = F.cross_entropy(model(xb), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()


def timed(fn: Any) -> tuple[Any, float, float]:
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w, time.process_time() - c


def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def run_ours(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float,
             n_queries: int) -> tuple[float, dict[str, float], float, float]:
    aa = AutoAttack(norm="linf", version="standard", n_queries=n_queries, seed=0)
    out, wall, cpu = timed(lambda: aa.run(model, x, y, eps))
    stages = {k: float(v.float().mean()) for k, v in out.robust.items()}
    return accuracy(model, out.x_adv, y), stages, wall, cpu


def run_torchattacks(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float,
                     n_queries: int, n_classes: int) -> tuple[float, float, float]:
    import torchattacks

    aa = torchattacks.AutoAttack(model, norm="Linf", eps=eps, version="standard",
                                 n_classes=n_classes, seed=0)
    for atk in aa._autoattack.attacks:
        if hasattr(atk, "steps"):
            atk.steps = 100
        if hasattr(atk, "n_queries"):
            atk.n_queries = n_queries
    x_adv, wall, cpu = timed(lambda: aa(x, y))
    return accuracy(model, x_adv, y), wall, cpu


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="digits, MLP, 120 test images")
    p.add_argument("--dataset", default="digits")
    p.add_argument("--model", default="mlp")
    p.add_argument("--n", type=int, default=360)
    p.add_argument("--eps", type=float, default=0.1)
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--queries", type=int, default=5000, help="Square's budget (both)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the figures as JSON here")
    a = p.parse_args()
    if a.quick:
        a.dataset, a.model, a.n, a.epochs = "digits", "mlp", 120, 10
    torch.set_num_threads(a.threads)
    data = load_data(DataConfig(name=a.dataset, val_size=0.1))
    torch.manual_seed(a.seed)
    params: dict[str, Any] = {"hidden": [64]} if a.model == "mlp" else {"dropout": 0.0}
    model = build_model(a.model, data.in_channels, data.num_classes, data.image_size,
                        data.mean, data.std, **params)
    train(model, data, a.epochs, a.eps, a.seed)
    x, y = data.test.images()[:a.n], data.test.y[:a.n]
    clean = accuracy(model, x, y)
    ours, stages, w_o, c_o = run_ours(model, x, y, a.eps, a.queries)
    theirs, w_t, c_t = run_torchattacks(model, x, y, a.eps, a.queries, data.num_classes)
    res = {
        "setting": {"dataset": a.dataset, "model": a.model, "n": len(y), "eps": a.eps,
                    "norm": "linf", "square_queries": a.queries, "threads": a.threads},
        "clean": clean,
        "robustfair": {"robust": ours, "stages": stages, "wall_s": w_o, "cpu_s": c_o},
        "torchattacks_100it": {"robust": theirs, "wall_s": w_t, "cpu_s": c_t},
        "ratio_wall": w_o / w_t, "ratio_cpu": c_o / c_t,
        "at_least_as_strong": ours <= theirs,
    }
    print(f"{a.dataset} / {a.model}, n={len(y)}, eps={a.eps} (linf), clean {100 * clean:.1f}%")
    print(f"robustfair AutoAttack    robust {100 * ours:5.1f}%  wall {w_o:7.1f} s  "
          f"cpu {c_o:7.1f} s")
    print("   after each stage: " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in stages.items()))
    print(f"torchattacks (100 it.)   robust {100 * theirs:5.1f}%  wall {w_t:7.1f} s  "
          f"cpu {c_t:7.1f} s")
    print(f"ratio ours / torchattacks: wall {res['ratio_wall']:.2f}, cpu {res['ratio_cpu']:.2f}; "
          f"at least as strong: {res['at_least_as_strong']}")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
