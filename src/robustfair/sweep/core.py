"""Run a sweep: plan its trials, skip the finished ones, train the rest on a runner, compare.

Layout of a sweep's folder: ``runs/<trial>/`` (ordinary run directories), ``sweep.json`` (the
spec and every trial's state) and ``compare/`` (the table of :mod:`robustfair.report.compare`,
mean ± std over seeds). A trial whose run directory holds the same resolved config and an
``eval/summary.json`` is finished and skipped; one with the same config and no summary (a killed
run) continues with ``--resume``; one whose config changed is trained again from scratch."""

from __future__ import annotations

import logging
import socket
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..config import build_config, dump_config, load_config
from ..engine.io import atomic_write_json
from ..errors import UserError
from .runner import run_jobs
from .spec import SweepSpec, Trial, expand

log = logging.getLogger("robustfair")

STATE = "sweep.json"
#: config keys that may differ without making a finished run stale
_IGNORED = ("output_dir", "logging", "device")


@dataclass
class Planned:
    """A trial with its resolved config, run directory and what the sweep does with it."""

    trial: Trial
    config: str
    run_dir: Path
    action: str  # skip | resume | train | retrain
    status: str = "pending"  # pending | done | failed
    seconds: float | None = None
    error: str | None = None
    host: str | None = None


@dataclass
class SweepResult:
    out_dir: Path
    planned: list[Planned]
    compare: dict[str, Path] = field(default_factory=dict)
    comparison: Any = None
    notes: list[str] = field(default_factory=list)

    def count(self, action: str) -> int:
        return sum(p.action == action for p in self.planned)

    @property
    def failed(self) -> list[Planned]:
        return [p for p in self.planned if p.status == "failed"]


def _settings(text: str) -> dict[str, Any]:
    d = yaml.safe_load(text) or {}
    return {k: v for k, v in d.items() if k not in _IGNORED}


def trial_action(run_dir: Path, config_text: str) -> str:
    """``skip`` (finished, same config), ``resume`` (same config, not finished), ``train`` (no
    run yet) or ``retrain`` (a run with another config, or no config, is in the way)."""
    if not run_dir.exists() or not any(run_dir.iterdir()):
        return "train"
    cfg_file = run_dir / "config.yaml"
    if not cfg_file.exists():
        return "retrain"
    try:
        same = _settings(cfg_file.read_text(encoding="utf-8")) == _settings(config_text)
    except (OSError, yaml.YAMLError):
        same = False
    if not same:
        return "retrain"
    return "skip" if (run_dir / "eval" / "summary.json").exists() else "resume"


def plan(spec: SweepSpec, out_dir: str | Path, extra: list[str] | None = None) -> list[Planned]:
    """Resolve and validate every trial's config (before anything trains) and decide its action."""
    runs = Path(out_dir) / "runs"
    planned = []
    for t in expand(spec):
        ov = t.overrides + list(extra or []) + [f"seed={t.seed}", f"name={t.name}",
                                                 f"output_dir={runs}"]
        try:
            cfg = load_config(t.recipe, None, ov) if t.is_file else load_config(None, t.recipe, ov)
        except UserError as exc:
            raise UserError(f"sweep trial {t.name}: {exc}") from None
        text = dump_config(cfg)
        run_dir = runs / t.name
        planned.append(Planned(t, text, run_dir, trial_action(run_dir, text)))
    return planned


def run_trial(payload: dict[str, Any]) -> dict[str, Any]:
    """Train and evaluate one trial (in a worker process or a Ray task); never raises."""
    from ..commands.run import train_run

    t0 = time.perf_counter()
    out: dict[str, Any] = {"name": payload["name"], "host": socket.gethostname()}
    try:
        cfg = build_config(yaml.safe_load(payload["config"]))
        train_run(cfg, Path(payload["run_dir"]), resume=payload["action"] == "resume",
                  force=payload["action"] == "retrain", quiet=True)
        out["ok"] = True
    except UserError as exc:
        out.update(ok=False, error=str(exc))
    except Exception as exc:  # a bug or a crash: keep the other trials going, report it
        out.update(ok=False, error=f"{type(exc).__name__}: {exc}",
                   traceback=traceback.format_exc())
    out["seconds"] = time.perf_counter() - t0
    return out


