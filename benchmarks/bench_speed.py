"""Training and attack speed of robustfair against plain reference loops on the same machine.

Usage::

    python benchmarks/bench_speed.py [--quick] [--device cpu|cuda] [--model smallcnn]
                                     [--methods pgd_at trades dafa part lbgat] [--json OUT]

Three parts, printed in one run:

1. **Training images/s** of PGD-AT (Madry et al., arXiv:1706.06083), TRADES (Zhang et al.,
   arXiv:1901.08573), DAFA (Lee et al., arXiv:2401.12532), PART (Zhang et al., arXiv:2406.00685)
   and LBGAT (Cui et al., arXiv:2011.11164), measured through the real
   :class:`robustfair.engine.trainer.Trainer` (``Trainer.train_step`` over full batches, setup
   excluded), against reference loops written the way the official code of each paper is
   written: a ``DataLoader`` over a ``TensorDataset``, fp32, ``model.eval()`` and a Python loop of
   sign steps for the attack, then ``model.train()`` and the loss. Same model and initial
   weights, batch size, ε, step, number of steps and data. Where the official code does redundant
   work (TRADES and LBGAT recompute the clean logits at every attack step, PART computes its class
   activation maps one image at a time with numpy, PIL and matplotlib), a second "lean" reference
   without that work is timed too, so the ratio is not flattered by it.
2. **Attack overhead**: the time of one PGD step of ``robustfair.attacks`` divided by the time of
   one forward pass plus the backward pass to the input on the same batch (eval mode), the least
   that one step can cost (1.0).
3. With ``--device cuda``: images/s with bf16 autocast and channels-last memory
   (``train.precision=bf16``, ``train.channels_last=true``), and the achieved fraction of the
   GPU's dense bf16 peak from a FLOP count of one training step, attack included (the
   per-operator formulas of :mod:`torch.utils.flop_counter`, which count matrix products and
   convolutions only; see :class:`FlopCount`), and the number of host-device synchronisations in
   one training step (``torch.cuda.set_sync_debug_mode``).

The machine may be shared: every measurement is repeated, contenders are interleaved (measured
in turn in every round, the order reversed every other round: A B, B A, ...) so that load drift
hits all of them alike, and the medians are reported; ratios are medians of the per-round
ratios.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustfair.attacks import build_attack
from robustfair.config import RunConfig, load_config, recipe_names
from robustfair.data import DataBundle, load_data
from robustfair.engine.trainer import Trainer

METHOD_KEYS = ("pgd_at", "trades", "dafa", "part", "lbgat")

# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s from the vendors' data sheets; the
# first matching substring of torch.cuda.get_device_name() wins. Pass --peak-tflops otherwise.
BF16_PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("GH200", 989.0), ("H200", 989.0), ("H100 PCIe", 756.0), ("H100 NVL", 835.0),
    ("H100", 989.0), ("H800", 989.0), ("B200", 2250.0), ("A100", 312.0), ("A800", 312.0),
    ("L40S", 362.0), ("L40", 181.0), ("L4", 121.0), ("A10", 125.0), ("RTX 4090", 165.0),
    ("RTX 3090", 71.0), ("RTX A6000", 155.0),
)


# ------------------------------------------------------------------------------ settings


@dataclass
class Setting:
    """What every contender of one comparison shares."""

    device: torch.device
    batch_size: int
    eps: float
    step_size: float
    steps: int
    beta: float = 6.0
    eps_low: float = 0.175
    lbgat_beta: float = 0.0
    dafa_weights: Tensor | None = None


@dataclass
class MethodSpec:
    """How to configure a method in robustfair and which reference loops it is timed against."""

    key: str
    label: str
    recipe: str
    overrides: list[str]
    needs: tuple[str, str] | None  # (registry, member) that must be registered
    references: tuple[str, ...]


def method_specs(model: str, eps: float = 0.2) -> dict[str, MethodSpec]:
    """The benchmarked methods: their recipes, overrides and reference loops.

    PART's ε_low is 7/8 of ε (0.175 at ε = 0.2 as in ``part-mnist5k``; 7/255 at 8/255 as in the
    official code); LBGAT's natural model is the half-width SmallCNN of ``lbgat-mnist5k`` (the
    benchmarked model itself for other models)."""
    teacher = ("{name: smallcnn, params: {width: 0.5}}" if model == "smallcnn"
               else f"{{name: {model}, params: {{}}}}")
    return {
        "pgd_at": MethodSpec("pgd_at", "PGD-AT", "mnist5k-standard",
                             ["method.objective={name: pgd_at}"], None, ("madry",)),
        "trades": MethodSpec("trades", "TRADES", "mnist5k-trades",
                             ["method.objective={name: trades, beta: 6.0}"], None,
                             ("trades-official", "trades-lean")),
        "dafa": MethodSpec("dafa", "DAFA", "mnist5k-trades",
                           ["method.objective={name: trades, beta: 6.0}",
                            "method.policy={name: dafa, warmup: 1, lam: 1.0}"],
                           ("policy", "dafa"), ("dafa-official",)),
        "part": MethodSpec("part", "PART", "part-mnist5k",
                           ["method.objective={name: pgd_at}",
                            f"method.budget={{name: pixel, eps_low: {eps * 7 / 8}, "
                            f"cam: gradcam, mask: jet, warmup: 0, mask_source: current}}"],
                           ("budget", "pixel"), ("part-official", "part-lean")),
        "lbgat": MethodSpec("lbgat", "LBGAT", "lbgat-mnist5k",
                            [f"method.objective={{name: lbgat, alpha_mse: 1.0, beta: 0.0, "
                             f"teacher: {teacher}}}"],
                            ("objective", "lbgat"), ("lbgat-official", "lbgat-lean")),
    }


def registered(need: tuple[str, str] | None) -> bool:
    """True if the registry member a method needs exists (others may still be adding it)."""
    if need is None:
        return True
    from robustfair.budgets import BUDGETS
    from robustfair.objectives import OBJECTIVES
    from robustfair.policies import POLICIES

    reg = {"budget": BUDGETS, "objective": OBJECTIVES, "policy": POLICIES}[need[0]]
    return need[1] in reg.names()


def build_cfg(spec: MethodSpec, args: argparse.Namespace, device: str,
              precision: str = "fp32") -> RunConfig:
    """The run config of one method: its recipe, then settings common to every contender."""
    recipe = spec.recipe if spec.recipe in recipe_names() else "mnist5k-standard"
    common = [
        f"device={device}", "data.name=mnist5k", f"model.name={args.model}", "model.params={}",
        f"train.batch_size={args.batch_size}", "attack.norm=linf", f"attack.eps={args.eps}",
        f"attack.step_size={args.step_size}", f"attack.steps={args.steps}",
        "validation.every=0", "logging.progress=false", "train.ema.enabled=false",
        "train.awp.enabled=false", "train.compile=false", "deterministic=false",
        f"train.precision={precision}",
        f"train.channels_last={'true' if precision == 'bf16' else 'false'}",
    ]
    return load_config(recipe=recipe, overrides=spec.overrides + common)


# ------------------------------------------------------------------------------ timing


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def images_per_s(run: Callable[[int], None], n: int, batch: int, device: torch.device
                 ) -> tuple[float, float]:
    """Images per second of ``run(n)`` (n batches of ``batch`` images), by the wall clock and by
    the process's CPU time (the latter is steadier on a loaded machine)."""
    synchronize(device)
    t0, c0 = time.perf_counter(), time.process_time()
    run(n)
    synchronize(device)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return n * batch / wall, n * batch / max(cpu, 1e-9)


