"""``robustfair compare RUN_DIR...``: the DAFA-style table of several runs."""

from __future__ import annotations

from pathlib import Path

import click

from ._common import setup_logging


@click.command("compare")
@click.argument("run_dirs", nargs=-1, required=True,
                type=click.Path(file_okay=False, path_type=Path))
@click.option("--baseline", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Run that ρ is measured against (default: the first run given).")
@click.option("--attack", default=None,
              help="Robust attack of the table (default: the strongest present in every run: "
                   "autoattack, then worst_case, then pgd, then cw).")
@click.option("--group-by", type=click.Choice(["config", "name"]), default="config",
              show_default=True,
              help="Pool seeds of one setting: runs whose config differs only in the seed, or "
                   "whose names differ only in a -sN / _seedN suffix.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("compare"),
              show_default=True, help="Folder for compare.md, compare.csv (accuracies as "
                                      "fractions), compare.html and avg_vs_worst.png.")
@click.option("--allow-mixed", is_flag=True,
              help="Compare runs measured at different ε, norm or attack settings, or trained "
                   "for different numbers of epochs (refused by default).")
@click.option("--quiet", "-q", is_flag=True, help="Do not print the table.")
@click.option("--paired", is_flag=True,
              help="Also print and save (paired.md, paired.json) the per-seed differences "
                   "against the baseline with 95% t-intervals (runs paired by seed).")
def command(run_dirs: tuple[Path, ...], baseline: Path | None, attack: str | None,
            group_by: str, out: Path, allow_mixed: bool, quiet: bool,
            paired: bool = False) -> None:
    """Compare runs: clean and robust average / worst-class accuracy and ρ against a baseline
    (DAFA's table), mean ± std over seeds, and a figure of average against worst class. The
    runs must be measured at the same ε, norm and attack settings and trained for the same
    number of epochs (see --allow-mixed)."""
    from ..report.compare import compare_runs, to_markdown, write_outputs

    setup_logging(quiet)
    comp = compare_runs(list(run_dirs), baseline, attack, group_by, allow_mixed=allow_mixed)
    paired_md = None
    if paired:
        from ..report.paired import write_paired

        paired_md = write_paired(comp, out)  # before the table: a pairing error writes nothing
    paths = write_outputs(comp, out)
    if not quiet:
        click.echo(to_markdown(comp))
        if paired_md is not None:
            click.echo(paired_md)
    click.echo(f"saved: {paths['markdown']}, {paths['csv']}, {paths['html']}, "
               f"{paths['figure']}")
