"""APGD-T: APGD on the targeted DLR loss, one run per target class, over the classes with the
highest clean logits (Croce & Hein, ICML 2020, arXiv:2003.01690, §4)."""

from __future__ import annotations

import torch
from pydantic import Field

from . import ATTACKS
from ._helpers import clean_correct, eps_rows, make_generator, n_targets, sorted_classes
from .apgd import APGDBase, APGDParams, LossFn, _rows, apgd, dlr_loss_targeted


class APGDTParams(APGDParams):
    n_target_classes: int | None = Field(
        None, ge=1, description="target classes tried in turn; None: min(9, C − 1)")


@ATTACKS.register("apgd-t")
class APGDT(APGDBase):
    """Targeted APGD-DLR over the top min(9, C − 1) classes (Croce & Hein, arXiv:2003.01690).

    The targets of a point are its classes ranked 2nd, 3rd, … by the clean logits; each target
    gets ``restarts`` runs of ``steps`` iterations, only on the points not yet fooled.

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
        order = sorted_classes(model, x)
        best = torch.full((len(x),), float("-inf"), device=x.device, dtype=x.dtype)
        for rank in range(1, n_targets(order.shape[1], self.n_target_classes) + 1):
            for _ in range(self.restarts):
                idx = (~fooled).nonzero().flatten()
                if len(idx) == 0:
                    return out
                r = apgd(model, x[idx], y[idx], eps_rows(eps, idx, len(x)), self.loss_fn(),
                         norm=self.norm, steps=self.steps, rho=self.rho,
                         momentum=self.momentum, eot_iter=self.eot_iter,
                         target=order[idx, rank], step_size=_rows(step_size, idx, len(x)),
                         generator=gen, early_stop=self.early_stop)
                take = r.fooled | (r.loss > best[idx])
                out[idx[take]] = r.x_adv[take]
                best[idx] = torch.maximum(best[idx], r.loss)
                fooled[idx[r.fooled]] = True
        return out