def interleaved(contenders: dict[str, Callable[[int], None]], n: int, warmup: int, repeats: int,
                batch: int, device: torch.device) -> dict[str, dict[str, list[float]]]:
    """Images/s per round of every contender after a warm-up of each, measured in turn with the
    order reversed every other round (A B, B A, A B, …) so that a drift in the machine's load
    and the position in a round fall on every contender alike."""
    for run in contenders.values():
        run(warmup)
    out: dict[str, dict[str, list[float]]] = {k: {"wall": [], "cpu": []} for k in contenders}
    for r in range(repeats):
        order = list(contenders.items())
        for k, run in order if r % 2 == 0 else order[::-1]:
            wall, cpu = images_per_s(run, n, batch, device)
            out[k]["wall"].append(wall)
            out[k]["cpu"].append(cpu)
    return out


def paired_ratio(a: list[float], b: list[float]) -> tuple[float, float, float]:
    """Median, min and max over rounds of a[r] / b[r]."""
    r = [x / y for x, y in zip(a, b, strict=True)]
    return statistics.median(r), min(r), max(r)


# ------------------------------------------------------------------------------ ours


class Ours:
    """Runs ``Trainer.train_step`` on full batches, as ``Trainer.fit`` does inside an epoch."""

    def __init__(self, trainer: Trainer, epoch: int) -> None:
        self.t = trainer
        self.t.budget.on_epoch_start(epoch, self.t.model)
        self.t.policy.on_epoch_start(epoch)
        self.t.objective.on_epoch_start(epoch)
        bs = trainer.cfg.train.batch_size
        self.batches = [b for b in trainer.sampler.epoch_batches(epoch) if len(b) == bs]
        self.stats = trainer._new_stats()  # the per-epoch statistics train_step adds to
        self.k = 0

    def __call__(self, n: int) -> None:
        for _ in range(n):
            idx = self.batches[self.k % len(self.batches)]
            self.k += 1
            self.t.train_step(idx, self.stats)
            self.t.global_step += 1


