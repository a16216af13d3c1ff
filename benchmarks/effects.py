"""Does each method show the effect its paper reports? Paired benchmarks over seeds, on
controlled synthetic data where the paper's mechanism is isolated, and on MNIST-5k.

For every method the script trains the base method and the method with the same seeds (seed s:
the same training-set draw, initial weights and batch order for both), evaluates both on a large
test set, takes the per-seed differences (method − base) and a 95% Student-t interval on their
mean (``robustfair.metrics.stats``), and gives a verdict per claim: *shown* (the interval lies on
the claimed side of 0, or inside ±margin for a claim of "about the same"), *not shown* (it
includes 0) or *contradicted* (it lies on the other side). The designs below were fixed before
the first run; every variant tried since is listed in ``benchmarks/README.md``.

Synthetic designs (derived from each paper's own explanation of why the method works):

- ``chain`` (DAFA, LBGAT, FRL, CFA, WAT, BAT): five Gaussian classes on a line in the first of 8
  features, at positions 0, 3, 4, 5, 8 (×0.1, noise σ 0.03; the other 7 features are noise):
  classes 1–3 are close to each other and class 2 has two close neighbours, classes 0 and 4 are
  far from everything. DAFA's argument is that a class's robust error comes from its distance to
  the other classes, so giving the close classes a larger ε and weight at the expense of the far
  ones should lift the worst class at a small cost in the average.
- ``region`` (PART): 12×12 images whose label lives only in a 5×5 region (a class template plus
  noise) and whose other pixels hold a label-free distractor texture. PART's argument is that
  pixels differ in importance, so attacking the unimportant ones with a smaller ε_low frees
  capacity for clean accuracy at the same robustness.
- ``groups`` (Dr-Fairness): two labels × two groups; the label is carried by feature 1 in group 0
  and by feature 2 in group 1, feature 3 tells the group; group 1 is 5% of the real training
  data of each label (50% of the test data). Generated data per (label, group) come from the
  package's generator (``robustfair.generate``) at quality 1.0 (good) or 0.2 (poor). The paper's
  argument: learning the group ratios λ lowers the equalized-odds difference, and learning the
  real/generated ratio μ relies less on generated data when it is poor.

Usage::

    python benchmarks/effects.py dafa                   # one method, synthetic design
    python benchmarks/effects.py --all                  # every method
    python benchmarks/effects.py dafa --real            # the MNIST-5k version
    python benchmarks/effects.py dafa --smoke --out /tmp/x   # seconds; format check only
    python benchmarks/effects.py --readme               # rewrite the README table from results/

Results go to ``benchmarks/results/METHOD[-real].json``; ``--readme`` (also run after every
benchmark) rebuilds the verdict table in ``benchmarks/README.md`` from those files.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from robustfair.config import RunConfig, load_config
from robustfair.data import DATASETS, ArrayData, DataBundle
from robustfair.engine.trainer import Trainer
from robustfair.metrics.stats import paired_interval, verdict

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
README = HERE / "README.md"
BEGIN, END = "<!-- effects:begin -->", "<!-- effects:end -->"


# ---------------------------------------------------------------------------------- data
def _bundle(name: str, train: ArrayData, val: ArrayData, test: ArrayData, c: int,
            groups: list[str] | None = None, extra: dict[str, Any] | None = None) -> DataBundle:
    x = train.x if train.source is None else train.x[train.source == 0]
    mean = tuple(float(v) for v in x.mean((0, 2, 3)))
    std = tuple(float(v) for v in x.std((0, 2, 3)).clamp_min(1e-3))
    return DataBundle(name, train, val, test, c, mean, std, "none", [str(i) for i in range(c)],
                      groups or [], extra or {})


def chain_data(n_train: int, n_val: int, n_test: int, seed: int) -> DataBundle:
    """The ``chain`` design: per-class counts n_*; features (8, 1, 1) in [0, 1]."""
    pos = torch.tensor([0.0, 3.0, 4.0, 5.0, 8.0])

    def draw(n: int, g: torch.Generator) -> ArrayData:
        y = torch.arange(len(pos)).repeat_interleave(n)
        x = 0.5 + 0.1 * torch.randn(len(y), 8, generator=g)
        x[:, 0] = 0.5 + 0.1 * (pos[y] - 4.0) + 0.03 * torch.randn(len(y), generator=g)
        return ArrayData(x.clamp(0, 1)[:, :, None, None], y)

    g_test = torch.Generator().manual_seed(12345)
    g = torch.Generator().manual_seed(1000 + seed)
    return _bundle("effects-chain", draw(n_train, g), draw(n_val, g), draw(n_test, g_test), 5)


def region_data(n_train: int, n_val: int, n_test: int, seed: int) -> DataBundle:
    """The ``region`` design: 4 classes, 1×12×12 images, label in rows/cols 1..5 only."""
    c, side = 4, 12
    templates = torch.randint(0, 2, (c, 5, 5), generator=torch.Generator().manual_seed(7)) * 2 - 1

    def draw(n: int, g: torch.Generator) -> ArrayData:
        y = torch.arange(c).repeat_interleave(n)
        coarse = torch.rand(len(y), 1, 4, 4, generator=g)
        texture = torch.nn.functional.interpolate(coarse, size=(side, side), mode="bilinear",
                                                  align_corners=False)
        x = 0.25 + 0.5 * texture + 0.1 * torch.randn(len(y), 1, side, side, generator=g)
        patch = 0.5 + 0.2 * templates[y].float() + 0.25 * torch.randn(len(y), 5, 5, generator=g)
        x[:, 0, 1:6, 1:6] = patch
        return ArrayData(x.clamp(0, 1), y)

    g_test = torch.Generator().manual_seed(12345)
    g = torch.Generator().manual_seed(2000 + seed)
    return _bundle("effects-region", draw(n_train, g), draw(n_val, g), draw(n_test, g_test), c)


def groups_data(n_train: int, n_val: int, n_test: int, seed: int, quality: float,
                per_cell: int) -> DataBundle:
    """The ``groups`` design: n_* real samples per label (group 1 is 5% of train/val, 50% of
    test); generated data per cell at ``quality``, 20% of it held out for Dr-Fairness's probes."""
    from robustfair.generate import generated_for

    def draw(n: int, minority: float, g: torch.Generator) -> ArrayData:
        y = torch.arange(2).repeat_interleave(n)
        z = (torch.rand(len(y), generator=g) < minority).long()
        sign = 2.0 * y.float() - 1.0
        x = 0.5 + 0.1 * torch.randn(len(y), 6, generator=g)
        x[:, 0] += torch.where(z == 0, 0.15 * sign, torch.zeros_like(sign))
        x[:, 1] += torch.where(z == 1, 0.15 * sign, torch.zeros_like(sign))
        x[:, 2] = 0.3 + 0.4 * z.float() + 0.05 * torch.randn(len(y), generator=g)
        return ArrayData(x.clamp(0, 1)[:, :, None, None], y, z, torch.zeros_like(y))

    g_test = torch.Generator().manual_seed(12345)
    g = torch.Generator().manual_seed(3000 + seed)
    train, val, test = draw(n_train, 0.05, g), draw(n_val, 0.05, g), draw(n_test, 0.5, g_test)
    gen = generated_for(train, 2, 2, per_cell, quality, seed=seed)
    hold = torch.randperm(len(gen), generator=torch.Generator().manual_seed(0))
    k = len(gen) // 5
    extra = {"gen_val": gen.subset(hold[:k]), "generated": {"quality": quality}}
    return _bundle("effects-groups", train.concat(gen.subset(hold[k:])), val, test, 2,
                   ["g0", "g1"], extra)


