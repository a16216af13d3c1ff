"""``robustfair eval``: evaluate a run (or a model file) per class."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from ..config import apply_override, build_config
from ..errors import UserError
from ._common import class_table, setup_logging


@click.command("eval")
@click.argument("run_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--attack", "-a", "attacks", help="Comma-separated attacks, e.g. pgd20,cw20.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override an evaluation setting, e.g. --set eval.eps=8/255.")
@click.option("--use", "which", type=click.Choice(["last", "best"]), default=None,
              help="Which checkpoint to evaluate (default: eval.checkpoint, 'last').")
@click.option("--quiet", "-q", is_flag=True)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def eval_cmd(run_dir: Path, attacks: str | None, overrides: tuple[str, ...], which: str | None,
             quiet: bool, as_json: bool) -> None:
    """Evaluate a trained run per class (clean, PGD, CW, ...) and save eval/summary.json."""
    setup_logging(quiet)
    summary = evaluate_run(run_dir, attacks, list(overrides), which, quiet)
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    else:
        click.echo(class_table(summary, title=f"{run_dir}: accuracy (%) per class"))
        click.echo(f"saved: {run_dir / 'eval' / 'summary.json'}")


def evaluate_run(run_dir: Path, attacks: str | None = None, overrides: list[str] | None = None,
                 which: str | None = None, quiet: bool = False) -> dict[str, Any]:
    import yaml

    from ..data import load_data
    from ..engine.io import load_checkpoint
    from ..engine.trainer import Trainer, run_eval

    cfg_file = run_dir / "config.yaml"
    if not cfg_file.exists():
        raise UserError(f"{str(run_dir)!r} is not a run directory (no config.yaml); give the "
                        f"folder that 'robustfair train' created")
    raw = yaml.safe_load(cfg_file.read_text())
    for ov in overrides or []:
        apply_override(raw, ov)
    if attacks:
        raw.setdefault("eval", {})["attacks"] = attacks
    cfg = build_config(raw)
    which = which or cfg.eval.checkpoint
    ckpt = run_dir / "checkpoints" / f"{which}.pt"
    if not ckpt.exists():
        raise UserError(f"{str(ckpt)!r} not found; train the run first (or use --use last)")
    data = load_data(cfg.data)
    trainer = Trainer(cfg, run_dir, data=data, quiet=True)
    from ..engine.integrity import verify_checkpoint

    verify_checkpoint(ckpt)
    trainer.load_state_dict(load_checkpoint(ckpt, map_location=trainer.device))
    model = trainer.eval_model()
    if trainer.ema is not None and cfg.train.ema.evaluate:
        model = trainer.ema.copy_into(trainer.model)
    averaged = trainer.policy_eval_model()
    if averaged is not None:
        model = averaged
    return run_eval(model, data, cfg, run_dir / "eval", None, trainer.device, quiet=quiet)


command = eval_cmd