def make_trainer(cfg: RunConfig, data: DataBundle, run_dir: str) -> Trainer:
    return Trainer(cfg, run_dir, data=data, quiet=True)


def activate(spec: MethodSpec, trainer: Trainer, setting: Setting) -> int:
    """Put the method past its warm-up; returns the epoch to train in."""
    epoch = 1
    if spec.key == "dafa":
        st = trainer.policy.state_dict()
        st["weights"] = setting.dafa_weights.double().cpu()
        st["active"] = True
        trainer.policy.load_state_dict(st)
        epoch = int(st["tau"]) + 1
    if spec.key == "part":
        epoch = int(trainer.cfg.method.budget.get("warmup", 0)) + 1
    return epoch


# ------------------------------------------------------------------------------ references
# Written the way the official training scripts are written (TRADES, DAFA, LBGAT, PART and
# Madry-style PGD-AT), not with robustfair's helpers.


def data_stream(x: Tensor, y: Tensor, batch: int, device: torch.device) -> Iterator[tuple]:
    """Endless shuffled batches from a DataLoader over a TensorDataset (new epoch when empty)."""
    ds = torch.utils.data.TensorDataset(x, y)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, drop_last=True,
                                         num_workers=0, pin_memory=device.type == "cuda")
    for _ in itertools.count():
        for xb, yb in loader:
            yield xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)


def pgd_madry(model: nn.Module, x: Tensor, y: Tensor, eps: Any, alpha: float, steps: int,
              eps_start: float | None = None) -> Tensor:
    """ℓ∞ PGD on the mean cross-entropy from a uniform random start, in eval mode."""
    model.eval()
    e0 = eps if eps_start is None else eps_start
    x_adv = x.detach() + torch.empty_like(x).uniform_(-1, 1) * e0
    for _ in range(steps):
        x_adv.requires_grad_()
        with torch.enable_grad():
            loss = F.cross_entropy(model(x_adv), y)
        grad = torch.autograd.grad(loss, [x_adv])[0]
        x_adv = x_adv.detach() + alpha * torch.sign(grad.detach())
        x_adv = torch.min(torch.max(x_adv, x - eps), x + eps)
        x_adv = torch.clamp(x_adv, 0.0, 1.0)
    model.train()
    return x_adv.detach()


def trades_kl_attack(model: nn.Module, x: Tensor, eps: Any, alpha: Any, steps: int,
                     recompute: bool) -> Tensor:
    """The TRADES inner maximisation; ``recompute``: f(x) at every step as in the official code."""
    model.eval()
    kl = nn.KLDivLoss(reduction="sum")
    x_adv = x.detach() + 0.001 * torch.randn_like(x)
    if not recompute:
        with torch.no_grad():
            p_nat = F.softmax(model(x), dim=1)
    for _ in range(steps):
        x_adv.requires_grad_()
        with torch.enable_grad():
            p = F.softmax(model(x), dim=1) if recompute else p_nat
            loss_kl = kl(F.log_softmax(model(x_adv), dim=1), p)
        grad = torch.autograd.grad(loss_kl, [x_adv])[0]
        x_adv = x_adv.detach() + alpha * torch.sign(grad.detach())
        x_adv = torch.min(torch.max(x_adv, x - eps), x + eps)
        x_adv = torch.clamp(x_adv, 0.0, 1.0)
    model.train()
    return x_adv.detach()