def _register() -> None:
    """Make the designs loadable by name (``data.name``, ``data.params``) for the configs."""
    makers = {"effects-chain": chain_data, "effects-region": region_data,
              "effects-groups": groups_data}
    for name, fn in makers.items():
        if name not in DATASETS.names():
            DATASETS.register(name)(lambda cfg, fn=fn: fn(**cfg.params))


# ---------------------------------------------------------------------------------- designs
@dataclass(frozen=True)
class Claim:
    """The paper's claim on one figure: its difference (method − base) goes ``up``, ``down``
    or stays the ``same`` within ±``margin`` (percentage points)."""

    metric: str
    direction: str
    text: str
    margin: float = 0.0


@dataclass
class Comparison:
    """Base arm against method arm: config overrides (dotted keys) applied to the design."""

    label: str
    base: dict[str, Any]
    method: dict[str, Any]
    claims: list[Claim]


@dataclass
class Effect:
    paper_claim: str
    design: str
    config: dict[str, Any]  # the synthetic design's run settings
    comparisons: list[Comparison]
    smoke: dict[str, Any] = field(default_factory=dict)
    real: list[tuple[str, str, list[Claim]]] = field(default_factory=list)  # recipes


ROB_WORST = Claim("robust_worst", "up", "worst-class PGD-20 accuracy up")
ROB_SAME = Claim("robust_avg", "same", "average PGD-20 accuracy about the same (±1 point)", 1.0)
CLEAN_UP = Claim("clean_avg", "up", "clean accuracy up")

