"""Adversarial weight perturbation (Wu, Xia, Wang, NeurIPS 2020, arXiv:2004.05884).

AWP trains on the worst case of a small neighbourhood of the weights as well as of the inputs:
before each step the weights w are moved to w + v, where v maximises the training loss, the
gradient is taken at w + v, and v is removed after the optimizer step:

    v_l = γ · ‖w_l‖ · g_l / ‖g_l‖,     g = ∇_w L(w),     l = each weight matrix / kernel,

one ascent step, layer-wise relative to the layer's norm (biases and normalisation parameters,
the 1-D tensors, are not perturbed). As in the official code the ascent is taken on a proxy copy
of the model, so that the model's batch-norm statistics and gradients are left as they were.

Use with any objective: ``awp.perturb(model, objective, x, y, eps, step, policy)`` before the
loss forward, ``awp.restore(model)`` after ``optimizer.step()``. The objective regenerates its
adversarial examples on the proxy (the official code reuses those of the unperturbed model).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

_EPS = 1e-20


class AWP:
    """Adversarial weight perturbation of size γ, relative per layer (arXiv:2004.05884).

    Args:
        model: the model to perturb; its architecture is copied for the proxy.
        gamma: γ, the relative size of the perturbation (5e-3 in the paper and in DKL).
        build_model_like: returns a fresh model of the same architecture (the proxy).
    """

    def __init__(self, model: nn.Module, gamma: float,
                 build_model_like: Callable[[], nn.Module]) -> None:
        self.gamma = float(gamma)
        self.proxy = build_model_like()
        self.proxy.load_state_dict(model.state_dict())
        self.diff: dict[str, Tensor] = {}

    @staticmethod
    def perturbed_names(model: nn.Module) -> list[str]:
        """The parameters AWP perturbs: weight matrices and kernels (dim > 1)."""
        return [n for n, p in model.named_parameters() if p.dim() > 1 and p.requires_grad]

    def proxy_grads(self, model: nn.Module, objective: nn.Module, x: Tensor, y: Tensor,
                    eps: Tensor, step: Tensor, policy: Any = None) -> dict[str, Tensor]:
        """∇ of the objective's batch loss at the model's weights, computed on the proxy.

        The objective's buffers (e.g. class-wise statistics, a natural model's BN statistics)
        are restored afterwards, and no parameter's ``.grad`` is touched."""
        self.proxy.load_state_dict(model.state_dict())
        self.proxy.train(model.training)
        saved = {n: b.detach().clone() for n, b in objective.named_buffers()}
        names = self.perturbed_names(self.proxy)
        params = dict(self.proxy.named_parameters())
        try:
            with torch.enable_grad():
                out = objective(self.proxy, x, y, eps, step)
                per = policy.combine(out, y) if policy is not None else out.total()
                loss = per.float().mean()
                grads = torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True)
        finally:
            with torch.no_grad():
                for n, b in objective.named_buffers():
                    b.copy_(saved[n])
        return {n: g for n, g in zip(names, grads, strict=True) if g is not None}

    @torch.no_grad()
    def perturb(self, model: nn.Module, objective: nn.Module, x: Tensor, y: Tensor,
                eps: Tensor, step: Tensor, policy: Any = None) -> None:
        """Add v = γ·‖w‖·g/‖g‖ to each weight of ``model`` (remembered for :meth:`restore`)."""
        if self.diff:
            raise RuntimeError("AWP.perturb called twice without restore")
        if self.gamma == 0:
            return
        grads = self.proxy_grads(model, objective, x, y, eps, step, policy)
        for n, p in model.named_parameters():
            g = grads.get(n)
            if g is None:
                continue
            v = self.gamma * p.norm() * g / (g.norm() + _EPS)
            p.add_(v)
            self.diff[n] = v

    @torch.no_grad()
    def restore(self, model: nn.Module) -> None:
        """Subtract the perturbation added by the last :meth:`perturb`."""
        for n, p in model.named_parameters():
            v = self.diff.get(n)
            if v is not None:
                p.sub_(v)
        self.diff = {}
