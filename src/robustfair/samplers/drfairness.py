"""Dr-Fairness: dynamic data ratios between groups and between real and generated data
(Roh, Nie, Huang, Whang, Vahdat, Anandkumar, "Dr-Fairness: Dynamic Data Ratio Adjustment for
Fair Training on Real and Generated Data", TMLR 2023).

Cells are c = (y, z). Two sets of ratios are learned by bilevel optimisation:

- λ_{y,·} = softmax(φ_{y,·}): for each label y, the share of each group z (initialised at the
  natural mix N_{y,z}/N_y of the real data);
- μ_c = sigmoid(ψ_c): the share of cell c's batch slots filled with real rather than generated
  data (initialised at 0.5).

A batch keeps each label's share of the real data, S_y = B·N_y/N, and draws
round(λ_c μ_c S_y) real and round(λ_c (1−μ_c) S_y) generated samples of every cell.

Every ``update_every`` steps, on a probe of ``probe`` real and ``probe`` generated validation
samples (redrawn until every cell appears in both):

- outer = max_{y, z<z'} |ℓ^r_{y,z} − ℓ^r_{y,z'}| + k·Σ_c (n_c/n) ℓ^r_c  (``eqodds``; ``eqopp``
  restricts the gap to the positive label; ``dp`` uses the gap between groups of the loss against
  the positive label, −log P(ŷ=positive), averaged per group);
- inner = (1/n) Σ_c n_y [λ_c μ_c ℓ^r_c + λ_c (1−μ_c) ℓ^g_c];
- the implicit-function hypergradient with H⁻¹ ≈ I over the parameters w of the model's last
  linear layer, in closed form from the penultimate features h (for the cross-entropy,
  ∇_W ℓ_i = (softmax(z_i) − onehot(y_i)) h_iᵀ):
  a_c = μ_c⟨g^r_c, v⟩ + (1−μ_c)⟨g^g_c, v⟩ with v = ∇_w outer, ā_y = Σ_z λ_{y,z} a_{y,z},
  ∂/∂φ_{y,z} = −(n_y/n) λ_{y,z} (a_{y,z} − ā_y),
  ∂/∂ψ_c = −(n_y/n) λ_c μ_c (1−μ_c) (⟨g^r_c, v⟩ − ⟨g^g_c, v⟩);
- one Adam step (lr ``lr``) on φ and one on ψ.

Differences from the official code (``NVlabs/Dr-Fairness``), following the paper: the model's
BatchNorm layers stay in training mode (the official code's first probe, made before the first
step, leaves the whole model in eval mode for the entire run; ``freeze_bn: true`` reproduces
that, from before the first step), the first update is a real one (the official first update is
zero), ψ starts at 0 (μ = 0.5
exactly) and the equal-opportunity and demographic-parity targets exist (the official
``--fairness`` flag is ignored). ``probe_attack`` (off by default, an extension) measures the
probe losses on adversarial probes, for use with adversarial training.

The dataset provides the generated training samples (``source == 1`` in the training split) and
the generated validation samples (``DataBundle.extra["gen_val"]``).
"""

from __future__ import annotations

import copy
import itertools
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from ..attacks.base import eval_mode
from ..errors import UserError
from . import SAMPLERS
from .base import SamplerParams
from .fairbatch import Fairness, GroupSampler, _mix, model_device, positive_label


def last_linear(model: nn.Module) -> nn.Linear:
    """The model's last ``nn.Linear`` (in module registration order): the classifier layer."""
    layers = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not layers:
        raise UserError("method.sampler 'drfairness' needs a model whose last layer is an "
                        "nn.Linear classifier; choose another model")
    return layers[-1]


