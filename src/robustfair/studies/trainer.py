"""The AT-on-AD training protocol for any network: minibatch training with early stopping on the
clean validation loss (Hu et al., ICML 2023, arXiv:2211.15762; specs part_atad §2.3).

Per epoch: shuffle, and for every batch one optimizer step on CE(f(x_adv), y) (x_adv = x for
standard training); then the clean mean CE on the validation split. The weights with the lowest
validation loss are kept; training stops after ``patience`` epochs without improvement or after
``epochs`` epochs. Every learning rate of a grid starts from the same initial weights and sees the
batches in the same order (the official scripts seed init and shuffling identically).

Model selection: the official rule is the default (``selection: clean``, ``min_epochs: 0``). Two
options: ``selection: robust`` keeps the weights (and the learning rate) with the lowest
*adversarial* validation loss (the training attack at the cell's ε; the same as clean for
standard training), and ``min_epochs`` makes the first epochs ineligible, so that an adversarially
trained model cannot be kept from before its bias has moved.

``accumulate_attack_grads`` reproduces the official update: advertorch back-propagates the
attack's losses into the parameters before the training loss is added, so the step follows
∇θ[Σ_k CE(x + δ_k) + CE(x_adv)] over the attack's iterates δ_0…δ_{T−1} (for FGSM: CE(x) +
CE(x_adv)), and the attack runs with the model in train mode. Off by default: the clean update
∇θ CE(x_adv) with the attack in eval mode.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)
from torch import Tensor, nn

from ..attacks import build_attack
from ..attacks.base import as_eps, eval_mode
from ..data import DataBundle
from ..errors import UserError


class TrainSettings(BaseModel):
    """Optimisation and attack settings shared by every cell of a study."""

    model_config = ConfigDict(extra="forbid")

    optimizer: Literal["adam", "sgd"] = "adam"
    momentum: float = Field(0.0, ge=0.0, lt=1.0, description="SGD momentum")
    epochs: int = Field(500, ge=1, description="most epochs")
    patience: int = Field(50, ge=1, description="stop after this many epochs without improvement")
    batch_size: int = Field(64, ge=1)
    attack: str = Field("auto", description="auto, closed-form, fgsm or pgdN")
    pgd_steps: dict[str, int] = Field(default_factory=lambda: {"linf": 40, "l2": 50})
    pgd_step_fraction: dict[str, float] = Field(
        default_factory=lambda: {"linf": 1 / 30, "l2": 1 / 20},
        description="PGD step size as a fraction of ε (official: ε/30 for ℓ∞, ε/20 for ℓ2)")
    accumulate_attack_grads: bool = Field(
        False, description="official update: the attack's loss gradients leak into the step")
    selection: Literal["clean", "robust"] = Field(
        "clean", description="validation loss that selects the epoch and the learning rate: "
        "clean (official) or robust (under the training attack)")
    min_epochs: int = Field(0, ge=0, description="epochs before a model may be selected "
                            "(official: 0)")

    @model_validator(mode="after")
    def _min_epochs(self) -> TrainSettings:
        if self.min_epochs > self.epochs:
            raise ValueError(f"min_epochs ({self.min_epochs}) exceeds epochs ({self.epochs})")
        return self

    def eligible(self, epoch: int) -> bool:
        """Whether the model after ``epoch`` (0-based) may be selected."""
        return epoch + 1 >= self.min_epochs

    @field_validator("pgd_steps", "pgd_step_fraction", mode="before")
    @classmethod
    def _per_norm(cls, v: Any, info: ValidationInfo) -> Any:
        """Setting one norm keeps the other norm's default."""
        if not isinstance(v, dict):
            return v
        unknown = set(v) - {"l2", "linf"}
        if unknown:
            raise ValueError(f"keys are l2 and linf, not {sorted(unknown)}")
        return {**cls.model_fields[info.field_name].default_factory(), **v}


@dataclass(frozen=True)
class Method:
    """Standard training (norm None, eps 0) or adversarial training at (norm, eps)."""

    norm: str | None = None
    eps: float = 0.0

    @property
    def robust(self) -> bool:
        return self.norm is not None and self.eps > 0

    @property
    def key(self) -> str:
        return "standard" if not self.robust else f"{self.norm}_eps{self.eps:g}"


@dataclass
class Fit:
    """One trained model: its selection figures and its predictions on both test sets."""

    method: Method
    lr: float
    val_loss: float
    best_epoch: int
    epochs: int
    pred_test: Tensor
    pred_balanced: Tensor
    params: dict[str, Any] = field(default_factory=dict)


def make_optimizer(params: list[Tensor], settings: TrainSettings, lr: float
                   ) -> torch.optim.Optimizer:
    """Adam (official for the synthetic data) or SGD with optional momentum; no weight decay."""
    if settings.optimizer == "adam":
        return torch.optim.Adam(params, lr=lr)
    return torch.optim.SGD(params, lr=lr, momentum=settings.momentum)


def batch_order(n: int, batch_size: int, generator: torch.Generator) -> list[Tensor]:
    """A fresh permutation cut into batches (the last one may be smaller)."""
    perm = torch.randperm(n, generator=generator)
    return [perm[i : i + batch_size] for i in range(0, n, batch_size)]


