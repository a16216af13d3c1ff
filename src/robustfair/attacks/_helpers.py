"""Helpers shared by the AutoAttack family (APGD, FAB, Square): ε rows, seeded generators,
margins and the "attack only what is still classified correctly" bookkeeping."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def eps_rows(eps: Tensor, idx: Tensor, n: int) -> Tensor:
    """The rows ``idx`` of an ε broadcast to a batch of ``n`` (shared ε is returned as is)."""
    if eps.dim() > 0 and eps.shape[0] == n and n > 1:
        return eps[idx]
    return eps


def make_generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    """A private generator seeded with ``seed`` (None: use torch's global generator)."""
    if seed is None:
        return None
    g = torch.Generator(device=device)
    g.manual_seed(int(seed))
    return g


def rand_sign(shape: tuple[int, ...] | list[int], like: Tensor,
              generator: torch.Generator | None) -> Tensor:
    """Uniform random ±1 of the given shape, on ``like``'s device and dtype."""
    u = torch.rand(tuple(shape), generator=generator, device=like.device, dtype=like.dtype)
    return torch.where(u < 0.5, -torch.ones_like(u), torch.ones_like(u))


def margin(logits: Tensor, y: Tensor) -> Tensor:
    """z_y − max_{j≠y} z_j per sample (positive while the sample is classified correctly)."""
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.scatter(1, y[:, None], float("-inf")).amax(1)
    return z_y - other


def clean_correct(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 1000) -> Tensor:
    """Boolean (N,): the model classifies the natural image correctly."""
    with torch.no_grad():
        return torch.cat([model(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]
                          for i in range(0, len(x), batch_size)]) if len(x) else \
            torch.zeros(0, dtype=torch.bool, device=x.device)


def sorted_classes(model: nn.Module, x: Tensor) -> Tensor:
    """Classes ordered by the clean logits, highest first (N, C): the APGD-T / FAB-T targets."""
    with torch.no_grad():
        return model(x).argsort(dim=1, descending=True)


def ranked_targets(model: nn.Module, x: Tensor, y: Tensor, eps: Tensor, todo: Tensor, norm: str,
                   targeting: str) -> Tensor:
    """The class order (N, C) whose ranks 1, 2, … are the targets of APGD-T / FAB-T: by clean
    logit (``'confidence'``, AutoAttack), or by MALT's boundary distance for the rows ``todo``
    (``'malt'``; the other rows, not attacked, keep the confidence order)."""
    order = sorted_classes(model, x)
    if targeting == "malt":
        from .malt import malt_order

        idx = todo.nonzero().flatten()
        if len(idx):
            order[idx] = malt_order(model, x[idx], y[idx], eps_rows(eps, idx, len(x)), norm)
    return order


def n_targets(num_classes: int, requested: int | None) -> int:
    """Target classes of the targeted attacks: ``min(9, C − 1)`` unless set (Croce & Hein 2020)."""
    cap = num_classes - 1
    return max(1, min(cap, 9 if requested is None else requested))


def cross_entropy(logits: Tensor, y: Tensor, target: Tensor | None = None) -> Tensor:
    """Per-sample cross-entropy (the APGD-CE loss)."""
    return F.cross_entropy(logits, y, reduction="none")


def lp_dims(x: Tensor) -> list[int]:
    return list(range(1, x.dim()))


def view_n(t: Tensor, x: Tensor) -> Tensor:
    """(N,) → (N, 1, …, 1) to broadcast against ``x``."""
    return t.view([-1] + [1] * (x.dim() - 1))


def target_copies(idx: Tensor, order: Tensor, ranks: list[int]) -> tuple[Tensor, Tensor]:
    """One copy of every point in ``idx`` per target rank: (point index, target class) per copy.

    Targets of one point are attacked side by side (while the batch stays within the caller's
    size), so the iterations of all ranks share one loop; as soon as one copy of a point is
    misclassified, its other copies stop."""
    r = torch.tensor(ranks, device=idx.device).repeat_interleave(len(idx))
    rep = idx.repeat(len(ranks))
    return rep, order[rep, r]


def rank_groups(n_points: int, n_ranks: int, max_batch: int, start: int) -> list[int]:
    """The next ranks to attack together: as many as keep points × ranks ≤ ``max_batch``."""
    g = max(1, min(n_ranks - start + 1, max_batch // max(n_points, 1)))
    return list(range(start, start + g))
