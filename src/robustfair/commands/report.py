"""``robustfair report RUN_DIR``: one self-contained HTML page about a run."""

from __future__ import annotations

from pathlib import Path

import click

from ..errors import UserError
from ._common import setup_logging


def _factors(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise UserError(f"--eps-factors {text!r}: expected numbers separated by commas, "
                        f"e.g. 0,0.5,1,2") from None
    if not values or any(v < 0 for v in values):
        raise UserError(f"--eps-factors {text!r}: give one or more factors >= 0, e.g. 0,0.5,1,2")
    return values


@click.command("report")
@click.argument("run_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Where to write the page (default: RUN_DIR/report.html).")
@click.option("--attack", default=None,
              help="Attack of the confusion and similarity matrices (default: the strongest).")
@click.option("--no-eps-curve", is_flag=True,
              help="Do not attack the model to draw accuracy against ε (a saved curve is "
                   "still shown).")
@click.option("--eps-factors", default="0,0.25,0.5,1,1.5,2", show_default=True,
              help="Radii of the ε curve, as multiples of the run's ε.")
@click.option("--eps-attack", default="pgd10", show_default=True, help="Attack of the ε curve.")
@click.option("--eps-n", type=click.IntRange(min=1), default=200, show_default=True,
              help="Test images (stratified by class) used for the ε curve.")
@click.option("--recompute-eps-curve", is_flag=True,
              help="Compute the ε curve even if eval/eps_curve.json is current.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar; print only the path.")
def command(run_dir: Path, out: Path | None, attack: str | None, no_eps_curve: bool,
            eps_factors: str, eps_attack: str, eps_n: int, recompute_eps_curve: bool,
            quiet: bool) -> None:
    """Write RUN_DIR/report.html: settings, training curves, per-class accuracy under each
    attack, confusion and class-similarity matrices, accuracy against ε, groups, the method's
    state and the sanity checks. The page needs no network to open."""
    from ..attacks import parse_attack_spec
    from ..report.run_report import ReportOptions, build_report, report_steps

    setup_logging(quiet)
    parse_attack_spec(eps_attack)
    opts = ReportOptions(attack=attack, eps_curve=not no_eps_curve,
                         eps_factors=_factors(eps_factors), eps_attack=eps_attack, eps_n=eps_n,
                         recompute_eps_curve=recompute_eps_curve, out=out)
    bar = None
    if not quiet:
        from tqdm.auto import tqdm

        bar = tqdm(total=report_steps(run_dir, opts), desc="report", unit="step", leave=False)
    try:
        path = build_report(run_dir, opts, progress=bar.update if bar is not None else None)
    finally:
        if bar is not None:
            bar.close()
    click.echo(f"report: {path}")
