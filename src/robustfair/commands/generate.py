"""``robustfair generate``: write folders of generated images per (label, group) cell."""

from __future__ import annotations

import contextlib
from pathlib import Path

import click
from pydantic import ValidationError

from ..config import DataConfig, apply_override
from ..engine.io import make_dir
from ..errors import UserError
from ..registry import format_validation_error
from ._common import setup_logging


@click.command("generate")
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--dataset", "-d", default="mnist5k-groups", show_default=True,
              help="A dataset with groups whose real training split the generator is fitted on.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="A data setting, e.g. --set params.group=thick (repeatable).")
@click.option("--per-cell", default=500, show_default=True, type=click.IntRange(1),
              help="Images per (label, group) cell.")
@click.option("--quality", default=1.0, show_default=True, type=click.FloatRange(0.0, 1.0),
              help="1: the generator's best; lower blends in other labels and adds noise.")
@click.option("--components", default=32, show_default=True, type=click.IntRange(1),
              help="PCA components of the image space.")
@click.option("--modes", default=5, show_default=True, type=click.IntRange(1),
              help="Gaussian components per cell.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0))
@click.option("--force", is_flag=True, help="Replace a non-empty OUT_DIR.")
@click.option("--quiet", "-q", is_flag=True)
def generate(out_dir: Path, dataset: str, overrides: tuple[str, ...], per_cell: int,
             quality: float, components: int, modes: int, seed: int, force: bool,
             quiet: bool) -> None:
    """Fit a (label, group)-conditional Gaussian-mixture generator on a dataset's real training
    images and write OUT_DIR/LABEL_GROUP/NNNNN.png (use with --set data.params.generated=OUT_DIR).
    """
    setup_logging(quiet)
    from ..data import load_data
    from ..generate import generate_folders

    raw: dict = {"name": dataset}
    for ov in overrides:
        apply_override(raw, ov)
    raw.setdefault("params", {})
    if isinstance(raw["params"], dict):
        raw["params"].pop("generated", None)
    try:
        cfg = DataConfig(**raw)
    except ValidationError as exc:
        raise UserError(format_validation_error(exc, "data")) from None
    existed = out_dir.exists()
    make_dir(out_dir)  # a folder that cannot be written fails now, before the data is loaded
    try:
        data = load_data(cfg)
        info = generate_folders(out_dir, data, per_cell, quality, components, modes, seed, force)
    except BaseException:
        if not existed:
            with contextlib.suppress(OSError):
                out_dir.rmdir()  # only if still empty: nothing half-made is left
        raise
    total = sum(info["counts"].values())
    click.echo(f"wrote {total} images in {len(info['counts'])} folders under {out_dir} "
               f"(quality {quality}, {info['components']} components)")
    for name, n in info["counts"].items():
        click.echo(f"  {name}: {n}")
    click.echo(f"use them with: --set data.params.generated={out_dir}")


command = generate