class Reference:
    """A plain training loop of one method on its own copy of the model and optimizer."""

    def __init__(self, kind: str, trainer: Trainer, setting: Setting) -> None:
        self.kind, self.s = kind, setting
        self.model = copy.deepcopy(trainer.model).float()
        self.model = self.model.to(memory_format=torch.contiguous_format)
        params = list(self.model.parameters())
        self.teacher: nn.Module | None = None
        if kind.startswith("lbgat"):
            self.teacher = copy.deepcopy(trainer.objective.natural).float()
            params += list(self.teacher.parameters())
        o = trainer.cfg.train.optimizer
        self.opt = torch.optim.SGD(params, lr=o.lr, momentum=o.momentum,
                                   weight_decay=o.weight_decay,
                                   nesterov=o.nesterov and o.momentum > 0)
        train = trainer.data.train
        self.stream = data_stream(train.images(), train.y.cpu(), setting.batch_size,
                                  setting.device)
        self.layer: nn.Module | None = None
        if kind.startswith("part"):
            self.layer = self.model.get_submodule(self.model.feature_layer_name())
            import matplotlib

            self.jet = matplotlib.colormaps["jet"]
            self.lut = torch.tensor(self.jet(np.linspace(0, 1, 256))[:, :3], dtype=torch.float32,
                                    device=setting.device)
        self.step: Callable[[Tensor, Tensor], None] = getattr(self, "_" + kind.split("-")[0])

    def __call__(self, n: int) -> None:
        self.model.train()
        for _ in range(n):
            x, y = next(self.stream)
            self.step(x, y)

    def _update(self, loss: Tensor) -> None:
        loss.backward()
        self.opt.step()

    # -------------------------------------------------------------- the methods
    def _madry(self, x: Tensor, y: Tensor) -> None:
        s = self.s
        x_adv = pgd_madry(self.model, x, y, s.eps, s.step_size, s.steps)
        self.opt.zero_grad()
        self._update(F.cross_entropy(self.model(x_adv), y))

    def _trades(self, x: Tensor, y: Tensor) -> None:
        s, m = self.s, self.model
        official = self.kind.endswith("official")
        x_adv = trades_kl_attack(m, x, s.eps, s.step_size, s.steps, recompute=official)
        self.opt.zero_grad()
        kl = nn.KLDivLoss(reduction="sum")
        logits = m(x)
        nat = logits if not official else m(x)  # the official loss calls model(x_natural) twice
        loss_robust = (1.0 / len(x)) * kl(F.log_softmax(m(x_adv), dim=1), F.softmax(nat, dim=1))
        self._update(F.cross_entropy(logits, y) + s.beta * loss_robust)

    def _dafa(self, x: Tensor, y: Tensor) -> None:
        s, m = self.s, self.model
        w = torch.zeros(len(y), device=x.device)
        for c in range(len(s.dafa_weights)):  # the official per-class mask loop
            w[y == c] = float(s.dafa_weights[c])
        wv = w.view(-1, 1, 1, 1)
        x_adv = trades_kl_attack(m, x, s.eps * wv, s.step_size * wv, s.steps, recompute=False)
        self.opt.zero_grad()
        logits = m(x)
        kl = nn.KLDivLoss(reduction="sum")
        loss_robust = (1.0 / len(x)) * kl(F.log_softmax(m(x_adv), dim=1), F.softmax(logits, dim=1))
        loss_nat = (w * F.cross_entropy(logits, y, reduction="none")).mean()
        self._update(loss_nat + s.beta * loss_robust)

    def _lbgat(self, x: Tensor, y: Tensor) -> None:
        s, m = self.s, self.model
        x_adv = trades_kl_attack(m, x, s.eps, s.step_size, s.steps,
                                 recompute=self.kind.endswith("official"))
        self.teacher.train()
        self.opt.zero_grad()
        z_adv, z_nat, z_t = m(x_adv), m(x), self.teacher(x)
        kl = nn.KLDivLoss(reduction="sum")
        loss_kl = (1.0 / len(x)) * kl(F.log_softmax(z_adv, dim=1), F.softmax(z_nat, dim=1))
        self._update(F.mse_loss(z_adv, z_t) + F.cross_entropy(z_t, y) + s.lbgat_beta * loss_kl)

    def _part(self, x: Tensor, y: Tensor) -> None:
        s = self.s
        masks = (self._part_masks_official(x) if self.kind.endswith("official")
                 else self._part_masks_lean(x))
        w = masks.float().mean(1, keepdim=True) if x.shape[1] != 3 else masks.float()
        eps_map = s.eps_low + (s.eps - s.eps_low) * w
        x_adv = pgd_madry(self.model, x, y, eps_map, s.step_size, s.steps, eps_start=s.eps)
        self.opt.zero_grad()
        self._update(F.cross_entropy(self.model(x_adv), y))

    def _part_masks_official(self, x: Tensor) -> Tensor:
        """Jet masks (B, 3, H, W) one image at a time: GradCAM of the predicted class with a
        backward pass into the parameters, PIL bicubic upsampling, matplotlib jet, z-score."""
        from PIL import Image

        m, store = self.model, {}
        m.eval()

        def hook(_m: nn.Module, _i: Any, out: Tensor) -> None:
            store["a"] = out
            out.register_hook(lambda g: store.__setitem__("g", g))

        handle = self.layer.register_forward_hook(hook)
        h, w = x.shape[-2:]
        out = []
        try:
            for i in range(len(x)):
                scores = m(x[i:i + 1])
                c = scores.squeeze(0).argmax().item()
                m.zero_grad()
                scores[:, c].sum().backward(retain_graph=True)
                weights = store["g"].mean((2, 3), keepdim=True)
                cam = F.relu((weights * store["a"]).sum(1)).squeeze(0)
                cam = cam - cam.min()
                cam = (cam / cam.max()).detach().cpu().numpy().astype(np.float32)
                up = np.asarray(Image.fromarray(cam).resize((w, h), Image.BICUBIC))
                rgb = self.jet(up ** 2)[..., :3]
                with np.errstate(invalid="ignore", divide="ignore"):  # a flat CAM gives NaN
                    z = (rgb - rgb.mean()) / rgb.std()
                out.append(torch.from_numpy(np.ascontiguousarray(z.transpose(2, 0, 1) > 1)))
        finally:
            handle.remove()
        m.train()
        return torch.stack(out).to(x.device)

    def _part_masks_lean(self, x: Tensor) -> Tensor:
        """The same jet masks for the whole batch in one forward and one backward pass."""
        m, store = self.model, {}
        m.eval()
        handle = self.layer.register_forward_hook(lambda _m, _i, o: store.__setitem__("a", o))
        try:
            with torch.enable_grad():
                scores = m(x)
                pred = scores.argmax(1, keepdim=True)
                (g,) = torch.autograd.grad(scores.gather(1, pred).sum(), [store["a"]])
        finally:
            handle.remove()
        a = store["a"].detach()
        cam = F.relu((g.mean((2, 3), keepdim=True) * a).sum(1, keepdim=True))
        flat = cam.flatten(1)
        lo = flat.amin(1).view(-1, 1, 1, 1)
        cam = (cam - lo) / (flat.amax(1).view(-1, 1, 1, 1) - lo).clamp_min(1e-12)
        up = F.interpolate(cam, size=x.shape[-2:], mode="bicubic", align_corners=False)
        rgb = self.lut[(up.squeeze(1) ** 2).clamp(0, 1).mul(255).round().long()]
        f = rgb.flatten(1)
        z = (rgb - f.mean(1).view(-1, 1, 1, 1)) / f.std(1, unbiased=False).view(-1, 1, 1, 1)
        m.train()
        return (z > 1).permute(0, 3, 1, 2)