CHAIN = {
    "data": {"name": "effects-chain", "params": {"n_train": 1000, "n_val": 200,
                                                 "n_test": 10000}},
    "model": {"name": "mlp", "params": {"hidden": [64]}},
    "method": {"objective": {"name": "trades", "beta": 6.0}},
    "attack": {"norm": "linf", "eps": 0.03, "step_size": 0.0075, "steps": 5},
    "train": {"epochs": 20, "batch_size": 128, "optimizer": {"name": "adam", "lr": 0.003,
                                                            "weight_decay": 0.0},
              "schedule": {"name": "multistep", "milestones": [16], "gamma": 0.1}},
    "validation": {"every": 0},
    "eval": {"attacks": ["clean", "pgd20"], "batch_size": 5000},
}
CHAIN_SMOKE = {"data.params": {"n_train": 40, "n_val": 10, "n_test": 40},
               "train.epochs": 2, "train.schedule.milestones": [2]}


def _trades_vs(label: str, method: dict[str, Any], claims: list[Claim]) -> list[Comparison]:
    return [Comparison(label, {}, method, claims)]


EFFECTS: dict[str, Effect] = {
    "dafa": Effect(
        "DAFA (ICLR 2024): worst-class robust accuracy up (CIFAR-10 TRADES 21.31 → 30.53) at "
        "almost the same average (49.80 → 49.05)", "chain", CHAIN,
        _trades_vs("TRADES → TRADES+DAFA", {"method.policy": {"name": "dafa", "lam": 1.0}},
                   [ROB_WORST, ROB_SAME]),
        CHAIN_SMOKE, [("trades-mnist5k-dafa", "dafa-mnist5k", [ROB_WORST, ROB_SAME])]),
    "lbgat": Effect(
        "LBGAT (ICCV 2021): better clean accuracy at equal AutoAttack robustness (CIFAR-10 "
        "TRADES 84.92 / 52.64 → LBGAT0 88.22 / 52.86)", "chain", CHAIN,
        _trades_vs("TRADES → LBGAT (β 0)", {"method.objective": {
            "name": "lbgat", "alpha_mse": 1.0, "beta": 0.0,
            "teacher": {"name": "mlp", "params": {"hidden": [64]}}}}, [CLEAN_UP, ROB_SAME]),
        CHAIN_SMOKE, [("mnist5k-trades", "lbgat-mnist5k", [CLEAN_UP, ROB_SAME])]),
    "frl": Effect(
        "FRL (ICML 2021), in DAFA's table: worst-class robust accuracy up (21.31 → 25.84)",
        "chain", CHAIN, _trades_vs("TRADES → TRADES+FRL", {
            "method.policy": {"name": "frl", "mode": "both", "warmup": 1}}, [ROB_WORST]),
        CHAIN_SMOKE, [("trades-mnist5k-dafa", "frl-mnist5k", [ROB_WORST])]),
    "cfa": Effect(
        "CFA (CVPR 2023), in DAFA's table: worst-class robust accuracy up (21.31 → 27.62)",
        "chain", CHAIN, _trades_vs("TRADES → TRADES+CFA", {
            "method.policy": {"name": "cfa", "begin": 1, "fawa_decay": 0.5}}, [ROB_WORST]),
        CHAIN_SMOKE, [("trades-mnist5k-dafa", "cfa-mnist5k", [ROB_WORST])]),
    "wat": Effect(
        "WAT (AAAI 2023), in DAFA's table: worst-class robust accuracy up (21.31 → 28.55)",
        "chain", CHAIN, _trades_vs("TRADES → TRADES+WAT", {
            "method.policy": {"name": "wat", "eta": 0.1}}, [ROB_WORST]),
        CHAIN_SMOKE, [("trades-mnist5k-dafa", "wat-mnist5k", [ROB_WORST])]),
    "bat": Effect(
        "BAT (AAAI 2023): robust fairness up; in DAFA's table the worst class goes down "
        "(21.31 → 17.82), so the claim tested is the authors' (worst class up)",
        "chain", CHAIN, _trades_vs("TRADES → BAT", {
            "method.objective": {"name": "bat", "beta": 6.0, "tau": 1, "gamma": 1.0}},
            [ROB_WORST]),
        CHAIN_SMOKE, [("trades-mnist5k-dafa", "bat-mnist5k", [ROB_WORST])]),
    "part": Effect(
        "PART (ICML 2024): more clean accuracy at the same robustness (≈ +1 point on CIFAR-10)",
        "region", {
            "data": {"name": "effects-region", "params": {"n_train": 400, "n_val": 50,
                                                          "n_test": 1500}},
            "model": {"name": "smallcnn", "params": {"width": 0.5}},
            "method": {"objective": {"name": "pgd_at"}},
            "attack": {"norm": "linf", "eps": 0.1, "step_size": 0.025, "steps": 5},
            # v2: Adam 1e-3 for 10 epochs, the first setting in which the base arm learns
            # (benchmarks/diagnosis/part_region_calibration.py; v1, SGD 0.05 for 6 epochs,
            # left PGD-AT at chance in every seed)
            "train": {"epochs": 10, "batch_size": 64,
                      "optimizer": {"name": "adam", "lr": 0.001, "weight_decay": 0.0},
                      "schedule": {"name": "multistep", "milestones": [8], "gamma": 0.1}},
            "validation": {"every": 0},
            "eval": {"attacks": ["clean", "pgd20"], "batch_size": 1500}},
        [Comparison("AT → PART", {}, {"method.budget": {
            "name": "pixel", "eps_low": 0.05, "cam": "gradcam", "mask": "jet", "warmup": 2,
            "mask_source": "current"}}, [CLEAN_UP, ROB_SAME])],
        {"data.params": {"n_train": 16, "n_val": 4, "n_test": 10}, "train.epochs": 2,
         "train.batch_size": 32, "train.schedule.milestones": [2], "method.budget.warmup": 1},
        [("at-mnist5k-part", "part-mnist5k", [CLEAN_UP, ROB_SAME])]),
    "drfairness": Effect(
        "Dr-Fairness (TMLR 2023): lower equalized-odds difference than sampling real and "
        "generated data uniformly, and a real-data share μ that rises as the generated data "
        "gets worse", "groups", {
            "data": {"name": "effects-groups", "params": {
                "n_train": 2000, "n_val": 1000, "n_test": 10000, "quality": 1.0,
                "per_cell": 400}},
            "model": {"name": "mlp", "params": {"hidden": [32]}},
            "method": {"objective": {"name": "standard"}},
            "attack": {"norm": "linf", "eps": 0.0, "step_size": 0.01, "steps": 0},
            "train": {"epochs": 10, "batch_size": 64, "optimizer": {
                "name": "adam", "lr": 0.001, "weight_decay": 0.0},
                "schedule": {"name": "constant"}},
            "validation": {"every": 0},
            "eval": {"attacks": ["clean"], "batch_size": 5000}},
        [Comparison("uniform (real + good generated) → Dr-Fairness k=20", {}, {
            "method.sampler": {"name": "drfairness", "fairness": "eqodds", "k": 20.0,
                               "lr": 0.02, "probe": 128}},
            [Claim("eqodds", "down", "equalized-odds difference down")]),
         Comparison("Dr-Fairness k=20: good → poor generated data (quality 0.2)", {
             "method.sampler": {"name": "drfairness", "fairness": "eqodds", "k": 20.0,
                                "lr": 0.02, "probe": 128}}, {
             "method.sampler": {"name": "drfairness", "fairness": "eqodds", "k": 20.0,
                                "lr": 0.02, "probe": 128}, "data.params.quality": 0.2},
            [Claim("mu_mean", "up", "share of real data μ up")])],
        {"data.params": {"n_train": 200, "n_val": 200, "n_test": 100, "per_cell": 60},
         "train.epochs": 1},
        [("mnist5k-groups-uniform", "mnist5k-groups-drfairness",
          [Claim("eqodds", "down", "equalized-odds difference down")])]),
}
# An investigation added after the k = 20 runs (not part of the pre-registered design): the same
# groups design with k = 1, i.e. more weight on the fairness gap in the outer objective.
EFFECTS["drfairness-k1"] = Effect(
    "Dr-Fairness with k = 1 instead of the paper's k = 20 (investigation): equalized-odds "
    "difference down", "groups", EFFECTS["drfairness"].config,
    [Comparison("uniform (real + good generated) → Dr-Fairness k=1", {}, {
        "method.sampler": {"name": "drfairness", "fairness": "eqodds", "k": 1.0, "lr": 0.02,
                           "probe": 128}},
        [Claim("eqodds", "down", "equalized-odds difference down")])],
    EFFECTS["drfairness"].smoke, [])


