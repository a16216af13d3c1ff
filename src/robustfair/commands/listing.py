"""``robustfair recipes | datasets | models | methods | attacks``: what exists, one line each."""

from __future__ import annotations

import click

from ..attacks import ATTACKS
from ..budgets import BUDGETS
from ..config import recipe_description, recipe_names
from ..data import DATASETS
from ..models import MODELS
from ..objectives import OBJECTIVES
from ..policies import POLICIES
from ..samplers import SAMPLERS
from ..weights import WEIGHTS


def _table(rows: dict[str, str]) -> None:
    w = max((len(k) for k in rows), default=0)
    for k, v in rows.items():
        click.echo(f"{k:<{w}}  {v}")


@click.command("recipes")
def recipes() -> None:
    """List the shipped recipes (use with 'robustfair train --recipe NAME')."""
    _table({n: recipe_description(n) for n in recipe_names()})


@click.command("datasets")
def datasets() -> None:
    """List the datasets."""
    _table(DATASETS.describe())


@click.command("models")
def models() -> None:
    """List the models."""
    _table(MODELS.describe())


@click.command("attacks")
def attacks() -> None:
    """List the attacks (write NAME or NAME+STEPS, e.g. pgd20, in --attack and eval.attacks)."""
    _table(ATTACKS.describe())


@click.command("methods")
def methods() -> None:
    """List the parts a training method is made of: objectives, budgets, weights, policies,
    samplers."""
    for title, reg in (("objective", OBJECTIVES), ("budget", BUDGETS), ("weights", WEIGHTS),
                       ("policy", POLICIES), ("sampler", SAMPLERS)):
        rows = reg.describe()
        w = max((len(k) for k in rows), default=0)
        for k, v in rows.items():
            click.echo(f"{title:<9}  {k:<{w}}  {v}")


COMMANDS = [recipes, datasets, models, attacks, methods]