def features_and_logits(model: nn.Module, layer: nn.Linear, x: Tensor) -> tuple[Tensor, Tensor]:
    """(the last linear layer's input h, the model's logits) for ``x``, without gradients."""
    seen: dict[str, Tensor] = {}

    def grab(_m: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        seen["h"] = inputs[0].detach()
        seen["out"] = output.detach()

    handle = layer.register_forward_hook(grab)
    try:
        with torch.no_grad():
            logits = model(x)
    finally:
        handle.remove()
    if "h" not in seen or seen["out"].shape != logits.shape or not torch.allclose(
            seen["out"], logits):
        raise UserError("method.sampler 'drfairness': the model's output is not the output of "
                        "its last nn.Linear layer; use a model that ends in a linear classifier")
    return seen["h"].flatten(1).float(), logits.float()


def cell_means(values: Tensor, y: Tensor, z: Tensor, C: int, G: int) -> Tensor:
    """Mean of ``values`` per cell (y, z) as a (C, G) tensor (0 for an empty cell)."""
    cell = y * G + z
    s = torch.zeros(C * G, dtype=values.dtype, device=values.device).index_add(0, cell, values)
    n = torch.bincount(cell, minlength=C * G).to(values.dtype)
    return (s / n.clamp_min(1)).view(C, G)


def outer_objective(logits: Tensor, y: Tensor, z: Tensor, C: int, G: int, fairness: str,
                    k: float, positive: int = 1) -> tuple[Tensor, Tensor]:
    """(outer, fairness gap) on the real probe: the largest loss gap between two groups plus
    ``k`` times the mean loss (every probe sample belongs to a cell, so Σ_c (n_c/n) ℓ_c is the
    mean)."""
    loss = F.cross_entropy(logits, y, reduction="none")
    if fairness == "dp":
        pos = torch.full_like(y, positive)
        lz = cell_means(F.cross_entropy(logits, pos, reduction="none"), torch.zeros_like(y), z,
                        1, G)[0]
        gaps = [(lz[a] - lz[b]).abs() for a, b in itertools.combinations(range(G), 2)]
    else:
        lc = cell_means(loss, y, z, C, G)
        labels = [positive] if fairness in ("eqopp", "eopp") else list(range(C))
        gaps = [(lc[yy, a] - lc[yy, b]).abs() for yy in labels
                for a, b in itertools.combinations(range(G), 2)]
    gap = torch.stack(gaps).max() if gaps else logits.sum() * 0
    return gap + k * loss.mean(), gap.detach()


def _augment(h: Tensor, bias: bool) -> Tensor:
    return torch.cat([h, torch.ones_like(h[:, :1])], 1) if bias else h


def hypergradient(
    real: tuple[Tensor, Tensor, Tensor, Tensor],
    gen: tuple[Tensor, Tensor, Tensor, Tensor],
    lam: Tensor,
    mu: Tensor,
    fairness: str = "eqodds",
    k: float = 20.0,
    positive: int = 1,
    bias: bool = True,
) -> tuple[Tensor, Tensor, dict[str, float]]:
    """Closed-form Dr-Fairness hypergradient (g_φ, g_ψ), each (C, G).

    ``real`` and ``gen`` are (h, logits, y, z) of the real and generated probes: h the input of
    the last linear layer, logits its output. ``lam`` and ``mu`` are the current λ and μ (C, G).
    """
    h_r, z_r, y_r, g_r = real
    h_g, z_g, y_g, g_g = gen
    C, G = lam.shape
    logits = z_r.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        outer, gap = outer_objective(logits, y_r, g_r, C, G, fairness, k, positive)
        (u,) = torch.autograd.grad(outer, [logits])
    hr, hg = _augment(h_r, bias), _augment(h_g, bias)
    v = u.t() @ hr  # ∇_{W,b} outer, (C, D+1)

    def aligned(logit: Tensor, yy: Tensor, hh: Tensor) -> Tensor:
        e = torch.softmax(logit, 1) - F.one_hot(yy, C).to(logit.dtype)  # ∂ℓ_i/∂logits
        return ((e @ v) * hh).sum(1)  # ⟨∇_w ℓ_i, v⟩

    r = cell_means(aligned(z_r, y_r, hr), y_r, g_r, C, G).double().cpu()
    g = cell_means(aligned(z_g, y_g, hg), y_g, g_g, C, G).double().cpu()
    lam, mu = lam.double().cpu(), mu.double().cpu()
    share = (torch.bincount(y_r.cpu(), minlength=C).double() / len(y_r))[:, None]  # n_y / n
    a = mu * r + (1 - mu) * g
    a_bar = (lam * a).sum(1, keepdim=True)
    g_phi = -share * lam * (a - a_bar)
    g_psi = -share * lam * mu * (1 - mu) * (r - g)
    return g_phi, g_psi, {"outer": float(outer.detach()), "gap": float(gap)}


def _eval_before_forward(module: nn.Module, _inputs: Any) -> None:
    """Forward pre-hook of ``freeze_bn``: the model runs in eval mode whatever the engine set."""
    module.eval()


@SAMPLERS.register("drfairness")
class DrFairness(GroupSampler):
    """Dr-Fairness (Roh et al., TMLR 2023): group ratios λ and real/generated ratios μ learned
    by a closed-form hypergradient on the last layer; eqodds, eqopp (eopp) or dp targets."""

    uses_generated = True

    class Params(SamplerParams):
        fairness: Fairness = "eqodds"
        k: float = Field(20.0, ge=0.0, description="weight of the accuracy term in outer")
        lr: float = Field(0.005, gt=0.0, description="Adam learning rate of φ and ψ (data_lr)")
        probe: int = Field(128, ge=2, description="real and generated validation probe size")
        update_every: int = Field(1, ge=1, description="optimizer steps between updates")
        positive: int = Field(1, ge=0, description="positive label (eqopp and dp)")
        steps_per_epoch: int | None = Field(None, ge=1, description="None: N_real // batch")
        freeze_bn: bool = Field(False, description="official behaviour: the model stays in "
                                "eval mode (BatchNorm frozen) from before the first step")
        probe_attack: str | None = Field(None, description="attack the probes (e.g. pgd5)")
        max_redraws: int = Field(100, ge=1)

    def __init__(self, params: Any, data: Any, batch_size: int, seed: int,
                 ctx: Any = None) -> None:
        super().__init__(params, data, batch_size, seed, ctx)
        self.positive = positive_label(self.positive, self.C)
        bundle = (getattr(ctx, "extra", None) or {}).get("data")
        if bundle is None:
            raise UserError("method.sampler 'drfairness' needs the data bundle in the build "
                            "context (BuildContext.extra['data'])")
        self.val = bundle.val
        self.gen_val = bundle.extra.get("gen_val")
        self._check_cells()
        lam = self.natural_lambda()
        self.phi = lam.clamp_min(1e-8).log().requires_grad_(True)
        self.psi = torch.zeros(self.C, self.G, dtype=torch.float64, requires_grad=True)
        self.opt_phi = torch.optim.Adam([self.phi], lr=self.lr)
        self.opt_psi = torch.optim.Adam([self.psi], lr=self.lr)
        self.lam = lam
        self.mu = torch.full((self.C, self.G), 0.5, dtype=torch.float64)
        self.updates = 0
        self.last: dict[str, float] = {}
        self._hooked: nn.Module | None = None
        self._attack = None
        if self.probe_attack:
            from ..attacks import build_attack

            self._attack = build_attack(self.probe_attack, getattr(ctx, "norm", "linf"),
                                        bounded=getattr(ctx, "bounded", True))

    def _check_cells(self) -> None:
        if self.gen_val is None or len(self.gen_val) == 0:
            raise UserError("method.sampler 'drfairness' needs generated data: this dataset has "
                            "no generated validation split; set data.params.generated (a folder "
                            "from 'robustfair generate', or auto for mnist5k-groups)")
        missing = []
        for yy, zz in itertools.product(range(self.C), range(self.G)):
            for what, n in (("real training", len(self.pools[(yy, zz, 0)])),
                            ("generated training", len(self.pools[(yy, zz, 1)])),
                            ("real validation", self._count(self.val, yy, zz)),
                            ("generated validation", self._count(self.gen_val, yy, zz))):
                if n == 0:
                    missing.append(f"{what} (label {yy}, group {zz})")
        if missing:
            raise UserError(f"method.sampler 'drfairness' needs every (label, group) cell in the "
                            f"real and generated data; missing: {', '.join(missing[:4])}")

    @staticmethod
    def _count(d: Any, yy: int, zz: int) -> int:
        if d is None or d.group is None:
            return 0
        return int(((d.y.cpu() == yy) & (d.group.cpu() == zz)).sum())

    # ------------------------------------------------------------------ batches
    def num_batches(self) -> int:
        return self.params.steps_per_epoch or super().num_batches()

    def cell_sizes(self) -> dict[tuple[int, int, int], int]:
        share = self.lam * self.S[:, None]
        n_real = torch.round(share * self.mu).long()
        n_gen = torch.round(share * (1 - self.mu)).long()
        out = {}
        for yy, zz in itertools.product(range(self.C), range(self.G)):
            out[(yy, zz, 0)] = int(n_real[yy, zz])
            out[(yy, zz, 1)] = int(n_gen[yy, zz])
        return out

    # ------------------------------------------------------------------ update
    def _draw(self, d: Any, step: int, salt: int) -> Tensor:
        n = len(d)
        m = min(self.probe, n)
        y, z = d.y.cpu(), d.group.cpu()
        for t in range(self.max_redraws):
            g = torch.Generator().manual_seed(_mix(self.seed, step, salt, t))
            idx = torch.randperm(n, generator=g)[:m]
            if bool((torch.bincount(y[idx] * self.G + z[idx], minlength=self.C * self.G)
                     > 0).all()):
                return idx
        raise UserError(f"method.sampler.probe={self.probe}: {self.max_redraws} random probes "
                        f"all missed some (label, group) cell; use a larger probe")

    def _freeze(self, model: nn.Module) -> None:
        """``freeze_bn``: keep ``model`` in eval mode for every later forward pass."""
        if self._hooked is not model:
            model.register_forward_pre_hook(_eval_before_forward)
            self._hooked = model
        model.eval()

    def _probe_mode(self, model: nn.Module) -> AbstractContextManager:
        if not self.freeze_bn:
            return eval_mode(model)
        self._freeze(model)
        return nullcontext()

    def on_epoch_start(self, epoch: int, model: nn.Module) -> None:
        if self.freeze_bn:  # the official first probe precedes the first step
            self._freeze(model)

    def _probe(self, model: nn.Module, layer: nn.Linear, d: Any, idx: Tensor
               ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        dev = model_device(model)
        x = d.images(idx.to(d.y.device)).to(dev)
        y = d.y[idx.to(d.y.device)].to(dev)
        if self._attack is not None:
            eps = float(getattr(self.ctx, "eps", 0.0))
            x = self._attack(model, x, y, eps)
        h, logits = features_and_logits(model, layer, x)
        return h, logits, y, d.group[idx.to(d.group.device)].to(dev)

    def update(self, model: nn.Module, step: int) -> None:
        """One λ/μ update from fresh real and generated validation probes."""
        layer = last_linear(model)
        if layer.out_features != self.C:
            raise UserError(f"method.sampler 'drfairness': the last linear layer has "
                            f"{layer.out_features} outputs but the data has {self.C} classes")
        idx_r, idx_g = self._draw(self.val, step, 1), self._draw(self.gen_val, step, 2)
        with self._probe_mode(model):
            real = self._probe(model, layer, self.val, idx_r)
            gen = self._probe(model, layer, self.gen_val, idx_g)
        g_phi, g_psi, info = hypergradient(real, gen, self.lam, self.mu, self.fairness, self.k,
                                           self.positive, layer.bias is not None)
        for opt, p, grad in ((self.opt_phi, self.phi, g_phi), (self.opt_psi, self.psi, g_psi)):
            opt.zero_grad()
            p.grad = grad.to(p.dtype)
            opt.step()
        with torch.no_grad():
            self.lam = torch.softmax(self.phi, 1).detach().clone()
            self.mu = torch.sigmoid(self.psi).detach().clone()
        self.updates += 1
        self.last = info
        self.record(step, **{"lambda": self.lam.tolist(), "mu": self.mu.tolist(),
                             "gap": info["gap"], "outer": info["outer"]})

    def on_step(self, step: int, model: nn.Module) -> None:
        if step % self.update_every == 0:
            self.update(model, step)

    # ------------------------------------------------------------------ log and state
    def log(self) -> dict[str, Any]:
        return {"lambda": self.lam.tolist(), "mu": self.mu.tolist(), "updates": self.updates,
                **self.last,
                "history": [h for h in self.history if h.get("epoch") == self.epoch]}

    def state_dict(self) -> dict[str, Any]:
        return {"phi": self.phi.detach().clone(), "psi": self.psi.detach().clone(),
                "opt_phi": copy.deepcopy(self.opt_phi.state_dict()),
                "opt_psi": copy.deepcopy(self.opt_psi.state_dict()),
                "updates": self.updates, "last": dict(self.last), **self.base_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        with torch.no_grad():
            self.phi.copy_(state["phi"])
            self.psi.copy_(state["psi"])
        self.opt_phi.load_state_dict(state["opt_phi"])
        self.opt_psi.load_state_dict(state["opt_psi"])
        self.lam = torch.softmax(self.phi, 1).detach().clone()
        self.mu = torch.sigmoid(self.psi).detach().clone()
        self.updates = int(state["updates"])
        self.last = dict(state.get("last", {}))
        self.load_base_state(state)