# ---------------------------------------------------------------------------------- runs
def set_key(d: dict[str, Any], dotted: str, value: Any, existing: bool = False) -> None:
    """``d[a][b][c] = value`` for ``dotted = "a.b.c"``; a dict value (without a ``name``) is
    merged into a dict. ``existing``: do nothing when a parent of the key is absent."""
    *path, last = dotted.split(".")
    for k in path:
        if existing and k not in d:
            return
        d = d.setdefault(k, {})
    if isinstance(value, dict) and isinstance(d.get(last), dict) and "name" not in value:
        d[last] = {**d[last], **copy.deepcopy(value)}
    else:
        d[last] = copy.deepcopy(value)


def build_config(design: dict[str, Any], arm: dict[str, Any], seed: int,
                 smoke: dict[str, Any] | None = None) -> RunConfig:
    """The run config of one arm: the design, the arm's overrides, the smoke overrides (only
    where the arm has the key's parent), the seed (of the run and of the training-set draw)."""
    cfg = copy.deepcopy(design)
    for k, v in arm.items():
        set_key(cfg, k, v)
    for k, v in (smoke or {}).items():
        set_key(cfg, k, v, existing=True)
    set_key(cfg, "data.params.seed", seed)
    cfg.update({"seed": seed, "device": "cpu", "logging": {"progress": False}})
    return RunConfig.model_validate(cfg)


