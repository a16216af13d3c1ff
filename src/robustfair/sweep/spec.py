"""A sweep specification: recipes × seeds × ``--set`` axes, expanded into trials.

The smallest spec has three keys::

    recipes: [mnist5k-standard, mnist5k-trades]
    seeds: [0, 1]
    set: [train.epochs=1, data.train_limit=300]

``set`` applies to every trial. ``grid`` maps a dotted key to a list of values and adds one axis
per key, combined as a product; ``zip`` maps keys to lists of one length that advance together
(one axis). A recipe entry may be a mapping ``{recipe, label, set}`` (a row of its own, with its
own overrides) or the path of a config file."""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..errors import UserError
from ..registry import format_validation_error


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RecipeEntry(_Strict):
    """One row of the sweep: a shipped recipe (or a config file) with its own overrides."""

    recipe: str
    label: str | None = None
    set: list[str] = Field(default_factory=list)

    @field_validator("label")
    @classmethod
    def _safe(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,63}", v):
            raise ValueError("use letters, digits, '.', '_', '+' or '-'")
        return v

    @property
    def name(self) -> str:
        return self.label or (Path(self.recipe).stem if self.is_file else self.recipe)

    @property
    def is_file(self) -> bool:
        return self.recipe.endswith((".yaml", ".yml"))


class CompareSpec(_Strict):
    attack: str | None = Field(None, description="robust attack of the table (default: strongest)")
    baseline: str | None = Field(None, description="label of the baseline row (default: first)")


class SweepSpec(_Strict):
    name: str | None = None
    recipes: list[RecipeEntry]
    seeds: list[int] = Field(default_factory=lambda: [0])
    set: list[str] = Field(default_factory=list)
    grid: dict[str, list[Any]] = Field(default_factory=dict)
    zip: dict[str, list[Any]] = Field(default_factory=dict)
    output_dir: str | None = None
    compare: CompareSpec = Field(default_factory=CompareSpec)
    description: str = ""

    @field_validator("recipes", mode="before")
    @classmethod
    def _entries(cls, v: Any) -> Any:
        if isinstance(v, str):
            v = [v]
        return [{"recipe": e} if isinstance(e, str) else e for e in v] if isinstance(v, list) else v

    @field_validator("set", mode="before")
    @classmethod
    def _one(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    @field_validator("recipes", "seeds")
    @classmethod
    def _nonempty(cls, v: list[Any]) -> list[Any]:
        if not v:
            raise ValueError("give at least one")
        if len({str(x) for x in v}) < len(v) and not isinstance(v[0], RecipeEntry):
            raise ValueError("values repeat")
        return v

    @model_validator(mode="after")
    def _axes(self) -> SweepSpec:
        for kind, axes in (("grid", self.grid), ("zip", self.zip)):
            for key, values in axes.items():
                if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", key):
                    raise ValueError(f"{kind}: {key!r} is not a dotted key like attack.eps")
                if not values:
                    raise ValueError(f"{kind}.{key}: give at least one value")
        both = [k for k in self.grid if k in self.zip]
        if both:
            raise ValueError(f"{both[0]!r} is in both grid and zip; give each key in one of them "
                             f"(grid: one axis per key; zip: keys that advance together)")
        if len({len(v) for v in self.zip.values()}) > 1:
            raise ValueError("zip: every key needs a list of the same length")
        names = [e.name for e in self.recipes]
        if len(set(names)) < len(names):
            raise ValueError("recipes: two rows have the same name; give them different labels")
        if self.compare.baseline is not None and self.compare.baseline not in names:
            raise ValueError(f"compare.baseline {self.compare.baseline!r} is none of the rows "
                             f"({', '.join(names)})")
        return self


@dataclass
class Trial:
    """One training run of the sweep."""

    name: str
    row: str
    recipe: str
    is_file: bool
    seed: int
    overrides: list[str] = field(default_factory=list)
    axes: dict[str, Any] = field(default_factory=dict)


def load_spec(path: str | Path) -> SweepSpec:
    """Read and validate a sweep spec (one clear line on a mistake)."""
    p = Path(path)
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"sweep spec {str(p)!r} not found; check the path") from None
    except UnicodeDecodeError:
        raise UserError(f"{p}: not UTF-8 text; save the spec as UTF-8") from None
    except OSError as exc:
        raise UserError(f"cannot read the sweep spec {str(p)!r} ({exc.strerror})") from None
    except yaml.YAMLError:
        raise UserError(f"{p}: not valid YAML; fix the syntax") from None
    if not isinstance(raw, dict):
        raise UserError(f"{p}: the top level must be a mapping with at least 'recipes'")
    odd = [k for k in raw if not isinstance(k, str)]
    if odd:
        raise UserError(f"{p}: top-level key {odd[0]!r} is not a name; the keys are "
                        f"{', '.join(SweepSpec.model_fields)}")
    try:
        spec = SweepSpec(**raw)
    except ValidationError as exc:
        raise UserError(f"{p}: " + format_validation_error(exc)) from None
    if spec.name is None:
        spec.name = p.stem
    for e in spec.recipes:  # config files are relative to the spec
        if e.is_file and not Path(e.recipe).is_absolute():
            e.recipe = str((p.parent / e.recipe).resolve())
    return spec


def yaml_value(v: Any) -> str:
    """``v`` as the right-hand side of a ``--set key=value`` override."""
    return yaml.safe_dump(v, default_flow_style=True).strip().removesuffix("...").strip()


def _value_tag(v: Any) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]+", "", yaml_value(v))[:24] or "x"


def _axis_points(spec: SweepSpec) -> list[dict[str, Any]]:
    """Every combination of the grid axes (product) and the zip axis (in step)."""
    axes: list[list[dict[str, Any]]] = [[{k: v} for v in vals] for k, vals in spec.grid.items()]
    if spec.zip:
        keys = list(spec.zip)
        axes.append([dict(zip(keys, vals, strict=True))
                     for vals in zip(*spec.zip.values(), strict=True)])
    return [{k: v for d in combo for k, v in d.items()} for combo in itertools.product(*axes)]


def expand(spec: SweepSpec) -> list[Trial]:
    """The trials: rows × axis points × seeds, each with its run name and overrides."""
    trials = []
    for entry in spec.recipes:
        for point in _axis_points(spec):
            tag = "".join(f"_{k.rsplit('.', 1)[-1]}{_value_tag(v)}" for k, v in point.items())
            for seed in spec.seeds:
                name = f"{entry.name}{tag}"[:120] + f"-s{seed}"
                ov = list(spec.set) + list(entry.set)
                ov += [f"{k}={yaml_value(v)}" for k, v in point.items()]
                trials.append(Trial(name, f"{entry.name}{tag}", entry.recipe, entry.is_file,
                                    seed, ov, point))
    names = [t.name for t in trials]
    if len(set(names)) < len(names):
        raise UserError("two trials of the sweep get the same run name; make the grid values "
                        "differ in their first 24 characters or label the rows")
    return trials
