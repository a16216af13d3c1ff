"""AutoAttack four ways, in one process, on the same model and images (a benchmark script, not a
test): robustfair ``autoattack`` (standard), robustfair ``autoattack-fast`` (MALT targets, then the
remaining components near the boundary; not standard AutoAttack), the reference AutoAttack
(``pyautoattack``, by its authors) and torchattacks' AutoAttack with its APGD, APGD-T and FAB set
to the reference's 100 iterations (torchattacks builds them with 10).

All four: ℓ∞, 9 target classes, Square with ``--queries`` (5,000 by default), seed 0. Two
models, trained here briefly on CPU and cached in ``--cache``:

- ``smallcnn``: the TRADES SmallCNN on mnist5k (TRADES, β = 6, 5 KL steps of ε/3);
- ``resnet18``: a CIFAR-shaped ResNet-18 (3×32×32 inputs: mnist5k padded to 32 px, each image in
  a random colour; ``--width`` channels in the first block) trained with 5-step PGD.

Contenders run in turn in every round, the order reversed every other round, so that the load of
a shared machine hits them alike. Printed: per-class robust accuracy of each, wall and CPU
(process) time, the ratios to torchattacks and to the reference (median over rounds), the
per-stage seconds and points attacked of robustfair's versions, and, for every pair, how many
points one broke that the other left robust. Usage::

    python benchmarks/bench_autoattack.py --quick
    python benchmarks/bench_autoattack.py --models smallcnn resnet18 --n 100 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from robustfair.attacks import build_attack
from robustfair.attacks.autoattack import AutoAttack
from robustfair.config import DataConfig
from robustfair.data import load_data
from robustfair.models import build_model

Contender = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], dict[str, Any]]


def cifar_shaped(x: torch.Tensor, seed: int) -> torch.Tensor:
    """(N, 1, 28, 28) → (N, 3, 32, 32): padded, each digit in a random colour on black."""
    g = torch.Generator().manual_seed(seed)
    colour = 0.4 + 0.6 * torch.rand(len(x), 3, 1, 1, generator=g)
    return F.pad(x, (2, 2, 2, 2)) * colour


def load(name: str, a: argparse.Namespace) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """The model (trained here, or loaded from the cache) and ``n`` test images drawn at
    random (seeded)."""
    data = load_data(DataConfig(name="mnist5k", val_size=0.1))
    g = torch.Generator().manual_seed(a.seed)  # the splits are sorted by class: draw at random
    tr = torch.randperm(len(data.train.y), generator=g)[:a.train_n]
    te = torch.randperm(len(data.test.y), generator=g)[:a.n]
    x_tr, y_tr = data.train.images()[tr], data.train.y[tr]
    x_te, y_te = data.test.images()[te], data.test.y[te]
    if name == "resnet18":
        x_tr, x_te = cifar_shaped(x_tr, 1), cifar_shaped(x_te, 2)
    cache = Path(a.cache) / (f"{name}_w{a.width}_n{a.train_n}_e{a.epochs}_eps{a.train_eps}"
                             f"_s{a.seed}.pt")
    torch.manual_seed(a.seed)
    if name == "smallcnn":
        model = build_model("smallcnn", 1, 10, 28, data.mean, data.std, dropout=0.0)
    else:
        model = build_model("resnet18", 3, 10, 32, [0.5] * 3, [0.5] * 3, width=a.width)
    if cache.exists():
        model.load_state_dict(torch.load(cache))
    else:
        train(model, x_tr, y_tr, a.epochs, a.train_eps, trades=name == "smallcnn")
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), cache)
    return model.eval(), x_te, y_te


def train(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, eps: float,
          trades: bool) -> None:
    """TRADES (β = 6; KL attack from x + 0.001·N(0, 1)) or PGD-AT (random start): 5 attack
    steps of ε/3 on the model in eval mode, SGD (lr 0.05, momentum 0.9), batches of 128."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    pgd = build_attack("pgd5", "linf", step_size=eps / 3)
    for _ in range(epochs):
        perm = torch.randperm(len(y))
        for i in range(0, len(y), 128):
            xb, yb = x[perm[i:i + 128]], y[perm[i:i + 128]]
            model.eval()
            xa = kl_attack(model, xb, eps) if trades else pgd(model, xb, yb, eps)
            model.train()
            if trades:
                logits = model(xb)
                kl = F.kl_div(F.log_softmax(model(xa), 1), F.softmax(logits, 1),
                              reduction="batchmean")
                loss = F.cross_entropy(logits, yb) + 6.0 * kl
            else:
                loss = F.cross_entropy(model(xa), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()


def kl_attack(model: torch.nn.Module, x: torch.Tensor, eps: float) -> torch.Tensor:
    """TRADES' inner maximisation: 5 sign steps of ε/3 on KL(f(x) ‖ f(x'))."""
    with torch.no_grad():
        p = F.softmax(model(x), 1)
    xa = (x + 0.001 * torch.randn_like(x)).clamp(0, 1)
    for _ in range(5):
        xa.requires_grad_(True)
        kl = F.kl_div(F.log_softmax(model(xa), 1), p, reduction="sum")
        (g,) = torch.autograd.grad(kl, [xa])
        xa = torch.min(torch.max(xa.detach() + eps / 3 * g.sign(), x - eps), x + eps).clamp(0, 1)
    return xa.detach()


def contenders(eps: float, queries: int) -> dict[str, Contender]:
    def ours(version: str, layout: str = "auto", fold: bool = True) -> Contender:
        def run(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
            out = AutoAttack(norm="linf", version=version, n_queries=queries, seed=0,
                             layout=layout, fold_batchnorm=fold).run(model, x, y, eps)
            return {"x_adv": out.x_adv, "stage_time": out.stage_time, "layout": out.layout,
                    "folded": out.folded_batchnorm}
        return run

    def reference(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
        from pyautoattack import AutoAttack as RefAA

        ref = RefAA(model, norm="Linf", eps=eps, version="standard", seed=0, device="cpu")
        ref.verbose = False
        ref.square.n_queries = queries
        out = ref.run_standard_evaluation(x, y, batch_size=len(x))
        return {"x_adv": out[0] if isinstance(out, tuple) else out}

    def torchattacks_100(model: torch.nn.Module, x: torch.Tensor,
                         y: torch.Tensor) -> dict[str, Any]:
        import torchattacks

        aa = torchattacks.AutoAttack(model, norm="Linf", eps=eps, version="standard",
                                     n_classes=10, seed=0)
        for atk in aa._autoattack.attacks:
            if hasattr(atk, "steps"):
                atk.steps = 100
            if hasattr(atk, "n_queries"):
                atk.n_queries = queries
        return {"x_adv": aa(x, y)}

    return {"robustfair": ours("standard"), "robustfair-fast": ours("fast"),
            "reference": reference, "torchattacks-100": torchattacks_100,
            "robustfair-unchanged-layout": ours("standard", "unchanged"),
            "robustfair-unfolded": ours("standard", fold=False)}


def robust_flags(model: torch.nn.Module, x_adv: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                 eps: float) -> torch.Tensor:
    """Correct under attack, counting only points within the ε-ball."""
    with torch.no_grad():
        ok = model(x_adv).argmax(1) == y
    inside = (x_adv - x).abs().flatten(1).amax(1) <= eps + 1e-5
    return ok | ~inside


def bench_model(name: str, a: argparse.Namespace) -> dict[str, Any]:
    model, x, y = load(name, a)
    with torch.no_grad():
        clean = model(x).argmax(1) == y
    runs = contenders(a.eps, a.queries)
    names = [c for c in runs if c in a.contenders]
    times: dict[str, list[tuple[float, float]]] = {c: [] for c in names}
    flags: dict[str, torch.Tensor] = {}
    stages: dict[str, Any] = {}
    for r in range(a.rounds):
        for c in (names if r % 2 == 0 else names[::-1]):
            w, p = time.perf_counter(), time.process_time()
            out = runs[c](model, x, y)
            times[c].append((time.perf_counter() - w, time.process_time() - p))
            print(f"  {name} round {r + 1}: {c} {times[c][-1][0]:.1f} s wall, "
                  f"{times[c][-1][1]:.1f} s CPU", flush=True)
            f = robust_flags(model, out["x_adv"], x, y, a.eps) & clean
            flags.setdefault(c, f)
            flags[c] = flags[c] & f  # the worst case over rounds
            if "stage_time" in out:
                stages[c] = {"stages": out["stage_time"], "layout": out["layout"],
                             "folded": out["folded"]}
    res: dict[str, Any] = {"model": name, "n": len(y), "eps": a.eps,
                           "clean": per_class(clean, y), "contenders": {}}
    for c in names:
        wall = statistics.median(t[0] for t in times[c])
        cpu = statistics.median(t[1] for t in times[c])
        res["contenders"][c] = {"robust": per_class(flags[c], y), "wall_s": wall, "cpu_s": cpu,
                                "stage_time": stages.get(c, {}).get("stages"),
                                "layout": stages.get(c, {}).get("layout"),
                                "folded_batchnorm": stages.get(c, {}).get("folded")}
    for base in ("torchattacks-100", "reference"):
        if base in times:
            res[f"ratio_to_{base}"] = {c: {k: statistics.median(
                t[i] / b[i] for t, b in zip(times[c], times[base], strict=True))
                for i, k in enumerate(("wall", "cpu"))} for c in names}
    res["broken_by_one_not_other"] = {f"{p} vs {q}": [int((~flags[p] & flags[q]).sum()),
                                                      int((flags[p] & ~flags[q]).sum())]
                                      for i, p in enumerate(names) for q in names[i + 1:]}
    return res


def per_class(ok: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
    pc = [float(ok[y == k].float().mean()) if (y == k).any() else float("nan")
          for k in range(10)]
    return {"avg": float(ok.float().mean()), "per_class": pc}


def show(res: dict[str, Any]) -> None:
    print(f"\n{res['model']}: n={res['n']}, eps={res['eps']} (linf), "
          f"clean {100 * res['clean']['avg']:.1f}%")
    print(f"{'':18s} {'robust':>7s}  " + " ".join(f"{k:>4d}" for k in range(10)) +
          f"  {'wall s':>8s} {'cpu s':>8s}  {'cpu / TA':>8s} {'cpu / ref':>9s}")
    for c, v in res["contenders"].items():
        ta = res.get("ratio_to_torchattacks-100", {}).get(c, {}).get("cpu", float("nan"))
        ref = res.get("ratio_to_reference", {}).get(c, {}).get("cpu", float("nan"))
        pcs = " ".join(f"{100 * p:4.0f}" for p in v["robust"]["per_class"])
        print(f"{c:18s} {100 * v['robust']['avg']:6.1f}%  {pcs}  {v['wall_s']:8.1f} "
              f"{v['cpu_s']:8.1f}  {ta:8.2f} {ref:9.2f}")
        if v["stage_time"]:
            print(f"    weights {v['layout']}, {v['folded_batchnorm']} BatchNorm folded; "
                  f"stages: " + ", ".join(
                f"{s} {t['seconds']:.1f} s on {t['points']}" for s, t in v["stage_time"].items()))
    print("broken by the first and not the second / by the second and not the first:")
    for pair, (a_only, b_only) in res["broken_by_one_not_other"].items():
        print(f"    {pair}: {a_only} / {b_only}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smallcnn only, 40 images, 1 round")
    p.add_argument("--models", nargs="+", default=["smallcnn", "resnet18"])
    p.add_argument("--contenders", nargs="+", default=list(contenders(0.0, 1))[:4],
                   choices=list(contenders(0.0, 1)),
                   help="default: the first four (robustfair-unchanged-layout: robustfair with "
                        "the model's weights left in their own memory order; "
                        "robustfair-unfolded: without folding BatchNorm into convolutions)")
    p.add_argument("--n", type=int, default=100, help="test images")
    p.add_argument("--eps", type=float, default=0.2)
    p.add_argument("--train-eps", type=float, default=0.3)
    p.add_argument("--train-n", type=int, default=2000)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--width", type=int, default=8, help="resnet18: channels of the first block")
    p.add_argument("--queries", type=int, default=5000, help="Square's budget (all four)")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "robustfair_bench"),
                   help="folder of the trained models")
    p.add_argument("--out", default=None, help="write the figures as JSON here")
    a = p.parse_args()
    if a.quick:
        a.models, a.n, a.rounds = ["smallcnn"], 40, 1
    torch.set_num_threads(a.threads)
    results = []
    for name in a.models:
        results.append(bench_model(name, a))
        show(results[-1])
    if a.out:
        Path(a.out).write_text(json.dumps({"settings": vars(a), "results": results}, indent=2))


if __name__ == "__main__":
    main()
