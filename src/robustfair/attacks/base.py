"""The attack base class, ε broadcasting and the one projection routine."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor, nn

from ..errors import UserError


class AttackParams(BaseModel):
    model_config = ConfigDict(extra="forbid")


def unknown_params(params_model: type[BaseModel], given: dict[str, Any], name: str) -> str:
    """'' if every key of ``given`` is a parameter of the attack, else a one-line message naming
    the first unknown key, the closest parameter and the list of parameters."""
    import difflib

    fields = sorted(params_model.model_fields)
    for key in given:
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            return (f"attack {name!r} has no parameter {key!r}{hint}; its parameters: "
                    f"{', '.join(f for f in fields if f != 'norm')}")
    return ""


class InputRangeError(UserError, ValueError):
    """Images outside [0, 1] given to an attack that works in [0, 1]."""


def check_unit_range(x: Tensor, tol: float = 1e-4, can_unclip: bool = False) -> None:
    """Refuse inputs outside [0, 1]: an attack would clip them there and report nonsense."""
    if not x.is_floating_point() or x.numel() == 0:
        if not x.is_floating_point():
            raise InputRangeError(f"attack inputs must be float images in [0, 1], got dtype "
                                  f"{x.dtype}; convert with x.float() / 255")
        return
    lo, hi = (float(v) for v in torch.aminmax(x.detach()))
    if lo < -tol or hi > 1 + tol:
        hint = ("divide them by 255" if hi > 2 else "undo the normalization and put it inside "
                "the model (robustfair.models.normalize.Normalize)")
        raise InputRangeError(f"attack inputs must be images in [0, 1], got values in "
                              f"[{lo:.3g}, {hi:.3g}]; {hint}"
                              + (", or pass clip=False for inputs that are not images"
                                 if can_unclip else ""))


def as_eps(eps: float | Tensor, x: Tensor) -> Tensor:
    """Return ε as a tensor broadcastable to ``x``: scalar → (1,…), (N,) → (N,1,…), x-shaped as is."""
    e = torch.as_tensor(eps, dtype=x.dtype if x.is_floating_point() else torch.float32,
                        device=x.device)
    if e.dim() == 0:
        return e.reshape([1] * x.dim())
    if e.shape == x.shape:
        return e
    if e.dim() == 1 and e.shape[0] == x.shape[0]:
        return e.reshape([-1] + [1] * (x.dim() - 1))
    if e.dim() == x.dim() and all(a in (1, b) for a, b in zip(e.shape, x.shape, strict=True)):
        return e
    raise ValueError(f"eps of shape {tuple(e.shape)} does not fit inputs of shape {tuple(x.shape)}")


def per_sample(e: Tensor, x: Tensor) -> Tensor:
    """Per-sample radius (N,) from a broadcastable ε; ℓ2 needs one radius per sample."""
    if e.numel() > 1 and e.flatten(1).shape[1] > 1 and e.shape[0] == x.shape[0]:
        flat = e.flatten(1)
        if not torch.all(flat == flat[:, :1]):
            raise ValueError("the l2 norm takes a scalar or per-sample eps, not a per-element map")
        return flat[:, 0]
    return e.flatten().expand(x.shape[0]) if e.numel() == 1 else e.flatten()


def lp_norm(d: Tensor, norm: str) -> Tensor:
    flat = d.flatten(1)
    return flat.abs().amax(1) if norm == "linf" else flat.norm(p=2, dim=1)


def project(delta: Tensor, eps: Tensor, norm: str) -> Tensor:
    """Project δ onto the ε-ball (ℓ∞: elementwise box, so ε may be a per-element map; ℓ2: ball
    of per-sample radius)."""
    if norm == "linf":
        return torch.maximum(torch.minimum(delta, eps), -eps)
    if norm == "l2":
        r = per_sample(eps, delta)
        n = delta.flatten(1).norm(p=2, dim=1)
        factor = torch.clamp(r / (n + 1e-12), max=1.0)
        return delta * factor.view([-1] + [1] * (delta.dim() - 1))
    raise ValueError(f"unknown norm {norm!r}")


def ascent_direction(grad: Tensor, norm: str) -> Tensor:
    """Steepest-ascent direction of unit size: sign (ℓ∞) or normalised gradient (ℓ2)."""
    if norm == "linf":
        return grad.sign()
    n = grad.flatten(1).norm(p=2, dim=1).clamp_min(1e-12)
    return grad / n.view([-1] + [1] * (grad.dim() - 1))


def random_init(x: Tensor, eps: Tensor, norm: str, generator: torch.Generator | None = None
                ) -> Tensor:
    """A uniform random point of the ε-ball (ℓ∞: uniform in the box; ℓ2: uniform in the ball)."""
    if norm == "linf":
        u = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return (2 * u - 1) * eps
    g = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    g = g / g.flatten(1).norm(p=2, dim=1).clamp_min(1e-12).view([-1] + [1] * (x.dim() - 1))
    d = x[0].numel()
    u = torch.rand(x.shape[0], generator=generator, device=x.device, dtype=x.dtype) ** (1.0 / d)
    r = per_sample(eps, x) * u
    return g * r.view([-1] + [1] * (x.dim() - 1))


@contextlib.contextmanager
def eval_mode(model: nn.Module, train: bool = False) -> Iterator[None]:
    """Put the model in eval (or train) mode and restore every submodule's mode afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    model.train(train)
    try:
        yield
    finally:
        for m, t in modes:
            m.training = t


