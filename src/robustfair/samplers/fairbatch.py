"""FairBatch: adaptive per-(label, group) batch proportions (Roh et al., "FairBatch: Batch
Selection for Model Fairness", ICLR 2021, arXiv:2012.01696).

The batch keeps each label's share of the real data, S_y = B·N_y/N, and splits it between the
groups z with λ_{y,·} (a distribution over the groups of label y, initialised at the natural mix
N_{y,z}/N_y): n(y,z) = round(λ_{y,z}·S_y). Once per epoch (or every ``update_every`` steps) the
per-cell training losses L_{y,z} are measured and λ moves by the fixed step ``alpha`` toward the
worse-off group. As in the official code, the update runs at the *start* of every epoch, before
the batches it shapes, so the first one is made on the untrained model (``timing: end`` updates
after every epoch instead, which leaves λ one step behind for the whole run); with
``update_every`` the first update likewise comes before the first step. The targets:

- ``eqopp``: only the positive label, toward the group with the higher loss;
- ``eqodds``: only the label with the larger loss gap between groups, toward its higher-loss group;
- ``dp``: losses against the positive label (−log P(ŷ=positive)) summed per cell and divided by
  the size of the group; the label with the larger gap moves, toward the higher-loss group for the
  positive label and toward the lower-loss group for the others.

λ stays in [0, 1]. With two groups this is the official update exactly; with more groups the step
moves ``alpha`` of mass from the opposite extreme. The official code uses a single logit with the
loss BCE((tanh(logit)+1)/2, ·); here the model has one logit per class and the loss is the
cross-entropy. Only real data (``source == 0``) is sampled.

:class:`GroupSampler` holds what FairBatch and Dr-Fairness share (Dr-Fairness reuses FairBatch's
batch selection): cells, per-cell index streams drawn without replacement (a fresh permutation
of a cell each time it is used up) and batches composed from per-cell sizes at the moment each
batch is drawn, so that an update made after a step shapes the next batch.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from ..attacks.base import eval_mode
from ..errors import UserError
from . import SAMPLERS
from .base import Sampler, SamplerParams

log = logging.getLogger("robustfair")

Fairness = Literal["eqodds", "eqopp", "eopp", "dp"]


def _mix(*parts: int) -> int:
    h = 1469598103934665603
    for p in parts:
        h = ((h ^ (int(p) & 0xFFFFFFFFFFFF)) * 1099511628211) % (2**61 - 1)
    return h


class _LazyBatches(Sequence):
    """The epoch's batches, each composed when it is first asked for (in order)."""

    def __init__(self, sampler: GroupSampler, epoch: int, n: int) -> None:
        self.sampler, self.epoch, self.n = sampler, epoch, n
        self._drawn: dict[int, Tensor] = {}

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, k: int) -> Tensor:  # type: ignore[override]
        if not 0 <= k < self.n:
            raise IndexError(k)
        if k not in self._drawn:
            self._drawn[k] = self.sampler.draw_batch(self.epoch, k)
        return self._drawn[k]


