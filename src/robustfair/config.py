"""Typed run configuration: YAML file or recipe, ``--set key=value`` overrides, validation with
errors that name the field, and the fully resolved config saved into the run directory."""

from __future__ import annotations

import copy
import logging
import re
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import UserError
from .registry import format_validation_error
from .units import parse_eps


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ImbalanceConfig(Strict):
    kind: Literal["none", "step", "exp"] = "none"
    ratio: float = Field(1.0, ge=1.0, description="majority/minority size ratio R")


class DataConfig(Strict):
    name: str = "mnist5k"
    root: str | None = None
    download: bool = False
    val_size: float = Field(0.1, ge=0.0, description="fraction (<1) or count (>=1) held out")
    imbalance: ImbalanceConfig = Field(default_factory=ImbalanceConfig)
    augment: Literal["auto", "none", "crop_flip", "crop"] = "auto"
    train_limit: int | None = Field(None, ge=1, description="use at most this many training images")
    test_limit: int | None = Field(None, ge=1, description="use at most this many test images")
    on_device: bool = True
    params: dict[str, Any] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        from .data import DATASETS

        DATASETS.get(v)
        return v


class ModelConfig(Strict):
    name: str = "smallcnn"
    params: dict[str, Any] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        from .models import MODELS

        MODELS.get(v)
        return v


class AttackConfig(Strict):
    """The training attack (the inner maximisation)."""

    norm: Literal["linf", "l2"] = "linf"
    eps: float = Field(8 / 255, ge=0.0)
    step_size: float = Field(2 / 255, gt=0.0)
    steps: int = Field(10, ge=0, le=10_000)

    _eps = field_validator("eps", "step_size", mode="before")(lambda cls, v: parse_eps(v))


class MethodConfig(Strict):
    objective: dict[str, Any] = Field(default_factory=lambda: {"name": "pgd_at"})
    budget: dict[str, Any] = Field(default_factory=lambda: {"name": "uniform"})
    weights: dict[str, Any] = Field(default_factory=lambda: {"name": "uniform"})
    policy: dict[str, Any] = Field(default_factory=lambda: {"name": "none"})
    sampler: dict[str, Any] = Field(default_factory=lambda: {"name": "uniform"})

    @field_validator("objective", "budget", "weights", "policy", "sampler", mode="before")
    @classmethod
    def _name_only(cls, v: Any) -> Any:
        return {"name": v} if isinstance(v, str) else v

    @model_validator(mode="after")
    def _check_parts(self) -> MethodConfig:
        from .budgets import BUDGETS
        from .objectives import OBJECTIVES
        from .policies import POLICIES
        from .samplers import SAMPLERS
        from .weights import WEIGHTS

        for part, reg in (
            ("objective", OBJECTIVES),
            ("budget", BUDGETS),
            ("weights", WEIGHTS),
            ("policy", POLICIES),
            ("sampler", SAMPLERS),
        ):
            object.__setattr__(self, part, reg.validate(getattr(self, part), f"method.{part}"))
        return self