def train_and_evaluate(cfg: RunConfig) -> dict[str, float]:
    """Train one run and return its figures (fractions): the one place where a run happens."""
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.process_time()
        tr = Trainer(cfg, Path(tmp), quiet=True)
        tr.fit()
        s = tr.final_eval(progress=False)
        cpu = time.process_time() - t0
    out = {"clean_avg": s["attacks"]["clean"]["avg"], "clean_worst": s["attacks"]["clean"]["worst"],
           "cpu_s": cpu}
    robust = [a for a in s["attacks"] if a != "clean"]
    if robust:
        r = s["attacks"][robust[0]]
        out |= {"robust_avg": r["avg"], "robust_worst": r["worst"]}
    groups = (s.get("groups") or {}).get("attacks", {}).get("clean")
    if groups:
        out |= {"eqodds": groups["eqodds_diff"], "worst_cell": groups["worst_label_group"]}
    mu = getattr(tr.sampler, "mu", None)
    if mu is not None:  # Dr-Fairness: mean real share μ, and λ of each label's minority group
        out["mu_mean"] = float(mu.mean())
        minority = tr.sampler.real_counts.argmin(1)
        out["lam_minority"] = float(tr.sampler.lam.gather(1, minority[:, None]).mean())
    return out


def claim_rows(comp_label: str, base_runs: list[dict[str, float]],
               method_runs: list[dict[str, float]], claims: list[Claim]) -> list[dict[str, Any]]:
    """One row per claim: per-seed figures, the paired interval (points) and the verdict."""
    rows = []
    for c in claims:
        scale = 1.0 if c.metric == "mu_mean" else 100.0
        b = [scale * r[c.metric] for r in base_runs]
        m = [scale * r[c.metric] for r in method_runs]
        iv = paired_interval(m, b)
        rows.append({"comparison": comp_label, "claim": c.text, "metric": c.metric,
                     "direction": c.direction, "margin": c.margin, "unit":
                     "fraction" if scale == 1.0 else "points",
                     "base_mean": sum(b) / len(b), "method_mean": sum(m) / len(m),
                     "base": b, "method": m, "interval": iv.to_dict(),
                     "verdict": verdict(iv.low, iv.high, c.direction, c.margin)})  # type: ignore
    return rows