def _save_state(spec: SweepSpec, out: Path, planned: list[Planned]) -> None:
    trials = []
    for p in planned:
        d = {k: v for k, v in asdict(p).items() if k not in ("trial", "config")}
        d.update(asdict(p.trial), run_dir=str(p.run_dir))
        trials.append(d)
    atomic_write_json(out / STATE, {"name": spec.name, "spec": spec.model_dump(mode="json"),
                                    "trials": trials})


def run_sweep(spec: SweepSpec, out_dir: str | Path | None = None, extra: list[str] | None = None,
              engine: str = "local", workers: int | None = None, address: str | None = None,
              compare: bool = True) -> SweepResult:
    """Run (or continue) the sweep and write its comparison table."""
    out = Path(out_dir if out_dir is not None else spec.output_dir or Path("sweeps") / spec.name)
    planned = plan(spec, out, extra)
    out.mkdir(parents=True, exist_ok=True)
    todo = [p for p in planned if p.action != "skip"]
    for p in planned:
        if p.action == "skip":
            p.status = "done"
    log.info("sweep %s: %d trials, %d finished (skipped), %d to resume, %d to train; engine %s",
             spec.name, len(planned), len(planned) - len(todo),
             sum(p.action == "resume" for p in todo), sum(p.action != "resume" for p in todo),
             engine)
    _save_state(spec, out, planned)
    payloads = [{"name": p.trial.name, "config": p.config, "run_dir": str(p.run_dir),
                 "action": p.action} for p in todo]
    for k, (i, res) in enumerate(run_jobs(run_trial, payloads, engine=engine, workers=workers,
                                          address=address), start=1):
        p = todo[i]
        p.status = "done" if res["ok"] else "failed"
        p.seconds, p.error, p.host = res["seconds"], res.get("error"), res.get("host")
        if res["ok"]:
            log.info("[%d/%d] %s done (%s, %.0f s)", k, len(todo), p.trial.name, p.action,
                     p.seconds)
        else:
            log.warning("[%d/%d] %s failed: %s", k, len(todo), p.trial.name, p.error)
            if res.get("traceback"):
                log.debug(res["traceback"])
        _save_state(spec, out, planned)
    result = SweepResult(out, planned)
    if compare:
        _compare(spec, result)
    return result


def _compare(spec: SweepSpec, result: SweepResult) -> None:
    """Write ``compare/`` over the finished runs (rows in the spec's order)."""
    from ..report.compare import compare_runs, write_outputs

    done = [p for p in result.planned if p.status == "done"]
    if not done:
        result.notes.append("no finished run: no comparison written")
        return
    base_row = spec.compare.baseline or spec.recipes[0].name
    base = next((p.run_dir for p in done if p.trial.row.startswith(base_row)
                 and p.trial.row[len(base_row):len(base_row) + 1] in ("", "_")), None)
    if base is None:
        result.notes.append(f"the baseline row {base_row!r} has no finished run; rho is "
                            f"measured against the first row")
    if len(done) < len(result.planned):
        result.notes.append(f"{len(result.planned) - len(done)} trial(s) failed; the table "
                            f"shows the {len(done)} finished runs")
    try:
        comp = compare_runs([p.run_dir for p in done], base, spec.compare.attack, "config")
    except UserError as exc:  # e.g. clean accuracy only: there is no robust table to write
        result.notes.append(f"no comparison table: {exc}")
        return
    result.comparison = comp
    result.compare = write_outputs(comp, result.out_dir / "compare")
    _paired(comp, result)


def _paired(comp: Any, result: SweepResult) -> None:
    """Add ``compare/paired.md`` (per-seed differences against the baseline with 95%
    t-intervals) when every row has at least two seeds in common with the baseline."""
    from ..report.paired import write_paired

    if len(comp.rows) < 2:
        return
    try:
        write_paired(comp, result.out_dir / "compare")
    except UserError as exc:  # e.g. a single seed: no interval to give
        result.notes.append(f"no paired intervals: {exc}")
        return
    result.compare["paired"] = result.out_dir / "compare" / "paired.md"