class OptimizerConfig(Strict):
    name: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: float = Field(0.1, gt=0.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    nesterov: bool = False
    weight_decay: float = Field(5e-4, ge=0.0)


class ScheduleConfig(Strict):
    """Learning-rate schedule, stepped once per epoch (epochs numbered from 1).

    - ``constant``; ``multistep``: lr·gamma^k after each milestone epoch;
    - ``cosine``: cosine annealing to 0 over the run;
    - ``piecewise``: the DAFA code's "bag of tricks" (lr, then ×0.1 at 100/110·E, ×0.01 at 105/110·E);
    - ``lbgat``: lr·``first_epoch_factor`` in epoch 1, then multistep.
    """

    name: Literal["constant", "multistep", "cosine", "piecewise", "lbgat"] = "multistep"
    milestones: list[int] = Field(default_factory=list)
    gamma: float = Field(0.1, gt=0.0, le=1.0)
    first_epoch_factor: float = Field(0.2, gt=0.0)


class EMAConfig(Strict):
    enabled: bool = False
    decay: float = Field(0.999, gt=0.0, lt=1.0)
    evaluate: bool = Field(False, description="evaluate with the averaged weights")


class AWPConfig(Strict):
    enabled: bool = False
    gamma: float = Field(5e-3, ge=0.0)
    warmup: int = Field(0, ge=0, description="epochs before AWP starts")


class TrainConfig(Strict):
    epochs: int = Field(10, ge=0, le=100_000)
    batch_size: int = Field(128, ge=1)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    precision: Literal["fp32", "bf16"] = "fp32"
    channels_last: bool = False
    compile: bool = Field(False, description="torch.compile the model (CPU or GPU)")
    sync_bn: bool = Field(False, description="under DDP, BatchNorm statistics over all processes")
    ema: EMAConfig = Field(default_factory=EMAConfig)
    awp: AWPConfig = Field(default_factory=AWPConfig)
    checkpoint_every_steps: int = Field(0, ge=0, description="0: only at epoch ends")
    grad_clip: float | None = Field(None, gt=0.0)


class ValidationConfig(Strict):
    every: int = Field(1, ge=0, description="validate every N epochs (0: never)")
    attack: str = "pgd10"
    n: int | None = Field(1000, ge=1, description="validation images used (None: all)")


class EvalConfig(Strict):
    attacks: list[str] = Field(default_factory=lambda: ["clean", "pgd20", "cw20"])
    eps: float | None = Field(None, ge=0.0, description="None: the training attack's eps")
    norm: Literal["linf", "l2"] | None = None
    step_size: float | None = Field(None, gt=0.0, description="None: the attack's own default")
    batch_size: int = Field(500, ge=1)
    n: int | None = Field(None, ge=1, description="test images used (None: all)")
    split: Literal["test", "val"] = "test"
    checkpoint: Literal["last", "best"] = "last"
    layout: Literal["auto", "channels_last", "unchanged"] = Field(
        "auto", description="memory order of a convolutional model's weights while it is "
                            "attacked: auto = channels-last on the CPU (faster there, same "
                            "logits), unchanged elsewhere")
    fold_batchnorm: bool = Field(
        True, description="attacks pass a copy of the model with each BatchNorm that follows a "
                          "convolution folded into it (the same function, faster passes; "
                          "checked on 4 images, verdicts on the model itself)")
    precision: Literal["fp32", "bf16", "auto"] = Field(
        "fp32", description="precision of the attacks' own passes: bf16 (autocast) runs each "
                            "row's first batch in fp32 and bf16 and keeps bf16 only if it broke "
                            "every point fp32 broke; verdicts are always fp32; auto = bf16 on "
                            "CUDA with bf16 support, fp32 elsewhere")

    _eps = field_validator("eps", "step_size", mode="before")(
        lambda cls, v: None if v is None else parse_eps(v)
    )

    @field_validator("attacks", mode="before")
    @classmethod
    def _split(cls, v: Any) -> Any:
        return [a.strip() for a in v.split(",") if a.strip()] if isinstance(v, str) else v

    @field_validator("attacks")
    @classmethod
    def _known(cls, v: list[str]) -> list[str]:
        from .attacks import parse_attack_spec

        for spec in v:
            parse_attack_spec(spec)
        return v


class LoggingConfig(Strict):
    tensorboard: bool = False
    progress: bool = True


class RunConfig(Strict):
    name: str = "run"
    seed: int = Field(0, ge=0)
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N")
    deterministic: bool = False
    output_dir: str = "runs"
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    method: MethodConfig = Field(default_factory=MethodConfig)
    attack: AttackConfig = Field(default_factory=AttackConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    validation: ValidationConfig = Field(default_factory=ValidationConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    description: str = ""

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}", v):
            raise ValueError("use letters, digits, '.', '_', '+' or '-' (at most 128)")
        return v

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", v):
            raise ValueError("use auto, cpu, cuda or cuda:N")
        return v


# --------------------------------------------------------------------------------------------
# loading, overrides, recipes


def _recipe_dir() -> Path:
    return Path(str(resources.files("robustfair") / "recipes"))


def recipe_names() -> list[str]:
    return sorted(p.stem for p in _recipe_dir().glob("*.yaml"))


def recipe_description(name: str) -> str:
    raw = _read_yaml(_recipe_dir() / f"{name}.yaml")
    return str(raw.get("description", "")).strip().splitlines()[0] if raw.get("description") else ""


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"config file {str(path)!r} not found; check the path") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read config file {str(path)!r}: {exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise UserError(f"{path}: not valid YAML{where}; fix the syntax") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: the top level must be a mapping of settings")
    return data


def load_recipe_dict(name: str) -> dict[str, Any]:
    path = _recipe_dir() / f"{name}.yaml"
    if not path.exists():
        import difflib

        close = difflib.get_close_matches(name, recipe_names(), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise UserError(f"unknown recipe {name!r}{hint}; list them with 'robustfair recipes'")
    return resolve_includes(_read_yaml(path))


def resolve_includes(raw: dict[str, Any]) -> dict[str, Any]:
    """A recipe may start from another with ``base: NAME``."""
    base = raw.pop("base", None)
    if base is None:
        return raw
    if not isinstance(base, str):
        raise UserError("base: expected the name of a recipe")
    return deep_merge(load_recipe_dict(base), raw)


def deep_merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Merge ``b`` into ``a``; a part given with another ``name`` replaces the part whole."""
    out = copy.deepcopy(a)
    for k, v in b.items():
        old = out.get(k)
        same_part = isinstance(old, dict) and v.get("name", old.get("name")) == old.get("name") \
            if isinstance(v, dict) else False
        out[k] = deep_merge(old, v) if same_part else copy.deepcopy(v)  # type: ignore[arg-type]
    return out


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """Apply ``a.b.c=value``; the value is parsed as YAML (numbers, lists, booleans)."""
    if "=" not in assignment:
        raise UserError(f"--set {assignment!r}: expected key=value, e.g. --set train.epochs=5")
    key, _, raw = assignment.partition("=")
    key = key.strip()
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", key):
        raise UserError(f"--set {assignment!r}: {key!r} is not a dotted key like train.epochs")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    parts = key.split(".")
    node = data
    for p in parts[:-1]:
        nxt = node.get(p)
        if nxt is None:
            nxt = node[p] = {}
        elif isinstance(nxt, str) and p in {"objective", "budget", "weights", "policy", "sampler"}:
            nxt = node[p] = {"name": nxt}
        elif not isinstance(nxt, dict):
            raise UserError(f"--set {key}: {p!r} is not a section")
        node = nxt
    leaf = parts[-1]
    # setting a part's name replaces the part (its old parameters may not apply)
    if leaf == "name" and len(parts) >= 2 and parts[-2] in {
        "objective", "budget", "weights", "policy", "sampler"
    } and node.get("name") != value:
        node.clear()
    node[leaf] = value


def build_config(raw: dict[str, Any]) -> RunConfig:
    try:
        return RunConfig(**raw)
    except ValidationError as exc:
        raise UserError(format_validation_error(exc)) from None
    except UserError:
        raise
    except (TypeError, ValueError) as exc:
        raise UserError(f"config: {exc}") from None


def load_config(
    path: str | Path | None = None, recipe: str | None = None, overrides: list[str] | None = None
) -> RunConfig:
    if path is not None and recipe is not None:
        raise UserError("give either a CONFIG file or --recipe, not both")
    raw: dict[str, Any] = {}
    if recipe is not None:
        raw = load_recipe_dict(recipe)
        raw.setdefault("name", recipe)
    elif path is not None:
        raw = resolve_includes(_read_yaml(Path(path)))
        raw.setdefault("name", Path(path).stem)
    for ov in overrides or []:
        apply_override(raw, ov)
    cfg = build_config(raw)
    _warn_step_above_eps(cfg, overrides or [])
    return cfg


def _warn_step_above_eps(cfg: RunConfig, overrides: list[str]) -> None:
    """One line when the training attack's step is larger than its ε (e.g. after
    ``--set attack.eps=8/255`` on a recipe made for ε = 0.2): the step is kept as configured."""
    a = cfg.attack
    if not (a.eps > 0 and a.steps > 1 and a.step_size > a.eps):
        return
    eps_set = [ov.strip() for ov in overrides if ov.split("=", 1)[0].strip() == "attack.eps"]
    cause = f" (ε set by --set {eps_set[-1]})" if eps_set else ""
    logging.getLogger("robustfair").warning(
        "warning: attack.step_size %.4g is larger than attack.eps %.4g%s: each of the %d attack "
        "steps moves %.4g and is projected back onto the ε-ball; to change it add --set "
        "attack.step_size=... (ε/4 = %.4g is usual)", a.step_size, a.eps, cause, a.steps,
        a.step_size, a.eps / 4)


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