def split_tensors(data: DataBundle, device: torch.device) -> dict[str, tuple[Tensor, Tensor]]:
    """Float inputs and labels of train, val, test and the balanced test set on ``device``."""
    parts = {"train": data.train, "val": data.val, "test": data.test,
             "balanced": data.extra["test_balanced"]}
    return {k: (d.images().to(device), d.y.to(device)) for k, d in parts.items()}


class _Recorder(nn.Module):
    """Passes inputs to the model and keeps a detached copy of each (the attack's iterates)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.inputs: list[Tensor] = []

    def forward(self, x: Tensor) -> Tensor:
        self.inputs.append(x.detach())
        return self.model(x)


@contextmanager
def single_thread() -> Iterator[None]:
    """Run torch on one thread (tiny tensors: extra threads only add synchronisation, which
    costs milliseconds per operation on a busy machine); restore the count afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@contextmanager
def frozen_bn_stats(model: nn.Module) -> Iterator[None]:
    """Batch norm in train mode uses batch statistics but leaves its running statistics alone."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, mom in zip(bns, saved, strict=True):
            m.momentum = mom


class AdversarialStep:
    """The per-batch loss of one method: CE(f(x_adv), y), plus the official leaked terms."""

    def __init__(self, method: Method, settings: TrainSettings, bounded: bool) -> None:
        self.method = method
        self.settings = settings
        self.attack = None
        if method.robust:
            if settings.attack == "closed-form":
                raise UserError("attack closed-form needs model linear; use attack auto or pgdN")
            spec = settings.attack if settings.attack != "auto" else (
                f"pgd{settings.pgd_steps[method.norm]}")
            step = method.eps * settings.pgd_step_fraction[method.norm]
            # unbounded inputs (synthetic mixtures) are not clipped to [0, 1]
            self.attack = build_attack(spec, method.norm, step_size=step, bounded=bounded)

    def loss(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        if self.attack is None:
            return F.cross_entropy(model(x), y)
        if not self.settings.accumulate_attack_grads:
            x_adv = self.attack(model, x, y, self.method.eps)
            return F.cross_entropy(model(x_adv), y)
        rec = _Recorder(model)
        eps = as_eps(self.method.eps, x)
        step = getattr(self.attack, "step_size", None)
        with eval_mode(model, train=True), torch.enable_grad():
            x_adv = self.attack.perturb(rec, x.detach(), y, eps, step).detach()
        with frozen_bn_stats(model):
            leaked = sum(F.cross_entropy(model(xi), y) for xi in rec.inputs)
        return leaked + F.cross_entropy(model(x_adv), y)


@torch.no_grad()
def predict(model: nn.Module, x: Tensor, batch_size: int = 1000) -> Tensor:
    model.eval()
    return torch.cat([model(x[i : i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)])


@torch.no_grad()
def mean_ce(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 1000) -> float:
    """Clean mean cross-entropy (eval mode)."""
    model.eval()
    total = sum(float(F.cross_entropy(model(x[i : i + batch_size]), y[i : i + batch_size],
                                      reduction="sum")) for i in range(0, len(x), batch_size))
    return total / len(x)


def selection_loss(model: nn.Module, step: AdversarialStep, x: Tensor, y: Tensor,
                   batch_size: int = 1000) -> float:
    """Mean CE on the validation split: clean, or under the training attack (``robust``)."""
    if step.settings.selection == "clean" or step.attack is None:
        return mean_ce(model, x, y, batch_size)
    total = 0.0
    for i in range(0, len(x), batch_size):
        xb, yb = x[i : i + batch_size], y[i : i + batch_size]
        x_adv = step.attack(model, xb, yb, step.method.eps)
        total += mean_ce(model, x_adv, yb, batch_size) * len(xb)
    return total / len(x)


def fit_network(
    build: Callable[[], nn.Module], data: DataBundle, method: Method, lr: float,
    settings: TrainSettings, seed: int, device: torch.device | str = "cpu",
) -> Fit:
    """Train one network with early stopping on the validation loss (see module doc)."""
    device = torch.device(device)
    t = split_tensors(data, device)
    torch.manual_seed(seed)
    model = build().to(device)
    opt = make_optimizer(list(model.parameters()), settings, lr)
    gen = torch.Generator().manual_seed(seed)
    step = AdversarialStep(method, settings, bool(data.extra.get("bounded", True)))
    x_tr, y_tr = t["train"]
    best = (math.inf, -1, copy.deepcopy(model.state_dict()))
    epoch = -1
    for epoch in range(settings.epochs):
        for idx in batch_order(len(y_tr), settings.batch_size, gen):
            idx = idx.to(device)
            model.train()
            opt.zero_grad(set_to_none=True)
            step.loss(model, x_tr[idx], y_tr[idx]).backward()
            opt.step()
        if not settings.eligible(epoch):
            continue
        val = selection_loss(model, step, *t["val"])
        if val < best[0]:
            best = (val, epoch, copy.deepcopy(model.state_dict()))
        if epoch - best[1] >= settings.patience:
            break
    model.load_state_dict(best[2])
    return Fit(method, lr, best[0], best[1], epoch + 1, predict(model, t["test"][0]).cpu(),
               predict(model, t["balanced"][0]).cpu())
