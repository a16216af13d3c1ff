"""Square Attack: score-based black-box random search (Andriushchenko, Croce, Flammarion & Hein,
"Square Attack: a query-efficient black-box adversarial attack via random search", ECCV 2020,
arXiv:1912.00049).

Each iteration proposes a change of one random square window of side h_k (chosen so that the
window covers a fraction p_k of the image, p_k halving on a fixed schedule rescaled to the query
budget) and keeps it if it lowers the margin loss z_y − max_{j≠y} z_j. Queries stop on a point as
soon as it is misclassified.

- ℓ∞ (Algorithm 2): start from vertical stripes of ±ε; a proposal sets the window to ±ε, one
  random sign per colour channel.
- ℓ2 (Algorithm 3): start from a grid of the centre-weighted η patterns (eq. 2); a proposal moves
  the perturbation's mass of a second window W2 and the unused budget into window W1.

Every image draws its own window positions and signs, uniformly over all positions
{0, …, h − s} as in the paper (the reference code draws from {0, …, h − s − 1} and so never
changes the last row and column; on 8×8 images that costs it ~10 points of success rate). The
query budget of AutoAttack is 5,000.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from . import ATTACKS
from ._helpers import clean_correct, eps_rows, make_generator, margin, rand_sign, view_n
from .base import Attack, AttackParams, per_sample

#: the p-schedule of the paper, for 10,000 iterations: (last iteration, divisor of p_init)
_P_SCHEDULE = ((10, 1), (50, 2), (200, 4), (500, 8), (1000, 16), (2000, 32), (4000, 64),
               (6000, 128), (8000, 256))


def p_selection(p_init: float, it: int, n_queries: int) -> float:
    """Fraction p of pixels changed at iteration ``it`` (schedule rescaled to ``n_queries``)."""
    i = int(it / n_queries * 10000)
    for last, div in _P_SCHEDULE:
        if i <= last:
            return p_init / div
    return p_init / 512


def eta_pattern(rows: int, cols: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """Nested rectangles around the centre, the value at Chebyshev distance d being
    Σ_{k=d}^{K−1} 1/(k+1)² (the building block of eq. 2 of the paper)."""
    r = (torch.arange(rows, device=device) - rows // 2).abs()
    c = (torch.arange(cols, device=device) - cols // 2).abs()
    dist = torch.maximum(r[:, None], c[None, :])
    k_max = max(rows // 2 + 1, cols // 2 + 1)
    terms = 1.0 / (torch.arange(k_max, device=device, dtype=dtype) + 1) ** 2
    suffix = terms.flip(0).cumsum(0).flip(0)
    return suffix[dist]


def eta(s: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """η^(s) of eq. 2: two halves of opposite sign, unit ℓ2 norm (s × s)."""
    top = eta_pattern(s // 2, s, device, dtype) if s // 2 > 0 else torch.zeros(0, s, device=device,
                                                                                dtype=dtype)
    out = torch.cat([top, -eta_pattern(s - s // 2, s, device, dtype)])
    return out / out.norm().clamp_min(1e-12)


def _randint(high: int, n: int, like: Tensor, generator: torch.Generator | None) -> Tensor:
    """n integers uniform in {0, …, high − 1}."""
    u = torch.rand(n, generator=generator, device=like.device)
    return (u * high).long().clamp(max=high - 1)


def _window_index(vh: Tensor, vw: Tensor, s: int) -> tuple[Tensor, Tensor, Tensor]:
    """Index tensors selecting an s × s window per image of a (N, H, W, C) tensor."""
    ar = torch.arange(s, device=vh.device)
    bi = torch.arange(len(vh), device=vh.device)[:, None, None]
    return bi, (vh[:, None] + ar)[:, :, None], (vw[:, None] + ar)[:, None, :]


def _bands(size: int, s: int, device: torch.device) -> Tensor:
    """(size − s + 1, size) bool: row k marks the band [k, k + s)."""
    ar = torch.arange(size, device=device)
    start = torch.arange(size - s + 1, device=device)[:, None]
    return (ar[None, :] >= start) & (ar[None, :] < start + s)


def _window_mask(vh: Tensor, vw: Tensor, s: int, h: int, w: int) -> Tensor:
    """(N, 1, H, W) bool mask of one s × s window per image."""
    rows, cols = _bands(h, s, vh.device)[vh], _bands(w, s, vw.device)[vw]
    return (rows[:, :, None] & cols[:, None, :])[:, None]


class _Search:
    """Random-search state. The points still correctly classified are kept compacted (``idx``,
    ``x``, ``y``, ``eps``, ``best``, ``loss``) so that no query is spent on a fooled point."""

    #: pass a proposal through the model only where it differs from the current best point
    skip_repeats = True

    def __init__(self, model: nn.Module, x: Tensor, y: Tensor, eps: Tensor, x_init: Tensor,
                 loss: str) -> None:
        self.model, self.loss_name, self.n = model, loss, len(x)
        self.x_best = x_init.clone()
        self.fooled = torch.zeros(len(x), dtype=torch.bool, device=x.device)
        self.idx = torch.arange(len(x), device=x.device)
        self.x, self.y, self.eps, self.best = x, y, eps, x_init
        self.lo, self.hi = (x - eps).clamp_min(0), (x + eps).clamp_max(1)
        m, self.loss = self._evaluate(x_init)
        self._drop(m <= 0)

    def _evaluate(self, x_new: Tensor, rows: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Margin and loss of ``x_new`` (the rows ``rows`` of the search, if given)."""
        logits = self.model(x_new)
        y = self.y if rows is None else self.y[rows]
        m = margin(logits, y)
        if self.loss_name == "ce":
            return m, -F.cross_entropy(logits, y, reduction="none")
        return m, m

    def __len__(self) -> int:
        return len(self.idx)

    def step(self, x_new: Tensor) -> None:
        """Query the proposals; keep those that lower the loss or fool the model.

        A proposal equal to the current best point (ℓ∞: the window already holds the drawn
        signs, or they are clipped away at the image box) is not passed through the model: its
        margin and loss are those of the best point, which is correctly classified, so it would
        neither fool the model nor be kept. Such rows still use up their query; the search is
        the same, without the forward pass (about a quarter of all rows on MNIST)."""
        same = (x_new == self.best).flatten(1).all(1) if self.skip_repeats else \
            torch.zeros(len(x_new), dtype=torch.bool, device=x_new.device)
        if bool(same.all()):
            return
        if bool(same.any()):
            fresh = (~same).nonzero().flatten()
            m_f, loss_f = self._evaluate(x_new[fresh], fresh)
            m = torch.ones_like(self.loss).index_put((fresh,), m_f)
            loss = self.loss.index_put((fresh,), loss_f)
        else:
            m, loss = self._evaluate(x_new)
        hit = m <= 0
        take = (loss < self.loss) | hit
        self.loss = torch.minimum(loss, self.loss)
        self.best = torch.where(view_n(take, x_new), x_new, self.best)
        self._drop(hit)

    def _drop(self, hit: Tensor) -> None:
        if not bool(hit.any()):
            return
        self.x_best[self.idx] = self.best
        self.fooled[self.idx[hit]] = True
        keep = (~hit).nonzero().flatten()
        self.eps = eps_rows(self.eps, keep, len(hit))
        self.idx, self.x, self.y = self.idx[keep], self.x[keep], self.y[keep]
        self.best, self.loss = self.best[keep], self.loss[keep]
        self.lo, self.hi = self.lo[keep], self.hi[keep]

    def finish(self) -> tuple[Tensor, Tensor]:
        self.x_best[self.idx] = self.best
        return self.x_best, self.fooled