# ------------------------------------------------------------------------------ part 1


def bench_training(specs: list[MethodSpec], args: argparse.Namespace, device: torch.device,
                   report: dict[str, Any]) -> dict[str, Trainer]:
    """Ours vs the references for every method; returns the fp32 trainers built."""
    print(f"\n[1] training images/s, ours (Trainer.train_step) vs reference loops; "
          f"{args.repeats} interleaved rounds of {args.batches} batches after "
          f"{args.warmup} warm-up batches; median img/s, ratio = median of per-round ratios")
    print(f"    model {args.model}, mnist5k, batch {args.batch_size}, linf eps {args.eps}, "
          f"step {args.step_size}, {args.steps} attack steps, fp32, device {device}")
    print(f"    {'method':<8} {'reference':<16} {'ours img/s':>10} {'ref img/s':>10} "
          f"{'ratio':>7} {'min-max':>12} {'ratio by CPU s':>15}")
    trainers: dict[str, Trainer] = {}
    datas: dict[str, DataBundle] = {}
    for spec in specs:
        if not registered(spec.needs):
            print(f"    {spec.label:<8} skipped: {spec.needs[0]} {spec.needs[1]!r} is not "
                  f"registered in this checkout")
            report["training"][spec.key] = {"skipped": f"{spec.needs[1]} not registered"}
            continue
        cfg = build_cfg(spec, args, device.type)
        key = cfg.data.model_dump_json()
        if key not in datas:
            datas[key] = load_data(cfg.data)
        trainer = make_trainer(cfg, datas[key], args.tmp)
        setting = make_setting(cfg, args, device, trainer)
        references = {r: Reference(r, trainer, setting) for r in spec.references}
        ours = Ours(trainer, activate(spec, trainer, setting))
        res = interleaved({"ours": ours, **references}, args.batches, args.warmup,
                          args.repeats, args.batch_size, device)
        trainers[spec.key] = trainer
        report["training"][spec.key] = res
        for r in spec.references:
            med, lo, hi = paired_ratio(res["ours"]["wall"], res[r]["wall"])
            cpu = paired_ratio(res["ours"]["cpu"], res[r]["cpu"])[0]
            print(f"    {spec.label:<8} {r:<16} {statistics.median(res['ours']['wall']):>10.1f} "
                  f"{statistics.median(res[r]['wall']):>10.1f} {med:>6.2f}x {lo:>5.2f}-{hi:.2f}x "
                  f"{cpu:>14.2f}x")
    return trainers


