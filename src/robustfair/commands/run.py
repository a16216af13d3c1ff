"""``robustfair train``, ``robustfair eval`` and ``robustfair demo``."""

from __future__ import annotations

import json
import shlex
import time
from pathlib import Path
from typing import Any

import click

from ..config import load_config
from ..errors import Interrupted, UserError
from ._common import class_table, echo_err, setup_logging


def _config_for(config: str | None, recipe: str | None, overrides: list[str]) -> Any:
    if config is not None and Path(config).is_dir():
        cfg_file = Path(config) / "config.yaml"
        if not cfg_file.exists():
            raise UserError(f"{config!r} is a folder without config.yaml; give a config file or "
                            f"a run directory")
        return load_config(cfg_file, None, overrides), Path(config)
    return load_config(config, recipe, overrides), None


def run_progress(run_dir: Path) -> dict[str, int] | None:
    """The last checkpoint's epoch, step in the epoch and global step (None without one)."""
    try:
        meta = json.loads((run_dir / "checkpoints" / "last.json").read_text(encoding="utf-8"))
        return {k: int(meta.get(k, 0) or 0) for k in ("epoch", "step_in_epoch", "global_step")}
    except (OSError, ValueError):
        return None


def _trained(run_dir: Path, cfg: Any) -> bool:
    pos = run_progress(run_dir)
    return pos is not None and pos["epoch"] >= cfg.train.epochs and pos["step_in_epoch"] == 0


def evaluates_final(run_dir: Path, checkpoint: str = "last") -> bool:
    """Whether ``eval/summary.json`` evaluates the run's final ``checkpoint`` (``eval.checkpoint``:
    the sha256 it records is that of ``checkpoints/CHECKPOINT.pt``); False for a summary of an
    earlier checkpoint, e.g. one that ``robustfair eval`` wrote while the run was unfinished."""
    from ..engine.io import sha256_file

    ckpt = run_dir / "checkpoints" / f"{checkpoint}.pt"
    try:
        summary = json.loads((run_dir / "eval" / "summary.json").read_text(encoding="utf-8"))
        recorded = summary.get("settings", {}).get("sha256")
        return recorded is not None and recorded == sha256_file(ckpt)
    except (OSError, ValueError, AttributeError):
        return False


def run_complete(run_dir: Path, cfg: Any, evaluate: bool = True) -> bool:
    """Whether the run is trained to ``cfg.train.epochs`` and (with ``evaluate``) its main
    evaluation is of the final checkpoint: then training it again would change nothing."""
    return _trained(run_dir, cfg) and (not evaluate or
                                       evaluates_final(run_dir, cfg.eval.checkpoint))


def train_run(cfg: Any, run_dir: Path | None = None, resume: bool = False, force: bool = False,
              quiet: bool = False, evaluate: bool = True) -> tuple[Path, dict[str, Any] | None]:
    """Train a run end to end (the library form of ``robustfair train``).

    The run directory is locked while this runs (one trainer per run). On ``resume``, settings
    that differ from the run's ``config.yaml`` are recorded in the run, or refused when the
    checkpoint cannot follow them (see :mod:`robustfair.engine.history`); a run that is trained
    and whose main evaluation is of its final checkpoint is left as it is (the summary is None;
    see :func:`run_complete`)."""
    from ..data import load_data
    from ..engine import distributed
    from ..engine.history import record_resume_changes
    from ..engine.integrity import check_resumable
    from ..engine.lock import run_lock
    from ..engine.trainer import Trainer, prepare_run_dir, settle_checkpoints

    target = run_dir if run_dir is not None else Path(cfg.output_dir) / cfg.name
    if resume and not (target / "config.yaml").exists():
        raise UserError(f"nothing to resume: {str(target)!r} has no run; drop --resume")
    is_main = distributed.world_from_env()[0] == 0
    if resume and is_main:  # a checkpoint refused leaves the run as it was, its lock included
        check_resumable(target)
    with run_lock(target, enabled=is_main):
        if resume and is_main:
            settle_checkpoints(target)
            record_resume_changes(cfg, target)
        if resume and run_complete(target, cfg, evaluate):
            return target, None
        data = load_data(cfg.data)
        trainer = Trainer(cfg, target, data=data, quiet=quiet)
        path = target
        if trainer.is_main:
            path = prepare_run_dir(cfg, force=force, resume=resume, run_dir=target)
        distributed.barrier()
        trainer.run_dir = path
        trainer.fit(resume=resume)
        summary = trainer.final_eval() if evaluate else None
    return path, summary


def _interrupted(path: Path) -> Interrupted:
    """The message of a Ctrl-C during training: what is saved and how to continue."""
    pos = run_progress(path)
    if not (path / "config.yaml").exists():
        return Interrupted("interrupted before training started; nothing was written — run the "
                           "same command again")
    saved = (f"saved up to epoch {pos['epoch']}" + (f" + {pos['step_in_epoch']} steps"
                                                    if pos["step_in_epoch"] else "")
             if pos is not None else "no checkpoint yet")
    return Interrupted(f"interrupted; the run is {saved}; resume with: robustfair train "
                       f"{shlex.quote(str(path))} --resume")