def _init_worker() -> None:
    torch.set_num_threads(1)
    _register()


def _map(fn: Any, items: list[Any], jobs: int) -> Iterator[Any]:
    """``fn(x)`` for each item in order, in ``jobs`` worker processes when jobs > 1."""
    if jobs <= 1 or len(items) <= 1:
        yield from map(fn, items)
        return
    import multiprocessing as mp

    with mp.get_context("fork").Pool(min(jobs, len(items)), initializer=_init_worker) as pool:
        yield from pool.imap(fn, items, chunksize=1)


#: figures of every run trained in this process, by its full config
RUN_CACHE: dict[str, dict[str, float]] = {}
#: figures of every run trained so far (one JSON line per run: the sha256 of its full config,
#: its figures, the commit): a run is never trained twice, also across invocations
RUN_LOG = RESULTS / "runs.jsonl"


def config_key(cfg: RunConfig) -> str:
    return json.dumps(cfg.model_dump(), sort_keys=True, default=str)


def _sha(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def load_run_log(path: Path = RUN_LOG) -> dict[str, dict[str, float]]:
    """The figures in ``path`` by config sha256 (later lines win)."""
    out: dict[str, dict[str, float]] = {}
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            rec = json.loads(line)
            out[rec["config_sha256"]] = rec["figures"]
    return out


def append_run_log(key: str, figures: dict[str, float], commit: str,
                   path: Path = RUN_LOG) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps({"config_sha256": _sha(key), "figures": figures,
                            "commit": commit}) + "\n")


def run_effect(name: str, seeds: list[int], smoke: bool = False, real: bool = False,
               log: Any = print, jobs: int = 1) -> dict[str, Any]:
    """Run one method's benchmark (its runs in ``jobs`` processes); return the JSON result."""
    _register()
    eff = EFFECTS[name]
    prov = provenance()  # the code as it is when the runs start
    t0 = time.perf_counter()
    cache = RUN_CACHE
    rows: list[dict[str, Any]] = []
    runs: dict[str, list[dict[str, float]]] = {}
    pairs = ([(f"{b} → {m}", ("recipe", b), ("recipe", m), cl) for b, m, cl in eff.real]
             if real else [(c.label, ("design", c.base), ("design", c.method), c.claims)
                           for c in eff.comparisons])
    plan = {(label, role, seed): _arm_config(eff, arm, seed, smoke)
            for label, base, method, _ in pairs for seed in seeds
            for role, arm in (("base", base), ("method", method))}
    keys = {task: config_key(cfg) for task, cfg in plan.items()}
    # the same run is trained once: across the methods of one invocation (the --real methods
    # share their TRADES baseline) and, outside --smoke, across invocations (RUN_LOG)
    logged = {} if smoke else load_run_log()
    for key in keys.values():
        if key not in cache and _sha(key) in logged:
            cache[key] = logged[_sha(key)]
    todo = {keys[t]: cfg for t, cfg in plan.items() if keys[t] not in cache}
    for key, figures in zip(todo, _map(train_and_evaluate, list(todo.values()), jobs)):
        cache[key] = figures
        if not smoke:
            append_run_log(key, figures, prov["commit"] + ("+" if prov["dirty"] else ""))
        task = next(t for t in plan if keys[t] == key)
        log(f"  [{task[0]}] {task[1]} seed {task[2]}: " + ", ".join(
            f"{k} {v:.4f}" for k, v in figures.items()))
    for label, _, _, claims in pairs:
        arms = {role: [cache[keys[(label, role, s)]] for s in seeds]
                for role in ("base", "method")}
        runs[label] = [{"base": b, "method": m} for b, m in zip(arms["base"], arms["method"],
                                                                 strict=True)]
        rows += claim_rows(label, arms["base"], arms["method"], claims)
    return {"method": name, "setting": "mnist5k" if real else f"synthetic:{eff.design}",
            "paper_claim": eff.paper_claim, "seeds": seeds, "smoke": smoke, "rows": rows,
            "runs": runs, "wall_s": time.perf_counter() - t0, "provenance": prov}


