"""Run a sweep: plan its trials, skip the finished ones, train the rest on a runner, compare.

Layout of a sweep's folder: ``runs/<trial>/`` (ordinary run directories), ``sweep.json`` (the
spec and every trial's state) and ``compare/`` (the table of :mod:`robustfair.report.compare`,
mean ± std over seeds, rewritten on every call). A trial whose run directory holds the same
config (compared with this version's defaults filled in on both sides), trained to its last epoch
and with an ``eval/summary.json`` of its final checkpoint is finished and skipped; one with the
same config that is not finished (a killed run, or one evaluated before its training ended)
continues with ``--resume``; one whose config changed is trained again from scratch."""

from __future__ import annotations

import contextlib
import logging
import socket
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..config import RunConfig, build_config, dump_config, load_config
from ..engine.history import stored_config
from ..engine.io import atomic_write_json
from ..errors import UserError
from .runner import run_jobs
from .spec import SweepSpec, Trial, expand

log = logging.getLogger("robustfair")

STATE = "sweep.json"
#: config keys that may differ without making a finished run stale
_IGNORED = ("output_dir", "logging", "device")
#: the files ``compare/`` gets from :func:`_compare` (removed before each new comparison)
_OUTPUTS = ("compare.*", "avg_vs_worst.png", "paired.*")
#: what reading a run's stored config.yaml raises when it is unreadable or no longer valid
_UNREADABLE = (OSError, UnicodeDecodeError, yaml.YAMLError, UserError, TypeError)


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
    #: runs of the trial (more than one when its worker died and it was run again)
    attempts: int = 0
    #: the checkpoint (epoch, step in the epoch, global step) its last run continued from
    resumed_from: dict[str, int] | None = None


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


def _settings(cfg: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in cfg.items() if k not in _IGNORED}


def _as_config(config: str | RunConfig) -> RunConfig:
    return config if isinstance(config, RunConfig) else build_config(yaml.safe_load(config))


def trial_action(run_dir: Path, config: str | RunConfig) -> str:
    """``skip`` (finished, same config), ``resume`` (same config, not finished), ``train`` (no
    run yet) or ``retrain`` (a run with another config, or no config, is in the way).

    Configs are compared with this version's defaults filled in on both sides (a setting added
    since the run was made is no change), without ``output_dir``, ``logging`` and ``device``. A
    run is finished when it is trained to its last epoch and ``eval/summary.json`` evaluates its
    final checkpoint (see :func:`robustfair.commands.run.run_complete`)."""
    from ..commands.run import run_complete

    if not run_dir.exists() or not any(run_dir.iterdir()):
        return "train"
    if not (run_dir / "config.yaml").exists():
        return "retrain"
    cfg = _as_config(config)
    try:
        same = _settings(stored_config(run_dir)) == _settings(cfg.model_dump(mode="json"))
    except _UNREADABLE:
        same = False  # unreadable, or no longer a valid config
    if not same:
        return "retrain"
    return "skip" if run_complete(run_dir, cfg) else "resume"


def _stored_place(cfg: RunConfig, run_dir: Path) -> RunConfig:
    """``cfg`` with the ``output_dir`` of the run's ``config.yaml``: a resumed run keeps it (it
    says where the run was made and cannot change on resume), whatever path names the sweep
    folder now (relative or absolute, or the folder moved)."""
    try:
        stored = stored_config(run_dir)["output_dir"]
    except (*_UNREADABLE, KeyError):
        return cfg
    return cfg.model_copy(update={"output_dir": stored})


def plan(spec: SweepSpec, out_dir: str | Path, extra: list[str] | None = None) -> list[Planned]:
    """Resolve and validate every trial's config (before anything trains) and decide its action.
    A trial to resume keeps the ``output_dir`` its run was made with."""
    runs = Path(out_dir) / "runs"
    planned = []
    for t in expand(spec):
        ov = t.overrides + list(extra or []) + [f"seed={t.seed}", f"name={t.name}",
                                                 f"output_dir={runs}"]
        try:
            cfg = load_config(t.recipe, None, ov) if t.is_file else load_config(None, t.recipe, ov)
        except UserError as exc:
            raise UserError(f"sweep trial {t.name}: {exc}") from None
        run_dir = runs / t.name
        action = trial_action(run_dir, cfg)
        if action == "resume":
            cfg = _stored_place(cfg, run_dir)
        planned.append(Planned(t, dump_config(cfg), run_dir, action))
    return planned