class GroupSampler(Sampler):
    """Base of the group samplers: cells (y, z, source) and per-cell index streams.

    Subclasses define :meth:`cell_sizes` (the number of samples of every cell in one batch) and
    update their ratios in ``on_step`` / ``on_epoch_end``."""

    uses_generated = False

    def __init__(self, params: Any, data: Any, batch_size: int, seed: int,
                 ctx: Any = None) -> None:
        super().__init__(params, data, batch_size, seed, ctx)
        name = getattr(type(self), "registered_name", "group")
        if data.group is None:
            raise UserError(f"method.sampler '{name}' needs a dataset with groups (e.g. "
                            f"data.name=mnist5k-groups or celeba); this one has none")
        self.y = data.y.cpu()
        self.z = data.group.cpu()
        self.s = data.source.cpu() if data.source is not None else torch.zeros_like(self.y)
        self.C = int(getattr(ctx, "num_classes", 0) or int(self.y.max()) + 1)
        self.G = int(getattr(ctx, "num_groups", 0) or int(self.z.max()) + 1)
        self.pools: dict[tuple[int, int, int], Tensor] = {}
        for source in (0, 1) if self.uses_generated else (0,):
            for yy in range(self.C):
                for zz in range(self.G):
                    m = (self.y == yy) & (self.z == zz) & (self.s == source)
                    self.pools[(yy, zz, source)] = torch.nonzero(m).flatten()
        real = self.s == 0
        self.n_real = int(real.sum())
        if self.n_real == 0:
            raise UserError(f"method.sampler '{name}': the training split has no real samples")
        counts = torch.tensor([[len(self.pools[(yy, zz, 0)]) for zz in range(self.G)]
                               for yy in range(self.C)], dtype=torch.float64)
        self.real_counts = counts  # (C, G)
        #: S_y = B·N_y/N: each label keeps its share of the real data in a batch
        self.S = batch_size * counts.sum(1) / self.n_real
        self.cursor: dict[str, int] = {}
        self._perm_cache: dict[tuple[int, int, int], tuple[int, Tensor]] = {}
        self.epoch = 0
        self.history: list[dict[str, Any]] = []

    # ------------------------------------------------------------------ batches
    def natural_lambda(self) -> Tensor:
        """λ_{y,z} = N_{y,z}/N_y over the real data (a label without data: uniform)."""
        n_y = self.real_counts.sum(1, keepdim=True)
        lam = self.real_counts / n_y.clamp_min(1)
        return torch.where(n_y > 0, lam, torch.full_like(lam, 1.0 / self.G))

    def cell_sizes(self) -> dict[tuple[int, int, int], int]:
        raise NotImplementedError  # abstract

    def num_batches(self) -> int:
        return max(1, self.n_real // self.batch_size)

    def _key_id(self, key: tuple[int, int, int]) -> int:
        return (key[0] * self.G + key[1]) * 2 + key[2]

    def _take(self, key: tuple[int, int, int], n: int) -> Tensor:
        """The next ``n`` indices of the cell's stream (without replacement; wraps around)."""
        pool = self.pools[key]
        if n <= 0:
            return pool[:0]
        if len(pool) == 0:
            raise UserError(f"the sampler needs samples of label {key[0]}, group {key[1]}"
                            f"{' (generated)' if key[2] else ''} but the training split has none")
        ck = f"{key[0]},{key[1]},{key[2]}"
        start = self.cursor.get(ck, 0)
        pos = torch.arange(start, start + n)
        out = torch.empty(n, dtype=torch.long)
        for p in pos.div(len(pool), rounding_mode="floor").unique().tolist():
            m = pos.div(len(pool), rounding_mode="floor") == p
            out[m] = pool[self._perm(key, int(p))[pos[m] % len(pool)]]
        self.cursor[ck] = start + n
        return out

    def _perm(self, key: tuple[int, int, int], p: int) -> Tensor:
        cached = self._perm_cache.get(key)
        if cached is None or cached[0] != p:
            g = torch.Generator().manual_seed(_mix(self.seed, self._key_id(key), p, 11))
            cached = (p, torch.randperm(len(self.pools[key]), generator=g))
            self._perm_cache[key] = cached
        return cached[1]

    def draw_batch(self, epoch: int, k: int) -> Tensor:
        """Compose batch ``k`` of ``epoch`` from the current cell sizes, shuffled."""
        parts = [self._take(key, n) for key, n in sorted(self.cell_sizes().items())]
        idx = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)
        g = torch.Generator().manual_seed(_mix(self.seed, epoch, k, 23))
        return idx[torch.randperm(len(idx), generator=g)]

    def epoch_batches(self, epoch: int) -> Sequence[Tensor]:  # type: ignore[override]
        self.epoch = epoch
        self.history = [h for h in self.history if h.get("epoch") == epoch]
        return _LazyBatches(self, epoch, self.num_batches())

    # ------------------------------------------------------------------ helpers
    def record(self, step: int, **figures: Any) -> None:
        self.history.append({"epoch": self.epoch, "step": step, **figures})

    def base_state(self) -> dict[str, Any]:
        return {"cursor": dict(self.cursor), "epoch": self.epoch, "history": list(self.history)}

    def load_base_state(self, state: dict[str, Any]) -> None:
        self.cursor = {str(k): int(v) for k, v in state.get("cursor", {}).items()}
        self.epoch = int(state.get("epoch", 0))
        self.history = list(state.get("history", []))


def model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def positive_label(positive: int, num_classes: int) -> int:
    """Check that the positive label (equal opportunity, demographic parity) exists."""
    if not 0 <= positive < num_classes:
        raise UserError(f"method.sampler.positive={positive} is not a label (0..{num_classes - 1})")
    return positive