def make_setting(cfg: RunConfig, args: argparse.Namespace, device: torch.device,
                 trainer: Trainer) -> Setting:
    c = trainer.data.num_classes
    budget = cfg.method.budget
    obj = cfg.method.objective
    return Setting(
        device=device, batch_size=cfg.train.batch_size, eps=cfg.attack.eps,
        step_size=cfg.attack.step_size, steps=cfg.attack.steps,
        beta=float(obj.get("beta", 6.0)), eps_low=float(budget.get("eps_low", cfg.attack.eps)),
        lbgat_beta=float(obj.get("beta", 0.0)),
        dafa_weights=torch.linspace(0.8, 1.2, c, dtype=torch.float64),  # Σ W = C, as DAFA's
    )


# ------------------------------------------------------------------------------ part 2


def bench_attack(args: argparse.Namespace, device: torch.device, data: DataBundle,
                 report: dict[str, Any]) -> None:
    """One PGD step of robustfair vs one forward + input-backward pass (the floor)."""
    from robustfair.models import build_model

    torch.manual_seed(0)
    model = build_model(args.model, data.in_channels, data.num_classes, data.image_size,
                        data.mean, data.std).to(device).eval()
    idx = torch.arange(args.batch_size)
    x = data.train.images(idx).to(device)
    y = data.train.y[idx].to(device)
    k = max(2, args.attack_steps)
    pgd_k = build_attack(f"pgd{k}", "linf", args.step_size)
    pgd_1 = build_attack("pgd1", "linf", args.step_size)
    kl_k = build_attack(f"trades-kl{k}", "linf", args.step_size)

    def floor() -> None:
        xr = x.clone().requires_grad_(True)
        torch.autograd.grad(F.cross_entropy(model(xr), y, reduction="sum"), [xr])

    def train_fb() -> None:
        model.train()
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        model.eval()

    def official() -> None:
        pgd_madry(model, x, y, args.eps, args.step_size, k)
        model.eval()

    # (function, attack steps per call, calls per measurement): about k steps each
    contenders: dict[str, tuple[Callable[[], Any], int, int]] = {
        "floor: fwd + input bwd": (floor, 1, k),
        f"ours pgd{k}": (lambda: pgd_k(model, x, y, args.eps), k, 1),
        "ours pgd1": (lambda: pgd_1(model, x, y, args.eps), 1, k),
        f"ours trades-kl{k}": (lambda: kl_k(model, x, y, args.eps), k, 1),
        f"official-style pgd{k}": (official, k, 1),
        "train fwd + bwd (params)": (train_fb, 1, k),
    }
    times: dict[str, dict[str, list[float]]] = {c: {"wall": [], "cpu": []} for c in contenders}
    for fn, _, _ in contenders.values():
        fn()
    for r in range(args.attack_repeats):
        order = list(contenders.items())
        for c, (fn, steps, calls) in order if r % 2 == 0 else order[::-1]:
            synchronize(device)
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(calls):
                fn()
            synchronize(device)
            times[c]["wall"].append((time.perf_counter() - t0) / (calls * steps))
            times[c]["cpu"].append((time.process_time() - c0) / (calls * steps))
    _print_attack(times, k, args, device)
    report["attack"] = {"seconds_per_step": times, "steps": k}