def run_trial(payload: dict[str, Any]) -> dict[str, Any]:
    """Train and evaluate one trial (in a worker process or a Ray task); never raises."""
    from ..commands.run import run_progress, train_run

    t0 = time.perf_counter()
    out: dict[str, Any] = {"name": payload["name"], "host": socket.gethostname()}
    try:
        cfg = build_config(yaml.safe_load(payload["config"]))
        run_dir = Path(payload["run_dir"])
        # decided again here: an attempt killed before (a worker that died, run again by the
        # runner) leaves a run of this very config, which continues from its last checkpoint
        action = payload["action"]
        if action != "resume":
            action = trial_action(run_dir, cfg)
        if action in ("resume", "skip"):
            out["resumed_from"] = run_progress(run_dir)
        out["action"] = action
        train_run(cfg, run_dir, resume=action in ("resume", "skip"), force=action == "retrain",
                  quiet=True)
        out["ok"] = True
    except UserError as exc:
        out.update(ok=False, error=str(exc))
    except Exception as exc:  # a bug or a crash: keep the other trials going, report it
        out.update(ok=False, error=f"{type(exc).__name__}: {exc}",
                   traceback=traceback.format_exc())
    out["seconds"] = time.perf_counter() - t0
    return out


def _crashed(payload: dict[str, Any], why: str) -> dict[str, Any]:
    """The result of a trial whose worker died (killed, out of memory) more often than the
    sweep runs it again: failed, not fatal."""
    return {"name": payload["name"], "ok": False, "seconds": None,
            "error": f"{why}; run the sweep again to resume it"}


def _save_state(spec: SweepSpec, out: Path, planned: list[Planned]) -> None:
    trials = []
    for p in planned:
        d = {k: v for k, v in asdict(p).items() if k not in ("trial", "config")}
        d.update(asdict(p.trial), run_dir=str(p.run_dir))
        trials.append(d)
    atomic_write_json(out / STATE, {"name": spec.name, "spec": spec.model_dump(mode="json"),
                                    "trials": trials})


#: how many times a trial whose worker process died is run again, by default
RETRIES = 2


def run_sweep(spec: SweepSpec, out_dir: str | Path | None = None, extra: list[str] | None = None,
              engine: str = "local", workers: int | None = None, address: str | None = None,
              compare: bool = True, retries: int = RETRIES) -> SweepResult:
    """Run (or continue) the sweep and write its comparison table.

    A trial whose worker process dies (or, with Ray, whose worker or node fails) is run again,
    continuing from its last checkpoint, at most ``retries`` times; after that it is recorded as
    failed and the others go on. With Ray the run directories (and the ``output_dir`` of new runs)
    are absolute paths: the workers may run in another folder or on other machines."""
    out = Path(out_dir if out_dir is not None else spec.output_dir or Path("sweeps") / spec.name)
    if engine == "ray":
        out = out.resolve()
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
    attempts = [1] * len(todo)

    def again(i: int, why: str) -> None:
        attempts[i] += 1
        log.warning("%s: %s; running it again, from its last checkpoint", todo[i].trial.name,
                    why)

    jobs = run_jobs(run_trial, payloads, engine=engine, workers=workers, address=address,
                    on_crash=_crashed, retries=retries, on_retry=again)
    with contextlib.closing(jobs):  # an interruption stops the workers before it goes on
        for k, (i, res) in enumerate(jobs, start=1):
            _finished(todo[i], {**res, "attempts": attempts[i]}, k, len(todo))
            _save_state(spec, out, planned)
    result = SweepResult(out, planned)
    if compare:
        _compare(spec, result)
    return result


def _finished(p: Planned, res: dict[str, Any], k: int, total: int) -> None:
    """Record a trial's result (and log it)."""
    p.status = "done" if res["ok"] else "failed"
    p.seconds, p.error, p.host = res["seconds"], res.get("error"), res.get("host")
    p.attempts = int(res.get("attempts", 1))
    p.resumed_from = res.get("resumed_from")
    if res["ok"]:
        log.info("[%d/%d] %s done (%s, %.0f s)", k, total, p.trial.name,
                 res.get("action", p.action), p.seconds)
    else:
        log.warning("[%d/%d] %s failed: %s", k, total, p.trial.name, p.error)
        if res.get("traceback"):
            log.debug(res["traceback"])


def _compare(spec: SweepSpec, result: SweepResult) -> None:
    """Write ``compare/`` over the finished runs (rows in the spec's order), after removing
    the tables of an earlier call. Runs at different ε or numbers of epochs (a sweep over them)
    are compared anyway: they are never pooled into one row, and each row shows its ε and epochs.
    """
    from ..report.compare import compare_runs, write_outputs

    folder = result.out_dir / "compare"
    for pattern in _OUTPUTS:  # a table of an earlier call must not pass for this one's
        for stale in folder.glob(pattern):
            stale.unlink()
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
        comp = compare_runs([p.run_dir for p in done], base, spec.compare.attack, "config",
                            allow_mixed=True)
    except UserError as exc:  # e.g. clean accuracy only: there is no robust table to write
        result.notes.append(f"no comparison table: {exc}")
        return
    result.comparison = comp
    result.compare = write_outputs(comp, folder)
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