def _arm_config(eff: Effect, arm: tuple[str, Any], seed: int, smoke: bool) -> RunConfig:
    kind, spec = arm
    if kind == "recipe":
        ov = [f"seed={seed}", "device=cpu", "logging.progress=false"]
        if smoke:
            ov += ["data.train_limit=100", "data.test_limit=50", "train.epochs=1"]
        return load_config(recipe=spec, overrides=ov)
    return build_config(eff.config, spec, seed, eff.smoke if smoke else None)


def provenance() -> dict[str, Any]:
    def git(*a: str) -> str:
        try:
            return subprocess.run(["git", *a], cwd=HERE, capture_output=True, text=True,
                                  check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return "unknown"

    import numpy
    import scipy

    return {"commit": git("rev-parse", "--short", "HEAD"),
            "dirty": bool(git("status", "--porcelain", "--", "../src", ".")),
            "python": platform.python_version(), "torch": torch.__version__,
            "numpy": numpy.__version__, "scipy": scipy.__version__,
            "threads": torch.get_num_threads(), "machine": platform.machine(),
            "command": "python benchmarks/effects.py " + " ".join(sys.argv[1:])}


# ---------------------------------------------------------------------------------- output
def format_result(res: dict[str, Any]) -> str:
    lines = [f"{res['method']} ({res['setting']}, seeds {res['seeds']})",
             f"  paper: {res['paper_claim']}"]
    for r in res["rows"]:
        iv = r["interval"]
        unit = "" if r["unit"] == "fraction" else " pts"
        lines.append(f"  {r['comparison']}: {r['claim']}: {r['base_mean']:.2f} → "
                     f"{r['method_mean']:.2f}; difference {iv['mean']:+.2f}{unit} "
                     f"[{iv['low']:+.2f}, {iv['high']:+.2f}] (95% t, n={iv['n']}) → "
                     f"{r['verdict'].upper()}")
    return "\n".join(lines)


def readme_table(results: list[dict[str, Any]], methods: list[str]) -> str:
    """The verdict table (markdown) from result files; a method and setting without one is
    listed as 'not run'."""
    head = ("| method | setting | comparison | claim | base → method | difference [95% CI] | "
            "seeds | verdict | commit |")
    lines = [head, "|" + "---|" * 9]
    seen = set()
    for res in results:
        seen.add((res["method"], res["setting"].split(":")[0]))
        p = res["provenance"]
        for r in res["rows"]:
            iv = r["interval"]
            unit = "" if r["unit"] == "fraction" else " pts"
            lines.append(
                f"| {res['method']} | {res['setting']} | {r['comparison']} | {r['claim']} | "
                f"{r['base_mean']:.2f} → {r['method_mean']:.2f} | {iv['mean']:+.2f}{unit} "
                f"[{iv['low']:+.2f}, {iv['high']:+.2f}] | {iv['n']} | **{r['verdict']}** | "
                f"{p['commit']}{'+' if p.get('dirty') else ''} |")
    for m in methods:
        eff = EFFECTS.get(m)
        settings = [("synthetic", f"synthetic:{eff.design}" if eff else "synthetic")]
        if eff is None or eff.real:
            settings.append(("mnist5k", "mnist5k"))
        for kind, label in settings:
            if (m, kind) not in seen:
                lines.append(f"| {m} | {label} | – | – | – | – | – | not run | – |")
    return "\n".join(lines)


def write_readme(results_dir: Path = RESULTS, readme: Path = README) -> str:
    results = [json.loads(p.read_text()) for p in sorted(results_dir.glob("*.json"))]
    results = [r for r in results if not r.get("smoke")]
    order = {m: i for i, m in enumerate(EFFECTS)}
    results.sort(key=lambda r: (order.get(r["method"], 99), r["setting"]))
    table = readme_table(results, list(EFFECTS))
    envs = sorted({(r["provenance"]["commit"], r["provenance"]["torch"],
                    r["provenance"]["python"], r["provenance"]["numpy"],
                    r["provenance"]["scipy"]) for r in results})
    cmds = sorted({r["provenance"]["command"] for r in results})
    block = "\n".join([
        BEGIN, "", "Generated by `python benchmarks/effects.py --readme` from "
        "`benchmarks/results/*.json`; do not edit by hand.", "", table, "",
        "Commands: " + "; ".join(f"`{c}`" for c in cmds) if cmds else "Commands: none yet.",
        "", "Environments (commit, torch, python, numpy, scipy): " + "; ".join(
            ", ".join(e) for e in envs) if envs else "", "", END])
    text = readme.read_text(encoding="utf-8") if readme.exists() else ""
    if BEGIN in text and END in text:
        text = text[:text.index(BEGIN)] + block + text[text.index(END) + len(END):]
    else:
        text = text.rstrip("\n") + "\n\n## Paper effects (`effects.py`)\n\n" + block + "\n"
    readme.write_text(text, encoding="utf-8")
    return table


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("methods", nargs="*", metavar="METHOD",
                   help=f"one or more of: {', '.join(EFFECTS)}")
    p.add_argument("--all", action="store_true", help="every method")
    p.add_argument("--real", action="store_true", help="the MNIST-5k recipes instead")
    p.add_argument("--seeds", type=int, default=5, help="seeds 0..N-1 (at least 2)")
    p.add_argument("--smoke", action="store_true",
                   help="tiny data and 1-2 epochs, 2 seeds: checks that it runs (seconds)")
    p.add_argument("--out", type=Path, default=None,
                   help="folder for METHOD.json (default benchmarks/results; with --smoke: none)")
    p.add_argument("--readme", action="store_true", help="only rebuild the README table")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    p.add_argument("--jobs", type=int, default=1,
                   help="runs trained in parallel processes (one thread each)")
    args = p.parse_args(argv)
    if args.all:
        args.methods = list(EFFECTS)
    unknown = [m for m in args.methods if m not in EFFECTS]
    if unknown:
        p.error(f"unknown method {unknown[0]!r}; choose from {', '.join(EFFECTS)}")
    if args.real:
        if args.all:
            args.methods = [m for m in args.methods if EFFECTS[m].real]
        no_real = [m for m in args.methods if not EFFECTS[m].real]
        if no_real:
            p.error(f"{no_real[0]!r} has no MNIST-5k version; drop --real for it")
    if not args.methods and not args.readme:
        p.error("name a METHOD, or use --all or --readme")
    if args.smoke:
        args.seeds = 2
    if args.seeds < 2:
        p.error("--seeds must be at least 2 for an interval")
    return args


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.readme:
        print(write_readme())
        return []
    out = args.out if args.out is not None else (None if args.smoke else RESULTS)
    results = []
    for name in args.methods:
        res = run_effect(name, list(range(args.seeds)), args.smoke, args.real,
                         jobs=args.jobs)
        print(format_result(res), flush=True)
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            suffix = "-real" if args.real else ""
            (out / f"{name}{suffix}.json").write_text(json.dumps(res, indent=1) + "\n")
        results.append(res)
    if out == RESULTS:
        write_readme()
    return results


if __name__ == "__main__":
    main()
