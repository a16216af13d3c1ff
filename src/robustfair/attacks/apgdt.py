"""APGD-T: APGD on the targeted DLR loss, one run per target class, over the classes with the
highest clean logits (Croce & Hein, ICML 2020, arXiv:2003.01690, §4)."""

from __future__ import annotations

import torch
from pydantic import Field

from . import ATTACKS
from ._helpers import (
    clean_correct,
    eps_rows,
    make_generator,
    n_targets,
    rank_groups,
    ranked_targets,
    target_copies,
)
from .apgd import APGDBase, APGDParams, LossFn, _rows, apgd, dlr_loss_targeted
from .malt import TargetedParams


class APGDTParams(APGDParams, TargetedParams):
    skip_targets: int = Field(0, ge=0, description="the first ranked targets are left out "
                                                   "(already attacked by an earlier stage)")


@ATTACKS.register("apgd-t")
class APGDT(APGDBase):
    """Targeted APGD-DLR over the top min(9, C − 1) classes (Croce & Hein, arXiv:2003.01690).

    The targets of a point are its classes ranked 2nd, 3rd, … by the clean logits (or, with
    ``targeting='malt'``, by MALT's linearised boundary distance, nearest first); each target
    gets ``restarts`` runs of ``steps`` iterations, only on the points not yet fooled. Several
    targets run side by side when the batch is small (``max_batch``); a point stops as soon as
    one target fools it, so the result is that of running the targets one after the other.

    Example::

        x_adv = build_attack("apgd-t")(model, x, y, eps=8 / 255)
    """

    Params = APGDTParams

    def loss_fn(self) -> LossFn:
        return dlr_loss_targeted

    def perturb(self, model, x, y, eps, step_size):  # type: ignore[override]
        gen = make_generator(self.seed, x.device)
        out = x.clone()
        fooled = ~clean_correct(model, x, y)
        if not bool((~fooled).any()):
            return out
        order = ranked_targets(model, x, y, eps, ~fooled, self.norm, self.targeting)
        last = n_targets(order.shape[1], self.n_target_classes)
        best = torch.full((len(x),), float("-inf"), device=x.device, dtype=x.dtype)
        rank = 1 + self.skip_targets
        while rank <= last:
            ranks = rank_groups(int((~fooled).sum()), last, self.max_batch, rank)
            rank += len(ranks)
            for _ in range(self.restarts):
                idx = (~fooled).nonzero().flatten()
                if len(idx) == 0:
                    return out
                rep, tgt = target_copies(idx, order, ranks)
                r = apgd(model, x[rep], y[rep], eps_rows(eps, rep, len(x)), self.loss_fn(),
                         norm=self.norm, steps=self.steps, rho=self.rho,
                         momentum=self.momentum, eot_iter=self.eot_iter, target=tgt,
                         step_size=_rows(step_size, rep, len(x)), generator=gen,
                         early_stop=self.early_stop, group=rep)
                for part in torch.arange(len(rep), device=x.device).split(len(idx)):
                    _keep(out, best, fooled, rep[part], r.x_adv[part], r.loss[part],
                          r.fooled[part])
        return out


def _keep(out: torch.Tensor, best: torch.Tensor, fooled: torch.Tensor, idx: torch.Tensor,
          x_adv: torch.Tensor, loss: torch.Tensor, hit: torch.Tensor) -> None:
    """Take the fooling points, else the points of higher loss (``idx`` without repeats)."""
    take = ~fooled[idx] & (hit | (loss > best[idx]))
    out[idx[take]] = x_adv[take]
    best[idx] = torch.maximum(best[idx], loss)
    fooled[idx[hit]] = True