def _print_attack(times: dict[str, dict[str, list[float]]], k: int, args: argparse.Namespace,
                  device: torch.device) -> None:
    fl = "floor: fwd + input bwd"
    print(f"\n[2] attack overhead: time of one attack step / time of one forward pass + backward "
          f"to the input (eval mode, no update: 1.00 is the floor); batch {args.batch_size}, "
          f"{args.model}, device {device}; {args.attack_repeats} interleaved rounds, medians of "
          f"per-round ratios")
    print(f"    {'contender':<26} {'ms/step':>8} {'x floor':>8} {'x floor by CPU s':>17}")
    rows = dict(times)
    rows["ours pgd, marginal step"] = {
        m: [(a * k - b) / (k - 1) for a, b in
            zip(times[f"ours pgd{k}"][m], times["ours pgd1"][m], strict=True)]
        for m in ("wall", "cpu")}
    for c, t in rows.items():
        ratio = paired_ratio(t["wall"], times[fl]["wall"])[0]
        cpu = paired_ratio(t["cpu"], times[fl]["cpu"])[0]
        print(f"    {c:<26} {statistics.median(t['wall']) * 1e3:>8.2f} {ratio:>7.2f}x "
              f"{cpu:>16.2f}x")
    print(f"    (marginal step = (t(pgd{k}) - t(pgd1)) / {k - 1}: one more step without the "
          f"per-call set-up: random start, mode switch, ε broadcast)")


# ------------------------------------------------------------------------------ part 3


def peak_tflops(args: argparse.Namespace, device: torch.device) -> tuple[float | None, str]:
    name = torch.cuda.get_device_name(device)
    if args.peak_tflops is not None:
        return args.peak_tflops, name
    for key, tf in BF16_PEAK_TFLOPS:
        if key in name:
            return tf, name
    return None, name


class FlopCount:
    """Counts the FLOPs of matrix products and convolutions, forward and backward, with the
    formulas of :mod:`torch.utils.flop_counter`.

    ``FlopCounterMode`` itself cannot be used around a training step here: its module tracker
    hooks the backward pass and makes ``torch.autograd.grad`` on a leaf input (the attack's
    gradient) fail (torch 2.x: "A leaf node was passed to _will_engine_execute_node"); this mode
    applies the same per-operator formulas without the module tracking.
    """

    def __init__(self) -> None:
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils.flop_counter import flop_registry

        counter = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore
                kwargs = kwargs or {}
                out = func(*args, **kwargs)
                formula = flop_registry.get(func._overloadpacket)
                if formula is not None:
                    counter.total += int(formula(*args, **kwargs, out_val=out))
                return out

        self.total = 0
        self.mode = _Mode()

    def __enter__(self) -> FlopCount:
        self.mode.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.mode.__exit__(*exc)


def step_flops(ours: Ours) -> int:
    """FLOPs (matrix products and convolutions) of one training step, attack included."""
    with FlopCount() as counter:
        ours(1)
    return counter.total


