"""``robustfair sweep SPEC.yaml``: a grid of runs, locally or on Ray, then the comparison."""

from __future__ import annotations

import shlex
from pathlib import Path

import click

from ..errors import Interrupted
from ._common import setup_logging


@click.command("sweep")
@click.argument("spec", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="An override applied to every trial, after the spec's (repeatable).")
@click.option("--engine", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="local: a pool of processes on this machine; ray: Ray tasks "
                   "(pip install 'robustfair[ray]').")
@click.option("--workers", "-j", type=click.IntRange(min=1), default=None,
              help="Concurrent local runs (default: one per GPU, else one per two CPU cores).")
@click.option("--address", default=None,
              help="Address of a running Ray cluster (with --engine ray; default: start Ray "
                   "here). Its nodes must see the output folder.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Sweep folder (default: the spec's output_dir, else sweeps/NAME).")
@click.option("--retries", type=click.IntRange(min=0), default=None,
              help="Times a trial whose worker process died (killed, out of memory) is run "
                   "again, from its last checkpoint (default 2).")
@click.option("--dry-run", is_flag=True, help="List the trials and what would happen to each.")
@click.option("--quiet", "-q", is_flag=True, help="Only the final table.")
def command(spec: Path, overrides: tuple[str, ...], engine: str, workers: int | None,
            address: str | None, out: Path | None, retries: int | None, dry_run: bool,
            quiet: bool) -> None:
    """Run every trial of SPEC (recipes × seeds × --set axes), skipping finished runs and
    resuming killed ones, then write the comparison table (mean ± std over seeds)."""
    from ..sweep import load_spec, plan, run_sweep
    from ..sweep.core import RETRIES

    setup_logging(quiet)
    sp = load_spec(spec)
    if dry_run:
        folder = out or Path(sp.output_dir or Path("sweeps") / str(sp.name))
        for p in plan(sp, folder, list(overrides)):
            click.echo(f"{p.action:<8} {p.trial.name:<40} {p.run_dir}")
        return
    try:
        res = run_sweep(sp, out, list(overrides), engine=engine, workers=workers, address=address,
                        retries=RETRIES if retries is None else retries)
    except KeyboardInterrupt:
        again = ["robustfair", "sweep", str(spec), *(["--out", str(out)] if out else []),
                 *(a for o in overrides for a in ("--set", o)),
                 *(["--engine", engine] if engine != "local" else []),
                 *(["--address", address] if address else []),
                 *(["--workers", str(workers)] if workers else []),
                 *(["--retries", str(retries)] if retries is not None else [])]
        raise Interrupted("interrupted; finished runs are kept and killed ones resume: continue "
                          f"with: {shlex.join(again)}") from None
    from ..report.compare import to_markdown

    if res.comparison is not None:
        click.echo(to_markdown(res.comparison))
    for note in res.notes:
        click.echo(f"note: {note}", err=True)
    for p in res.failed:
        click.echo(f"failed: {p.trial.name}: {p.error}", err=True)
    click.echo(f"sweep {sp.name}: {len(res.planned)} runs ({res.count('skip')} already finished)"
               f" in {res.out_dir}" + (f"; table: {res.compare['markdown']}" if res.compare
                                         else "")
               + (f"; paired intervals: {res.compare['paired']}" if "paired" in res.compare
                  else ""))
    if res.failed:
        raise SystemExit(1)