@SAMPLERS.register("fairbatch")
class FairBatch(GroupSampler):
    """FairBatch (Roh et al., ICLR 2021): per-(label, group) batch shares moved toward the
    worse-off group by fixed steps; equalized odds, equal opportunity or demographic parity."""

    class Params(SamplerParams):
        fairness: Fairness = "eqodds"
        alpha: float = Field(0.005, gt=0.0, le=1.0, description="step of λ per update")
        positive: int = Field(1, ge=0, description="positive label (eqopp and dp)")
        update_every: int = Field(0, ge=0, description="steps between updates; 0: every epoch")
        probe: int | None = Field(None, ge=1, description="training samples used for the "
                                  "losses (None: all real training samples)")
        timing: Literal["start", "end"] = Field(
            "start", description="start: update λ before each epoch (the first on the untrained "
            "model), as the official code does; end: after each epoch")

    def __init__(self, params: Any, data: Any, batch_size: int, seed: int,
                 ctx: Any = None) -> None:
        super().__init__(params, data, batch_size, seed, ctx)
        self.positive = positive_label(self.positive, self.C)
        self.lam = self.natural_lambda()
        self.updates = 0
        self.last_step = 0
        self.started = 0  # the last epoch whose start-of-epoch update was made

    def cell_sizes(self) -> dict[tuple[int, int, int], int]:
        sizes = torch.round(self.lam * self.S[:, None]).long()
        return {(yy, zz, 0): int(sizes[yy, zz]) for yy in range(self.C) for zz in range(self.G)}

    # ------------------------------------------------------------------ update
    def cell_losses(self, model: nn.Module) -> Tensor:
        """L_{y,z}: the per-cell mean loss on the real training data ((C, G), NaN if empty)."""
        real = torch.nonzero(self.s == 0).flatten()
        if self.probe is not None and self.probe < len(real):
            g = torch.Generator().manual_seed(_mix(self.seed, self.updates, 5))
            real = real[torch.randperm(len(real), generator=g)[: self.probe]]
        dev = model_device(model)
        losses = []
        with eval_mode(model), torch.no_grad():
            for i in range(0, len(real), 1000):
                idx = real[i : i + 1000]
                logits = model(self.data.images(idx.to(self.data.y.device)).to(dev)).float()
                target = (torch.full_like(idx, self.positive) if self.fairness == "dp"
                          else self.y[idx]).to(dev)
                losses.append(F.cross_entropy(logits, target, reduction="none").cpu())
        loss = torch.cat(losses).double()
        y, z = self.y[real], self.z[real]
        cell = torch.bincount(y * self.G + z, weights=loss, minlength=self.C * self.G)
        if self.fairness == "dp":
            denom = torch.bincount(z, minlength=self.G).double()[None, :].expand(self.C, -1)
        else:
            denom = torch.bincount(y * self.G + z, minlength=self.C * self.G).double().view(
                self.C, self.G)
        cell = cell.view(self.C, self.G)
        return torch.where(denom > 0, cell / denom.clamp_min(1), torch.full_like(cell,
                                                                                 float("nan")))

    def _move(self, y: int, toward: int, away: int) -> None:
        t = min(self.alpha, float(self.lam[y, away]), 1.0 - float(self.lam[y, toward]))
        self.lam[y, toward] += t
        self.lam[y, away] -= t

    def apply_update(self, L: Tensor) -> None:
        """One FairBatch step on λ from the per-cell losses ``L`` ((C, G))."""
        finite = torch.isfinite(L)
        masked_hi = torch.where(finite, L, torch.full_like(L, -float("inf")))
        masked_lo = torch.where(finite, L, torch.full_like(L, float("inf")))
        gaps = torch.where(finite.sum(1) > 1, masked_hi.max(1).values - masked_lo.min(1).values,
                           torch.full((self.C,), -1.0, dtype=L.dtype))
        fairness = "eqopp" if self.fairness == "eopp" else self.fairness
        y = self.positive if fairness == "eqopp" else int(torch.argmax(gaps))
        if gaps[y] < 0:
            return
        hi, lo = int(masked_hi[y].argmax()), int(masked_lo[y].argmin())
        if hi == lo:
            return
        if fairness == "dp" and y != self.positive:
            self._move(y, toward=lo, away=hi)
        else:
            self._move(y, toward=hi, away=lo)

    def update(self, model: nn.Module, step: int) -> None:
        L = self.cell_losses(model)
        self.apply_update(L)
        self.updates += 1
        self.record(step, **{"lambda": self.lam.tolist(), "losses": _nan_none(L)})

    def on_epoch_start(self, epoch: int, model: nn.Module) -> None:
        if self.timing != "start" or epoch <= self.started:
            return  # a resumed epoch was updated already
        self.started = epoch
        if not self.update_every or self.last_step == 0:
            self.update(model, self.last_step)

    def on_step(self, step: int, model: nn.Module) -> None:
        self.last_step = step
        if self.update_every and step % self.update_every == 0:
            self.update(model, step)

    def on_epoch_end(self, ctx: Any) -> None:
        if not self.update_every and self.timing == "end":
            self.update(ctx.model, self.last_step)

    # ------------------------------------------------------------------ log and state
    def log(self) -> dict[str, Any]:
        return {"lambda": self.lam.tolist(), "updates": self.updates,
                "history": [h for h in self.history if h.get("epoch") == self.epoch]}

    def state_dict(self) -> dict[str, Any]:
        return {"lambda": self.lam.clone(), "updates": self.updates, "started": self.started,
                "last_step": self.last_step, **self.base_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        self.lam = state["lambda"].double().clone()
        self.updates = int(state["updates"])
        self.started = int(state.get("started", 0))
        self.last_step = int(state.get("last_step", 0))
        self.load_base_state(state)


def _nan_none(t: Tensor) -> list[list[float | None]]:
    return [[None if v != v else float(v) for v in row] for row in t.tolist()]
