"""LBGAT: Learnable Boundary Guided Adversarial Training (Cui et al., ICCV 2021, arXiv:2011.11164).

Two networks are trained together by one optimizer: the robust model f_r (the run's model) and a
natural model f_n (owned by this objective, trained from scratch on clean images). The robust
model's adversarial logits are pulled towards the natural model's clean logits, and the natural
model is pulled back towards them while its cross-entropy keeps it accurate, so the natural
classifier's boundary guides the robust one and is learned at the same time:

    L = α_mse · MSE(f_r(x'), f_n(x)) + CE(f_n(x), y) + β · KL(p(f_r(x)) ‖ p(f_r(x')))

with x' the TRADES-KL adversarial example of f_r. As in the official code, MSE is
``nn.MSELoss()``: the mean over the B·C logits, i.e. ‖f_r(x') − f_n(x)‖²/C per sample, and
f_n(x) is not detached. β = 0 is "LBGAT0", β = 6 is "LBGAT6".
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import Tensor, nn

from ..attacks.basic import kl_per_sample
from ..errors import UserError
from . import OBJECTIVES
from .base import BuildContext, Objective, ObjectiveOutput, ObjectiveParams
from .basic import START_HELP, Start, trades_attack


class TeacherSpec(BaseModel):
    """The natural model's architecture: any registered model name and its parameters."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field("resnet18", description="registered model name of the natural model")
    params: dict[str, Any] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        from ..models import MODELS

        if v not in MODELS:
            raise ValueError(f"unknown model; choose one of: {', '.join(MODELS.names())}")
        return v


class LBGATParams(ObjectiveParams):
    teacher: TeacherSpec = Field(default_factory=TeacherSpec,
                                 description="the natural model f_n: {name, params}")
    alpha_mse: float = Field(1.0, ge=0.0, description="weight of the mean MSE logit guidance")
    beta: float = Field(0.0, ge=0.0, description="β of the TRADES KL term (0: LBGAT0, 6: LBGAT6)")
    evaluate: Literal["robust", "natural"] = Field(
        "robust", description="which of the two models validation and evaluation use"
    )
    start: Start = Field("normal", description=START_HELP)


def lbgat_terms(
    z_adv: Tensor, z_nat: Tensor, z_teacher: Tensor, y: Tensor, alpha_mse: float, beta: float
) -> dict[str, Tensor]:
    """LBGAT's per-sample loss terms; their batch mean is the official ``lbgat_loss``.

    Args:
        z_adv: f_r(x'), the robust model's logits on the adversarial images, (B, C).
        z_nat: f_r(x), the robust model's logits on the clean images, (B, C).
        z_teacher: f_n(x), the natural model's logits on the clean images, (B, C); not detached.
        y: labels, (B,).
        alpha_mse: weight of the MSE guidance (1 in the official code).
        beta: β, weight of KL(p(f_r(x)) ‖ p(f_r(x'))).

    Returns:
        ``natural`` = CE(f_n(x), y), ``mse`` = α_mse·‖f_r(x') − f_n(x)‖²/C and
        ``robust`` = β·KL, each of shape (B,).
    """
    return {
        "natural": F.cross_entropy(z_teacher, y, reduction="none"),
        "mse": alpha_mse * (z_adv - z_teacher).pow(2).mean(1),
        "robust": beta * kl_per_sample(z_nat, z_adv),
    }


@OBJECTIVES.register("lbgat")
class LBGAT(Objective):
    """LBGAT (arXiv:2011.11164): a robust model guided by a jointly trained natural model.

    The natural model ``self.natural`` is built from ``teacher: {name, params}`` and is a
    submodule of the objective, so the engine optimises it with the robust model (one optimizer)
    and saves it in every checkpoint. Evaluation uses the robust model unless
    ``evaluate: natural``; :func:`evaluate_natural_model` evaluates the natural model of a run.

    Example (config)::

        method:
          objective: {name: lbgat, beta: 6.0, teacher: {name: resnet18}}
    """

    Params = LBGATParams

    def __init__(self, params: LBGATParams, ctx: BuildContext) -> None:  # type: ignore[override]
        super().__init__(params, ctx)
        if ctx.build_model is None:
            raise UserError("the lbgat objective needs a model builder; build it with the Trainer")
        self.natural: nn.Module = ctx.build_model(params.teacher.name, **params.teacher.params)
        self.attack = trades_attack(ctx, start=params.start)

    def forward(  # type: ignore[override]
        self, model: nn.Module, x: Tensor, y: Tensor, eps: Tensor, step_size: Tensor
    ) -> ObjectiveOutput:
        x_adv = self.attack(model, x, y, eps, step_size) if self.attack is not None else x
        # the official order of the forward passes (it decides the BN running statistics)
        z_adv = model(x_adv)
        z_nat = model(x)
        z_teacher = self.natural(x)
        terms = lbgat_terms(z_adv, z_nat, z_teacher, y, self.alpha_mse, self.beta)
        return ObjectiveOutput(terms, z_nat, z_adv, x_adv)

    def eval_model(self, model: nn.Module) -> nn.Module:
        """The robust model (the run's model), or the natural one if ``evaluate: natural``."""
        return self.natural if self.params.evaluate == "natural" else model


def evaluate_natural_model(
    run_dir: str | Path, attacks: list[str] | None = None, overrides: list[str] | None = None,
    which: str = "last", quiet: bool = True,
) -> dict[str, Any]:
    """Evaluate the natural model f_n of an LBGAT run; save the summary to ``RUN/eval-natural``.

    The robust model's evaluation (``RUN/eval``) is left untouched.

    Args:
        run_dir: a run directory made by ``robustfair train`` with the ``lbgat`` objective.
        attacks: attack specs (default: the run's ``eval.attacks``).
        overrides: ``key=value`` settings applied to the run's config (e.g. ``eval.n=500``).
        which: ``last`` or ``best`` checkpoint.
        quiet: no progress bar.

    Returns:
        The evaluation summary (as written to ``eval-natural/summary.json``).
    """
    import yaml

    from ..config import apply_override, build_config
    from ..engine.integrity import verify_checkpoint
    from ..engine.io import load_checkpoint
    from ..engine.trainer import Trainer, run_eval

    run_dir = Path(run_dir)
    cfg_file = run_dir / "config.yaml"
    if not cfg_file.exists():
        raise UserError(f"{str(run_dir)!r} is not a run directory (no config.yaml); give the "
                        f"folder that 'robustfair train' created")
    raw = yaml.safe_load(cfg_file.read_text(encoding="utf-8"))
    for ov in overrides or []:
        apply_override(raw, ov)
    cfg = build_config(raw)
    if cfg.method.objective["name"] != "lbgat":
        raise UserError(f"run {str(run_dir)!r} has objective {cfg.method.objective['name']!r}; "
                        f"only lbgat runs have a natural model")
    ckpt = run_dir / "checkpoints" / f"{which}.pt"
    if not ckpt.exists():
        raise UserError(f"{str(ckpt)!r} not found; train the run first (or use which='last')")
    trainer = Trainer(cfg, run_dir, quiet=True)
    verify_checkpoint(ckpt)
    trainer.load_state_dict(load_checkpoint(ckpt, map_location=trainer.device))
    teacher = cfg.method.objective["teacher"]
    shown = cfg.model_copy(deep=True)
    shown.model.name, shown.model.params = teacher["name"], dict(teacher["params"])
    return run_eval(trainer.objective.natural, trainer.data, shown, run_dir / "eval-natural",
                    attacks, trainer.device, quiet=quiet)