LAYOUTS = ("auto", "channels_last", "unchanged")


@contextlib.contextmanager
def inference_layout(model: nn.Module, x: Tensor, layout: str = "auto") -> Iterator[str]:
    """Hold a convolutional model's 4-D weights in channels-last memory order for the block, and
    yield the layout used (``"channels_last"`` or ``"unchanged"``).

    Attacks pass the model hundreds of times over small batches; on the CPU, oneDNN's
    convolution and max-pooling kernels run such batches faster on channels-last weights
    (measured in ``benchmarks/README.md``). ``"auto"`` does so on the CPU for models with 2-D
    convolutions and 4-D inputs (on CUDA it was not measured and leaves the model as it is);
    ``"channels_last"`` does so on any device; ``"unchanged"`` never does. The values are not
    touched, only their order in memory, and the model's logits on the first images of ``x``
    must agree before and after (else, or if the model fails on channels-last tensors, it is
    left unchanged). Afterwards every tensor gets back its original storage."""
    if layout not in LAYOUTS:
        raise UserError(f"unknown layout {layout!r}; use one of {', '.join(LAYOUTS)}")
    convs = any(isinstance(m, nn.Conv2d) for m in model.modules())
    wanted = layout == "channels_last" or (layout == "auto" and x.device.type == "cpu")
    tensors = [t for t in (*model.parameters(), *model.buffers())
               if t.dim() == 4 and t.is_contiguous()
               and not t.is_contiguous(memory_format=torch.channels_last)]
    if not (wanted and convs and x.dim() == 4 and tensors):
        held = any(t.dim() == 4 and not t.is_contiguous()
                   and t.is_contiguous(memory_format=torch.channels_last)
                   for t in model.parameters())
        yield "channels_last" if convs and held else "unchanged"
        return
    probe = x[:4].detach()
    kept = [(t, t.data) for t in tensors]
    try:
        with eval_mode(model), torch.no_grad():
            before = model(probe)
            for t, data in kept:
                t.data = data.contiguous(memory_format=torch.channels_last)
            after = model(probe)
        same = _logits_agree(before, after)
    except Exception:  # a model that cannot take channels-last tensors: leave it as it is
        same = False
    except BaseException:  # interrupted: restore, then stop
        for t, data in kept:
            t.data = data
        raise
    if not same:
        for t, data in kept:
            t.data = data
        kept = []
    try:
        yield "channels_last" if same else "unchanged"
    finally:
        for t, data in kept:
            t.data = data


#: "the same logits up to float rounding", for a model computed two ways (another weight layout,
#: BatchNorm folded into a convolution): the kernels then sum each layer's K products in another
#: order. In fp32 (unit roundoff u = 2^-24 ≈ 6e-8) that moves a layer's output by about √K·u
#: times the size of its terms (K·u at worst), and the moves of the layers add up: for the
#: networks attacked here (K from 9 to a few thousand, 5 to 50 layers) Σ√K·u is 1e-6 to 1e-5 of
#: the largest logit. Hence an absolute tolerance of 1e-5 × the largest logit (at least 1e-5),
#: and 1e-4 relative for the large logits, whose terms are many times their sum.
LOGIT_RTOL = 1e-4
LOGIT_ATOL_PER_SCALE = 1e-5


def logit_tolerance(logits: Tensor) -> tuple[float, float]:
    """``(rtol, atol)`` within which logits computed in another summation order still count as
    the same (see :data:`LOGIT_RTOL`)."""
    scale = float(logits.detach().abs().max()) if logits.numel() else 1.0
    return LOGIT_RTOL, LOGIT_ATOL_PER_SCALE * max(scale, 1.0)