@torch.no_grad()
def square_linf(model: nn.Module, x: Tensor, y: Tensor, eps: Tensor, *, n_queries: int = 5000,
                p_init: float = 0.8, loss: str = "margin",
                generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Square Attack, ℓ∞ (Algorithm 2); returns (best point, fooled). ``eps`` may be per element."""
    n, c, h, w = x.shape
    stripes = rand_sign((n, c, 1, w), x, generator)
    x_init = torch.min(torch.max(x + eps * stripes, x - eps), x + eps).clamp(0, 1)
    st = _Search(model, x, y, eps, x_init, loss)
    bands: dict[int, tuple[Tensor, Tensor, Tensor]] = {}
    for i in range(n_queries):
        if len(st) == 0:
            break
        p = p_selection(p_init, i, n_queries)
        s = min(max(int(round(math.sqrt(p * h * w))), 1), h, w)
        if s not in bands:
            bands[s] = (_bands(h, s, x.device).to(x.dtype), _bands(w, s, x.device).to(x.dtype),
                        torch.tensor([h - s + 1, w - s + 1], device=x.device, dtype=x.dtype))
        rows, cols, n_pos = bands[s]
        m = len(st)
        u = torch.rand(m, 2 + c, generator=generator, device=x.device, dtype=x.dtype)
        pos = (u[:, :2] * n_pos).long()
        mask = rows[pos[:, 0]][:, None, :, None] * cols[pos[:, 1]][:, None, None, :]
        step = ((u[:, 2:] < 0.5).to(x.dtype) * -4 + 2).view(m, c, 1, 1)
        st.step(torch.clamp(st.best + mask * (st.eps * step), st.lo, st.hi))
    return st.finish()


def _l2_init(x: Tensor, r: Tensor, generator: torch.Generator | None) -> Tensor:
    """A grid of η patterns with random signs per channel, scaled to norm ε (per sample)."""
    n, c, h, w = x.shape
    s = max(h // 5, 1)
    delta = torch.zeros_like(x)
    pat = eta(s, x.device, x.dtype)
    off_h, off_w = (h - s * (h // s)) // 2, (w - s * (w // s)) // 2
    for bh in range(h // s):
        for bw in range(w // s):
            top, left = off_h + bh * s, off_w + bw * s
            delta[:, :, top:top + s, left:left + s] += pat * rand_sign((n, c, 1, 1), x, generator)
    delta = delta / view_n(delta.flatten(1).norm(p=2, dim=1).clamp_min(1e-12), x)
    return (x + view_n(r, x) * delta).clamp(0, 1)


def _l2_proposal(x: Tensor, x_best: Tensor, r: Tensor, s: int,
                 generator: torch.Generator | None) -> Tensor:
    """Algorithm 3: move the mass of W2 and the unused budget into W1, as an η pattern."""
    m, c, h, w = x.shape
    nu = (x_best - x).permute(0, 2, 3, 1).contiguous()  # (m, H, W, C)
    vh1, vw1 = _randint(h - s + 1, m, x, generator), _randint(w - s + 1, m, x, generator)
    vh2, vw2 = _randint(h - s + 1, m, x, generator), _randint(w - s + 1, m, x, generator)
    w1 = _window_index(vh1, vw1, s)
    union = (_window_mask(vh1, vw1, s, h, w) | _window_mask(vh2, vw2, s, h, w))[:, 0]
    n12 = ((nu ** 2) * union[..., None]).sum((1, 2))  # (m, C)
    unused = (r ** 2 - (nu ** 2).sum((1, 2, 3))).clamp_min(0)  # (m,)
    old = nu[w1]  # (m, s, s, C)
    old = old / old.flatten(1, 2).norm(p=2, dim=1)[:, None, None, :].clamp_min(1e-12)
    pat = eta(s, x.device, x.dtype)
    flip = torch.rand(m, generator=generator, device=x.device) < 0.5
    pats = torch.where(flip[:, None, None], pat.t()[None], pat[None])  # (m, s, s)
    new = pats[..., None] * rand_sign((m, 1, 1, c), x, generator) + old
    new = new / new.flatten(1, 2).norm(p=2, dim=1)[:, None, None, :].clamp_min(1e-12)
    avail = (n12 + unused[:, None] / c).sqrt()  # (m, C)
    w2 = _window_index(vh2, vw2, s)
    nu[w2] = 0.0
    nu[w1] = new * avail[:, None, None, :]
    nu = nu.permute(0, 3, 1, 2)
    norm = nu.flatten(1).norm(p=2, dim=1)
    nu = nu * view_n((r / norm.clamp_min(1e-12)).clamp(max=1.0), nu)
    return (x + nu).clamp(0, 1)


@torch.no_grad()
def square_l2(model: nn.Module, x: Tensor, y: Tensor, eps: Tensor, *, n_queries: int = 5000,
              p_init: float = 0.8, loss: str = "margin",
              generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Square Attack, ℓ2 (Algorithm 3); returns (best point, fooled). ``eps``: scalar or (N,)."""
    n, c, h, w = x.shape
    r = per_sample(eps, x)
    st = _Search(model, x, y, view_n(r, x), _l2_init(x, r, generator), loss)
    for i in range(n_queries):
        if len(st) == 0:
            break
        p = p_selection(p_init, i, n_queries)
        s = max(int(round(math.sqrt(p * h * w))), 3)
        s = min(s + (s % 2 == 0), h, w)
        r_act = st.eps.flatten().expand(len(st)) if st.eps.numel() == 1 else st.eps.flatten()
        st.step(_l2_proposal(st.x, st.best, r_act, s, generator))
    return st.finish()


class SquareParams(AttackParams):
    norm: Literal["linf", "l2"] = "linf"
    n_queries: int = Field(5000, ge=1, description="query budget per restart (AutoAttack: 5,000)")
    p_init: float = Field(0.8, gt=0.0, le=1.0, description="initial fraction of pixels changed")
    restarts: int = Field(1, ge=1, description="runs, each only on the points not yet fooled")
    loss: Literal["margin", "ce"] = "margin"
    seed: int | None = Field(0, description="seed of the random search (None: global RNG)")


@ATTACKS.register("square")
class Square(Attack):
    """Square Attack, black-box random search on the margin loss, ℓ∞ and ℓ2 (Andriushchenko et
    al., ECCV 2020, arXiv:1912.00049).

    Example::

        x_adv = build_attack("square")(model, x, y, eps=8 / 255)
    """

    Params = SquareParams

    def perturb(self, model, x, y, eps, step_size):  # type: ignore[override]
        gen = make_generator(self.seed, x.device)
        out = x.clone()
        fooled = ~clean_correct(model, x, y)
        run = square_linf if self.norm == "linf" else square_l2
        for _ in range(self.restarts):
            idx = (~fooled).nonzero().flatten()
            if len(idx) == 0:
                break
            xb, ok = run(model, x[idx], y[idx], eps_rows(eps, idx, len(x)),
                         n_queries=self.n_queries, p_init=self.p_init, loss=self.loss,
                         generator=gen)
            out[idx] = xb
            fooled[idx[ok]] = True
        return out


__all__ = ["Square", "eta", "p_selection", "square_l2", "square_linf"]
