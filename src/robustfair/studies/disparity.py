"""The accuracy-disparity study of AT-on-AD: standard vs adversarial training over the grid
norm × ε × imbalance ratio R × seed, and the two rows of the paper's Figure 1.

Hu, Wu, Zhang, Zhao, "Understanding the Impact of Adversarial Robustness on Accuracy Disparity",
ICML 2023 (arXiv:2211.15762); protocol from the official code (specs part_atad §2.3–2.4).

A *cell* is one (R, seed, method) with method = standard training or AT at (norm, ε). For every
cell each learning rate of the grid is trained with early stopping, and the one with the lowest
clean validation loss is kept. Per (norm, ε, R, seed):

- gap of accuracy disparity = AD(AT) − AD(standard), AD = acc_majority − acc_minority on the
  balanced test set;
- gap of standard accuracy = acc(standard) − acc(AT) on the imbalanced test set;

reported as mean ± std/√n over the seeds (population std, as the official script). On the stable
mixture the closed form of :mod:`.oracle` (the best standard and robust linear rules of the
population) is reported beside the measured gaps.

Each finished cell is written atomically to ``OUT/cells/<key>.json`` with a fingerprint of the
settings it depends on, so an interrupted study resumes where it stopped, and adding seeds,
ratios or ε reuses every cell already computed. Cells run in parallel worker processes. For
linear models all methods of one (R, seed) train together (:func:`~.linear.fit_linear_bank`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..config import DataConfig
from ..data import DataBundle, load_data
from ..engine.io import atomic_write_json, make_dir
from ..errors import UserError
from ..metrics.classwise import per_class_accuracy
from ..registry import format_validation_error
from .metrics import accuracy_disparity, ad_gap, mean_se, standard_accuracy_gap
from .trainer import Fit, Method, TrainSettings, fit_network

log = logging.getLogger("robustfair.studies")

NORMS = ("l2", "linf")


class DisparityStudyConfig(BaseModel):
    """Everything a disparity study depends on (``study.json`` in the output folder)."""

    model_config = ConfigDict(extra="forbid")

    dataset: str = "stable-mixture"
    preset: str = Field("official", description="the preset the settings started from")
    data_params: dict[str, Any] = Field(default_factory=dict)
    data_root: str | None = None
    download: bool = False
    fixed_data: bool = Field(
        False, description="draw the data once (data_params.seed) for every seed, as the "
        "official files; default: a fresh draw per seed")
    model: str = "linear"
    model_params: dict[str, Any] = Field(default_factory=dict)
    norms: list[Literal["l2", "linf"]] = Field(default_factory=lambda: list(NORMS))
    eps: dict[str, list[float]] = Field(default_factory=dict)
    ratios: list[float] = Field(default_factory=lambda: [1, 2, 5, 10, 20])
    seeds: list[int] = Field(default_factory=lambda: [2, 22, 42, 62, 82])
    lrs_standard: list[float] = Field(default_factory=lambda: [1e-3])
    lrs_robust: list[float] = Field(default_factory=lambda: [1e-3])
    train: TrainSettings = Field(default_factory=TrainSettings)
    device: str = "cpu"

    @field_validator("ratios")
    @classmethod
    def _ratios(cls, v: list[float]) -> list[float]:
        if not v or any(r < 1 for r in v):
            raise ValueError("give at least one ratio, each >= 1")
        return v

    @field_validator("seeds", "lrs_standard", "lrs_robust")
    @classmethod
    def _nonempty(cls, v: list[Any]) -> list[Any]:
        if not v:
            raise ValueError("give at least one value")
        if any(isinstance(x, float) and not x > 0 for x in v):
            raise ValueError("learning rates must be > 0")
        return v

    @model_validator(mode="after")
    def _grid(self) -> DisparityStudyConfig:
        if not self.norms:
            raise ValueError("norms: give at least one of l2, linf")
        for n in self.norms:
            if not self.eps.get(n) or any(not e > 0 for e in self.eps[n]):
                raise ValueError(f"eps.{n}: give the ε grid for norm {n} (values > 0)")
        if self.train.attack == "closed-form" and self.model != "linear":
            raise ValueError("train.attack closed-form needs model linear")
        return self

    @property
    def methods(self) -> list[Method]:
        return [Method()] + [Method(n, e) for n in self.norms for e in self.eps[n]]

    def lrs(self, method: Method) -> list[float]:
        return self.lrs_robust if method.robust else self.lrs_standard

    @property
    def linear_bank(self) -> bool:
        """Linear models train with the closed-form attack, all methods of a cell at once."""
        return self.model == "linear" and self.train.attack in ("auto", "closed-form")


def build_study_config(raw: dict[str, Any]) -> DisparityStudyConfig:
    try:
        return DisparityStudyConfig(**raw)
    except ValidationError as exc:
        raise UserError(format_validation_error(exc, "study")) from None


@dataclass(frozen=True)
class Job:
    """Cells that train together: one (R, seed) and one or more methods."""

    ratio: float
    seed: int
    methods: tuple[Method, ...]


def cell_key(ratio: float, seed: int, method: Method) -> str:
    return f"R{ratio:g}_seed{seed}_{method.key}"


def cell_fingerprint(cfg: DisparityStudyConfig, ratio: float, seed: int, method: Method) -> str:
    """Hash of every setting the cell's result depends on (not the device or the grid lists)."""
    keep = cfg.model_dump(include={"dataset", "data_params", "fixed_data", "model",
                                   "model_params", "train"})
    keep.update(ratio=ratio, seed=seed, norm=method.norm, eps=method.eps, lrs=cfg.lrs(method))
    blob = json.dumps(keep, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def load_cell_data(cfg: DisparityStudyConfig, ratio: float, seed: int) -> DataBundle:
    """The data of one (R, seed): drawn with the run seed unless ``fixed_data``."""
    params = dict(cfg.data_params)
    params["ratio"] = ratio
    if not cfg.fixed_data:
        params["seed"] = seed
    dcfg = DataConfig(name=cfg.dataset, root=cfg.data_root, download=cfg.download,
                      params=params)
    data = load_data(dcfg)
    if "test_balanced" not in data.extra or data.num_classes != 2:
        raise UserError(f"dataset {cfg.dataset!r} is not a binary imbalanced task; use "
                        f"stable-mixture or a *-binary dataset (robustfair datasets)")
    return data


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _fit_job(cfg: DisparityStudyConfig, job: Job, data: DataBundle) -> list[Fit]:
    device = _device(cfg.device)
    pairs = [(m, lr) for m in job.methods for lr in cfg.lrs(m)]
    if cfg.linear_bank:
        from .linear import fit_linear_bank

        return fit_linear_bank(data, pairs, cfg.train, job.seed, device)
    from ..models import build_model

    def build() -> torch.nn.Module:
        return build_model(cfg.model, data.in_channels, 2, data.image_size,
                           **cfg.model_params)

    return [fit_network(build, data, m, lr, cfg.train, job.seed, device) for m, lr in pairs]


def _accuracy(pred: torch.Tensor, labels: torch.Tensor) -> dict[str, Any]:
    correct = pred == labels
    acc, counts = per_class_accuracy(correct, labels, 2)
    return {"acc": float(correct.float().mean()), "per_class": acc.tolist(),
            "counts": counts.tolist()}


def _finite(v: float) -> float | None:
    return v if math.isfinite(v) else None


def cell_record(cfg: DisparityStudyConfig, job: Job, method: Method, fits: list[Fit],
                data: DataBundle) -> dict[str, Any]:
    """The JSON record of one cell: every learning rate's run and the selected one."""
    y_test, y_bal = data.test.y, data.extra["test_balanced"].y
    major = int(data.extra["majority"])
    runs = [{"lr": f.lr, "val_loss": _finite(f.val_loss), "best_epoch": f.best_epoch,
             "epochs": f.epochs, "test_acc": float((f.pred_test == y_test).float().mean()),
             "ad": accuracy_disparity(f.pred_balanced == y_bal, y_bal, major)} for f in fits]
    losses = [f.val_loss if math.isfinite(f.val_loss) else math.inf for f in fits]
    best = fits[int(np.argmin(losses))]  # first minimum, as np.argmin in the official script
    rec: dict[str, Any] = {
        "key": cell_key(job.ratio, job.seed, method),
        "fingerprint": cell_fingerprint(cfg, job.ratio, job.seed, method),
        "ratio": job.ratio, "seed": job.seed, "norm": method.norm, "eps": method.eps,
        "majority": major, "runs": runs, "lr": best.lr, "val_loss": _finite(best.val_loss),
        "test": _accuracy(best.pred_test, y_test),
        "balanced": _accuracy(best.pred_balanced, y_bal),
        "ad": accuracy_disparity(best.pred_balanced == y_bal, y_bal, major),
    }
    if best.params:
        rec["linear"] = best.params
        if "mixture" in data.extra:
            rec["closed_form_per_class"] = data.extra["mixture"].class_accuracy(
                np.asarray(best.params["v"]), best.params["c"]).tolist()
    return rec


def run_job(cfg_raw: dict[str, Any], job: Job, cells_dir: str) -> list[dict[str, Any]]:
    """Train one job and write its cells (atomic); run in a worker process."""
    cfg = DisparityStudyConfig(**cfg_raw)
    data = load_cell_data(cfg, job.ratio, job.seed)
    fits = _fit_job(cfg, job, data)
    records = []
    for m in job.methods:
        rec = cell_record(cfg, job, m, [f for f in fits if f.method == m], data)
        atomic_write_json(Path(cells_dir) / f"{rec['key']}.json", rec)
        records.append(rec)
    return records


def load_done(cfg: DisparityStudyConfig, cells_dir: Path) -> dict[str, dict[str, Any]]:
    """Cached cells whose fingerprint matches the current settings."""
    done: dict[str, dict[str, Any]] = {}
    for r in cfg.ratios:
        for s in cfg.seeds:
            for m in cfg.methods:
                path = cells_dir / f"{cell_key(r, s, m)}.json"
                try:
                    rec = json.loads(path.read_text())
                except (OSError, ValueError):
                    continue
                if rec.get("fingerprint") == cell_fingerprint(cfg, r, s, m):
                    done[rec["key"]] = rec
    return done


def plan_jobs(cfg: DisparityStudyConfig, done: dict[str, Any]) -> list[Job]:
    """The jobs still to run: one per (R, seed) for linear models, else one per cell."""
    jobs = []
    for r in cfg.ratios:
        for s in cfg.seeds:
            todo = tuple(m for m in cfg.methods if cell_key(r, s, m) not in done)
            if not todo:
                continue
            if cfg.linear_bank:
                jobs.append(Job(r, s, todo))
            else:
                jobs.extend(Job(r, s, (m,)) for m in todo)
    return jobs


def _execute(cfg: DisparityStudyConfig, jobs: list[Job], cells_dir: Path, workers: int,
             progress: Any) -> Iterable[dict[str, Any]]:
    from ..sweep.runner import run_jobs

    payloads = [(cfg.model_dump(), job, str(cells_dir)) for job in jobs]
    results = run_jobs(_run_job_payload, payloads, workers=workers)
    with contextlib.closing(results):  # interrupted: the workers stop before this returns
        for _, recs in results:
            progress.update(len(recs))
            yield from recs


def _run_job_payload(payload: tuple[dict[str, Any], Job, str]) -> list[dict[str, Any]]:
    return run_job(*payload)


def run_disparity_study(cfg: DisparityStudyConfig, out_dir: str | Path, workers: int = 2,
                        quiet: bool = False, force: bool = False) -> dict[str, Any]:
    """Run (or resume) the study, then write ``results.json`` and the Figure-1 PNGs."""
    from tqdm.auto import tqdm

    out = Path(out_dir)
    cells_dir = out / "cells"
    if force and cells_dir.exists():
        shutil.rmtree(cells_dir)
    make_dir(cells_dir)
    atomic_write_json(out / "study.json", cfg.model_dump())
    done = load_done(cfg, cells_dir)
    jobs = plan_jobs(cfg, done)
    total = len(cfg.ratios) * len(cfg.seeds) * len(cfg.methods)
    if jobs:
        load_cell_data(cfg, jobs[0].ratio, jobs[0].seed)  # fail fast on bad data settings
    log.info("%d of %d cells cached in %s; %d jobs to run", len(done), total, cells_dir, len(jobs))
    with tqdm(total=total, initial=len(done), desc="cells", unit="cell", disable=quiet,
              dynamic_ncols=True) as progress, \
            contextlib.closing(_execute(cfg, jobs, cells_dir, workers, progress)) as recs:
        for rec in recs:
            done[rec["key"]] = rec
    results = aggregate(cfg, done)
    results["closed_form"] = closed_form(cfg)
    atomic_write_json(out / "results.json", results)
    from .figures import caption, plot_figure1

    results["figures"] = plot_figure1(results, out)
    results["caption"] = caption(results)
    atomic_write_json(out / "results.json", results)
    return results


def mixture_of(cfg: DisparityStudyConfig) -> Any:
    """The stable mixture the study draws from (None for other datasets)."""
    if cfg.dataset != "stable-mixture":
        return None
    from ..data.stable_mixture import StableMixtureParams, parse_params

    return parse_params(StableMixtureParams, dict(cfg.data_params), "data_params").mixture()


def data_description(cfg: DisparityStudyConfig) -> str:
    """One line naming the data every curve of the study used."""
    mix = mixture_of(cfg)
    if mix is not None:
        return f"stable-mixture: {mix.describe()}"
    params = ", ".join(f"{k}={v}" for k, v in sorted(cfg.data_params.items()))
    return f"{cfg.dataset}" + (f" ({params})" if params else "")


def closed_form(cfg: DisparityStudyConfig) -> dict[str, Any] | None:
    """The oracle's gaps for the study's grid (stable mixture, linear models), else None."""
    mix = mixture_of(cfg)
    if mix is None or cfg.model != "linear":
        return None
    from .oracle import closed_form_gaps
    from .trainer import single_thread

    with single_thread():
        return closed_form_gaps(mix, list(cfg.ratios), {n: cfg.eps[n] for n in cfg.norms})


def aggregate(cfg: DisparityStudyConfig, cells: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The two gaps per (norm, ε, R, seed) and their mean ± SE over seeds."""
    shape = (len(cfg.ratios), len(cfg.seeds))
    std_ad, std_acc = np.zeros(shape), np.zeros(shape)
    for i, r in enumerate(cfg.ratios):
        for j, s in enumerate(cfg.seeds):
            rec = cells[cell_key(r, s, Method())]
            std_ad[i, j], std_acc[i, j] = rec["ad"], rec["test"]["acc"]
    per_norm: dict[str, Any] = {}
    for n in cfg.norms:
        rows = []
        for e in cfg.eps[n]:
            ad = np.zeros(shape)
            acc = np.zeros(shape)
            for i, r in enumerate(cfg.ratios):
                for j, s in enumerate(cfg.seeds):
                    rec = cells[cell_key(r, s, Method(n, e))]
                    ad[i, j] = ad_gap(rec["ad"], std_ad[i, j])
                    acc[i, j] = standard_accuracy_gap(std_acc[i, j], rec["test"]["acc"])
            m_ad, se_ad = mean_se(ad)
            m_acc, se_acc = mean_se(acc)
            rows.append({"eps": e, "data": data_description(cfg),
                         "ad_gap": ad.tolist(), "acc_gap": acc.tolist(),
                         "ad_gap_mean": m_ad.tolist(), "ad_gap_se": se_ad.tolist(),
                         "acc_gap_mean": m_acc.tolist(), "acc_gap_se": se_acc.tolist()})
        per_norm[n] = rows
    m_std_ad, se_std_ad = mean_se(std_ad)
    return {
        "dataset": cfg.dataset, "data_params": cfg.data_params, "model": cfg.model,
        "preset": cfg.preset, "data": data_description(cfg),
        "selection": {"loss": cfg.train.selection, "min_epochs": cfg.train.min_epochs},
        "ratios": cfg.ratios, "seeds": cfg.seeds, "norms": cfg.norms, "eps": cfg.eps,
        "standard": {"ad": std_ad.tolist(), "acc": std_acc.tolist(),
                     "ad_mean": m_std_ad.tolist(), "ad_se": se_std_ad.tolist()},
        "gaps": per_norm,
        "definitions": {
            "ad": "acc_majority - acc_minority on the balanced test set",
            "ad_gap": "AD(adversarial training) - AD(standard training)",
            "acc_gap": "acc(standard) - acc(adversarial training) on the imbalanced test set",
            "se": "std over seeds (ddof=0) / sqrt(number of seeds)",
            "closed_form": "gaps of the best standard and robust linear rules of the population "
                           "(robustfair.studies.oracle)",
        },
    }


def results_table(results: dict[str, Any]) -> str:
    """Mean ± SE of both gaps (percentage points) per norm, ε and R, with the closed form."""
    sel = results.get("selection", {})
    lines = [f"{results.get('data', results['dataset'])}",
             f"model {results['model']}, {len(results['seeds'])} seeds (mean ± SE, points); "
             f"selection by {sel.get('loss', 'clean')} validation loss"
             + (f" after {sel['min_epochs']} epochs" if sel.get("min_epochs") else "")]
    cf = results.get("closed_form")
    head = (f"{'norm':<5} {'eps':>8} {'R':>5} {'AD gap':>15}" + (f" {'closed':>7}" if cf else "")
            + f" {'acc gap':>15}" + (f" {'closed':>7}" if cf else ""))
    lines += [head, "-" * len(head)]
    for n in results["norms"]:
        for k, row in enumerate(results["gaps"][n]):
            ref = cf["gaps"][n][k] if cf else None
            for i, r in enumerate(results["ratios"]):
                ad = f"{100 * row['ad_gap_mean'][i]:+6.2f} ± {100 * row['ad_gap_se'][i]:4.2f}"
                acc = f"{100 * row['acc_gap_mean'][i]:+6.2f} ± {100 * row['acc_gap_se'][i]:4.2f}"
                line = f"{n:<5} {row['eps']:>8g} {r:>5g} {ad:>15}"
                if ref:
                    line += f" {100 * ref['ad_gap'][i]:+7.2f}"
                line += f" {acc:>15}"
                if ref:
                    line += f" {100 * ref['acc_gap'][i]:+7.2f}"
                lines.append(line)
    return "\n".join(lines)