def sync_count(ours: Ours) -> int:
    """Host-device synchronisations in one training step (CUDA's sync debug mode)."""
    import warnings

    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ours(1)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def bench_cuda(specs: list[MethodSpec], args: argparse.Namespace, device: torch.device,
               fp32: dict[str, Any], report: dict[str, Any]) -> None:
    """bf16 autocast + channels-last through the Trainer, and the fraction of the bf16 peak."""
    peak, name = peak_tflops(args, device)
    print(f"\n[3] {name}: bf16 autocast + channels-last (train.precision=bf16, "
          f"train.channels_last=true), interleaved with ours fp32; FLOPs of one step with "
          f"torch.utils.flop_counter's formulas (matmul/conv only); dense bf16 peak "
          f"{'unknown (pass --peak-tflops)' if peak is None else f'{peak:.0f} TFLOP/s'}; "
          f"syncs/step: host-device synchronisations in one step (torch.cuda sync debug mode)")
    print(f"    {'method':<8} {'bf16 img/s':>10} {'fp32 img/s':>10} {'speedup':>8} "
          f"{'GFLOP/step':>10} {'TFLOP/s':>8} {'of peak':>8} {'syncs/step':>10}")
    for spec in specs:
        if spec.key not in fp32 or not registered(spec.needs):
            continue
        cfg = build_cfg(spec, args, device.type, precision="bf16")
        trainer = make_trainer(cfg, fp32[spec.key].data, args.tmp)
        setting = make_setting(cfg, args, device, trainer)
        bf16 = Ours(trainer, activate(spec, trainer, setting))
        base_t = fp32[spec.key]
        base = Ours(base_t, activate(spec, base_t, setting))
        res = interleaved({"bf16": bf16, "fp32": base}, args.batches, args.warmup,
                          args.repeats, args.batch_size, device)
        flops = step_flops(bf16)
        syncs = sync_count(bf16)
        ips = statistics.median(res["bf16"]["wall"])
        achieved = flops * ips / args.batch_size / 1e12
        frac = f"{100 * achieved / peak:>7.2f}%" if peak else "     n/a"
        speed = paired_ratio(res["bf16"]["wall"], res["fp32"]["wall"])[0]
        print(f"    {spec.label:<8} {ips:>10.0f} {statistics.median(res['fp32']['wall']):>10.0f} "
              f"{speed:>7.2f}x {flops / 1e9:>10.2f} {achieved:>8.2f} {frac} {syncs:>10d}")
        report["cuda"][spec.key] = {**res, "flops_per_step": flops, "tflops": achieved,
                                    "peak_tflops": peak, "device_name": name,
                                    "syncs_per_step": syncs}


# ------------------------------------------------------------------------------ main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="one batch per measurement, 7 rounds, a "
                   "5-step attack benchmark (minutes on 2 free CPU cores)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--model", default="smallcnn", help="registered model name")
    p.add_argument("--methods", nargs="+", choices=METHOD_KEYS, default=list(METHOD_KEYS))
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--eps", type=float, default=0.2)
    p.add_argument("--step-size", type=float, default=0.05)
    p.add_argument("--steps", type=int, default=5, help="training attack steps")
    p.add_argument("--batches", type=int, default=None, help="batches per measurement")
    p.add_argument("--attack-repeats", type=int, default=None, help="rounds of part 2")
    p.add_argument("--repeats", type=int, default=None, help="interleaved rounds")
    p.add_argument("--warmup", type=int, default=None, help="warm-up batches per contender")
    p.add_argument("--attack-steps", type=int, default=None, help="K of the attack benchmark")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="dense bf16 peak of the GPU (default: from a table of known GPUs)")
    p.add_argument("--skip-training", action="store_true", help="only the attack benchmark")
    p.add_argument("--json", default=None, help="also write all measurements to this file")
    a = p.parse_args(argv)
    quick = {"batches": 1, "repeats": 7, "warmup": 1, "attack_repeats": 5, "attack_steps": 5}
    full = {"batches": 4, "repeats": 11, "warmup": 3, "attack_repeats": 11, "attack_steps": 10}
    for k, v in (quick if a.quick else full).items():
        if getattr(a, k, None) is None:
            setattr(a, k, v)
    return a


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but CUDA is not available here; use --device cpu",
              file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"robustfair speed benchmark: torch {torch.__version__}, {platform.machine()}, "
          f"{torch.get_num_threads()} threads, {os.cpu_count()} cores, load average {load:.1f}"
          f"{', quick mode' if args.quick else ''}")
    if load > (os.cpu_count() or 1):
        print(f"    note: the machine is overloaded (load {load:.1f} on {os.cpu_count()} cores); "
              f"absolute images/s are not representative, the ratios are the result")
    print("    contenders are interleaved: measured in turn in every round, the order reversed "
          "every other round (A B, B A, ...), so that load drift from other users of the "
          "machine hits them alike; medians over rounds")
    report: dict[str, Any] = {"args": vars(args).copy(), "training": {}, "attack": {},
                              "cuda": {}, "torch": torch.__version__}
    specs = [method_specs(args.model, args.eps)[k] for k in args.methods]
    with tempfile.TemporaryDirectory() as tmp:
        args.tmp = tmp
        trainers: dict[str, Trainer] = {}
        if not args.skip_training:
            trainers = bench_training(specs, args, device, report)
        data = (next(iter(trainers.values())).data if trainers else
                load_data(load_config(recipe="mnist5k-standard").data))
        bench_attack(args, device, data, report)
        if device.type == "cuda" and trainers:
            bench_cuda(specs, args, device, trainers, report)
    report["args"].pop("tmp", None)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
