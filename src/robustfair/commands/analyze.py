"""``robustfair analyze RUN``: look inside a trained run.

Without options: the class-similarity matrix under attack (DAFA's class distance), the most
confused class pairs, and how similarity relates to per-class robust accuracy.
With ``--cam``: a grid of images with their class activation map and the PART ε map."""

from __future__ import annotations

from pathlib import Path

import click

from ._common import setup_logging


@click.command("analyze")
@click.argument("run_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--cam", is_flag=True, help="Save a grid of images with their CAM and ε map.")
@click.option("--attack", default="pgd20", show_default=True,
              help="Attack used for the class-similarity matrix.")
@click.option("--n", "n", type=click.IntRange(min=1), default=None,
              help="Use at most N test images.")
@click.option("--quiet", "-q", is_flag=True, help="Print only the paths of the saved files.")
def command(run_dir: Path, cam: bool, attack: str, n: int | None, quiet: bool) -> None:
    """Class-distance analysis of a run (or, with --cam, its class activation maps)."""
    setup_logging(quiet)
    if cam:
        from ..cam.visualize import analyze_cam

        analyze_cam(run_dir, n=n, quiet=quiet)
    else:
        from ..analysis.class_distance import analyze_class_distance, summary_text

        result = analyze_class_distance(run_dir, attack=attack, n=n, quiet=True)
        if not quiet:
            click.echo(summary_text(result))
        out = run_dir / "analysis"
        click.echo(f"saved: {out / 'class_distance.json'}, {out / 'class_distance.png'}")