def _logits_agree(a: Tensor, b: Tensor) -> bool:
    """Whether two models' logits on the same images are the same up to float rounding."""
    rtol, atol = logit_tolerance(a)
    return a.shape == b.shape and bool(torch.allclose(b, a, rtol=rtol, atol=atol))


def fold_batchnorm(model: nn.Module, probe: Tensor | None) -> tuple[nn.Module, int]:
    """An inference copy of ``model`` with every BatchNorm folded into the convolution before
    it, and the number folded; ``(model, 0)`` when there is none or it cannot be done.

    In eval mode a BatchNorm after a convolution is a per-channel affine map, and
    ``conv → BN`` is one convolution with rescaled weights and a bias: the same function, one
    layer fewer in every forward and backward pass (about 1.2× faster passes for a ResNet-18
    on the CPU, see ``benchmarks/README.md``). A BatchNorm is folded only where its input is a
    ``Conv2d`` output used by nothing else, found by tracing the model (``torch.fx``); a model
    that cannot be traced is left as it is, and so is one whose logits on ``probe`` change by
    more than float rounding. The copy shares every other layer (and its weights) with
    ``model``, and is for eval mode only: attacks use it, verdicts stay on ``model``."""
    from torch.nn.modules.batchnorm import _BatchNorm

    bns = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    if not bns or probe is None or not all(m.track_running_stats and m.running_mean is not None
                                           for m in bns):
        return model, 0
    try:
        import torch.fx
        from torch.nn.utils.fusion import fuse_conv_bn_eval

        gm = torch.fx.symbolic_trace(model)
        mods = dict(gm.named_modules())
        folded = 0
        for node in list(gm.graph.nodes):
            prev = node.args[0] if node.op == "call_module" and node.args else None
            if not (isinstance(mods.get(node.target), nn.BatchNorm2d)
                    and isinstance(prev, torch.fx.Node) and prev.op == "call_module"
                    and type(mods.get(prev.target)) is nn.Conv2d and len(prev.users) == 1):
                continue
            with torch.no_grad():
                fused = fuse_conv_bn_eval(copy.deepcopy(mods[prev.target]).eval(),
                                          copy.deepcopy(mods[node.target]).eval())
            parent, _, name = str(prev.target).rpartition(".")
            setattr(gm.get_submodule(parent) if parent else gm, name, fused)
            node.replace_all_uses_with(prev)
            gm.graph.erase_node(node)
            folded += 1
        if not folded:
            return model, 0
        gm.graph.lint()
        gm.recompile()
        gm.delete_all_unused_submodules()
        with eval_mode(model), eval_mode(gm), torch.no_grad():
            same = _logits_agree(model(probe[:4]), gm(probe[:4]))
    except Exception:  # untraceable (data-dependent control flow, …): leave it as it is
        return model, 0
    return (gm, folded) if same else (model, 0)


def input_grad(loss: Tensor, x: Tensor) -> Tensor:
    """∂loss/∂x without touching any parameter's ``.grad``."""
    (g,) = torch.autograd.grad(loss, [x])
    return g


class Attack:
    """Base class. Subclasses set ``Params`` and implement :meth:`perturb`.

    Call as ``attack(model, x, y, eps)``; ``step_size`` may be passed (scalar or broadcastable
    tensor) to override the attack's own step size, e.g. to scale it with a per-class ε."""

    Params: ClassVar[type[BaseModel]] = AttackParams
    norms: ClassVar[tuple[str, ...]] = ("linf", "l2")
    spec: str = ""

    def __init__(self, params: BaseModel | None = None, **kw: Any) -> None:
        self.params = params if params is not None else self.Params(**kw)
        for k, v in self.params.model_dump().items():
            setattr(self, k, v)

    @property
    def name(self) -> str:
        return self.spec or getattr(self, "registered_name", type(self).__name__.lower())

    def describe(self) -> dict[str, Any]:
        return {"attack": self.name, **self.params.model_dump()}

    def __call__(
        self, model: nn.Module, x: Tensor, y: Tensor, eps: float | Tensor,
        step_size: float | Tensor | None = None,
    ) -> Tensor:
        if getattr(self, "clip", True):
            check_unit_range(x, can_unclip="clip" in type(self.params).model_fields)
        e = as_eps(eps, x)
        with eval_mode(model), torch.enable_grad():
            x_adv = self.perturb(model, x.detach(), y, e, step_size)
        return x_adv.detach()

    def perturb(self, model: nn.Module, x: Tensor, y: Tensor, eps: Tensor,
                step_size: float | Tensor | None) -> Tensor:
        raise NotImplementedError  # abstract