@click.command("train")
@click.argument("config", required=False)
@click.option("--recipe", "-r", help="Start from a shipped recipe (see 'robustfair recipes').")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a setting, e.g. --set train.epochs=5 (repeatable).")
@click.option("--resume", is_flag=True, help="Continue the run from its last checkpoint.")
@click.option("--force", is_flag=True, help="Delete an existing run directory of that name.")
@click.option("--no-eval", is_flag=True, help="Skip the final evaluation on the test split.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars or per-epoch lines.")
@click.option("--check", is_flag=True,
              help="Validate the config and the data, print the resolved config, train nothing.")
def train(config: str | None, recipe: str | None, overrides: tuple[str, ...], resume: bool,
          force: bool, no_eval: bool, quiet: bool, check: bool) -> None:
    """Train a model from CONFIG (a YAML file, or a run directory to --resume) or --recipe."""
    setup_logging(quiet)
    if config is None and recipe is None:
        raise UserError("give a CONFIG file or --recipe NAME (list them with 'robustfair recipes')")
    cfg, run_dir = _config_for(config, recipe, list(overrides))
    if run_dir is not None and not resume:
        raise UserError(f"{config!r} is a run directory; add --resume to continue it")
    target = run_dir if run_dir is not None else Path(cfg.output_dir) / cfg.name
    if check:
        from ..config import dump_config
        from ..data import load_data

        data = load_data(cfg.data)
        click.echo(dump_config(cfg).rstrip())
        click.echo(f"# ok: {cfg.data.name} with {len(data.train)} training, {len(data.val)} "
                   f"validation and {len(data.test)} test images")
        exists = (target / "config.yaml").exists()
        click.echo(f"# run directory: {target}" + (
            " (exists: continue it with --resume, or start over with --force)" if exists and
            not resume else " (exists)" if exists else " (new)"))
        return
    t0 = time.perf_counter()
    complete = resume and run_complete(target, cfg, evaluate=not no_eval)
    try:
        path, summary = train_run(cfg, run_dir, resume=resume, force=force, quiet=quiet,
                                  evaluate=not no_eval)
    except KeyboardInterrupt:
        raise _interrupted(target) from None
    from ..engine import distributed

    if distributed.world_from_env()[0] != 0:
        return  # the first process prints for all
    if complete:
        pos = run_progress(path) or {"epoch": cfg.train.epochs}
        click.echo(f"run {path} is already complete ({pos['epoch']} epochs"
                   + (", evaluated" if not no_eval else "") + "); nothing to do — evaluate "
                   f"again with 'robustfair eval {path}', or train longer with --resume --set "
                   f"train.epochs=N")
        return
    if summary is not None:
        click.echo(class_table(summary, title=f"{cfg.name}: test accuracy (%) per class"))
    click.echo(f"run directory: {path}  ({time.perf_counter() - t0:.0f} s)")


@click.command("demo")
@click.option("--output-dir", default="runs", show_default=True, type=click.Path(path_type=Path))
@click.option("--quiet", "-q", is_flag=True)
def demo(output_dir: Path, quiet: bool) -> None:
    """Train a standard and a TRADES SmallCNN on the embedded MNIST subset (CPU, minutes),
    evaluate both per class under PGD-20 and compare them."""
    setup_logging(quiet)
    t0 = time.perf_counter()
    results = {}
    for recipe in ("mnist5k-standard", "mnist5k-trades"):
        cfg = load_config(recipe=recipe, overrides=[
            f"name=demo-{recipe.split('-')[-1]}", f"output_dir={output_dir}",
            "eval.attacks=[clean, pgd20]"])
        if not quiet:
            echo_err(f"== training {recipe} ({cfg.method.objective['name']}, "
                     f"{cfg.train.epochs} epochs, eps {cfg.attack.eps:.3f})")
        path, summary = train_run(cfg, force=True, quiet=quiet)
        results[recipe] = (path, summary)
    for recipe, (path, summary) in results.items():
        click.echo(class_table(summary, title=f"\n{recipe}: test accuracy (%) per class"))
        click.echo(f"run directory: {path}")
    std = results["mnist5k-standard"][1]["attacks"]["pgd20"]
    tr = results["mnist5k-trades"][1]["attacks"]["pgd20"]
    click.echo(f"\nPGD-20 accuracy: standard {100 * std['avg']:.1f}% (worst class "
               f"{100 * std['worst']:.1f}%), TRADES {100 * tr['avg']:.1f}% (worst class "
               f"{100 * tr['worst']:.1f}%)  [{time.perf_counter() - t0:.0f} s]")


COMMANDS = [train, demo]
