"""The training engine: one loop for every method.

sampler → batch → budget(x, y) = ε → objective(model, x, y, ε) → per-sample terms
→ policy.combine · weights(y) → mean → optimizer step; at the epoch end: validation per class →
policy / sampler updates → atomic checkpoint → one log line."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .. import __version__
from ..budgets import BUDGETS
from ..config import RunConfig, dump_config
from ..data import DataBundle, augment_batch, load_data
from ..data.core import stratified_holdout
from ..errors import UserError
from ..models import build_model
from ..objectives import OBJECTIVES, BuildContext
from ..policies import POLICIES, EpochContext
from ..samplers import SAMPLERS
from ..weights import WEIGHTS
from . import distributed
from .evaluator import EvalResult, evaluate
from .io import (
    append_line,
    atomic_write_text,
    finish_interrupted_save,
    load_checkpoint,
    make_dir,
    read_jsonl,
    save_with_sidecar,
    sha256_file,
)
from .progress import EvalProgress
from .schedule import lr_at

log = logging.getLogger("robustfair")


def settle_checkpoints(run_dir: Path) -> None:
    """Make a run's checkpoint folder whole after a kill: drop temporary files of an interrupted
    write and complete (or drop) an interrupted checkpoint save (see ``save_with_sidecar``)."""
    ckdir = Path(run_dir) / "checkpoints"
    if not ckdir.exists():
        return
    for tmp in ckdir.glob(".*.tmp"):
        tmp.unlink(missing_ok=True)
    for name in ("last.pt", "best.pt"):
        finish_interrupted_save(ckdir / name)


class TrainingDiverged(UserError):
    """The loss became NaN or infinite."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device={name!r} but CUDA is not available here; use device=cpu or auto")
    return torch.device(name)


def step_seed(seed: int, global_step: int) -> int:
    return (seed * 2_654_435_761 + global_step * 40_503 + 12_345) % (2**63 - 1)


@contextlib.contextmanager
def determinism(enabled: bool) -> Iterator[None]:
    """Deterministic kernels while the block runs (or cuDNN's autotuner, when not ``enabled``);
    the process's own settings again afterwards, so a run trained from Python leaves no global
    switch behind it."""
    cudnn = torch.backends.cudnn
    saved = (torch.are_deterministic_algorithms_enabled(),
             torch.is_deterministic_algorithms_warn_only_enabled(), cudnn.benchmark,
             cudnn.deterministic, os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        cudnn.benchmark, cudnn.deterministic = False, True
    else:
        cudnn.benchmark = True
    try:
        yield
    finally:
        det, warn_only, cudnn.benchmark, cudnn.deterministic, workspace = saved
        torch.use_deterministic_algorithms(det, warn_only=warn_only)
        if workspace is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
        else:
            os.environ["CUBLAS_WORKSPACE_CONFIG"] = workspace


class EMA:
    """Exponential moving average of parameters and buffers (model weight averaging)."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for k, v in model.state_dict().items():
            s = self.shadow[k]
            if v.dtype.is_floating_point:
                s.mul_(self.decay).add_(v.detach(), alpha=1 - self.decay)
            else:
                s.copy_(v)

    def state_dict(self) -> dict[str, Tensor]:
        return self.shadow

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        for k, v in state.items():
            self.shadow[k].copy_(v)

    def copy_into(self, model: nn.Module) -> nn.Module:
        m = copy.deepcopy(model)
        m.load_state_dict(self.shadow)
        return m


def make_optimizer(cfg: Any, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    o = cfg.optimizer
    if o.name == "sgd":
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov and
                               o.momentum > 0, weight_decay=o.weight_decay)
    if o.name == "adam":
        return torch.optim.Adam(params, lr=o.lr, weight_decay=o.weight_decay)
    return torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay)


class Trainer:
    """Builds every part of a run from a :class:`RunConfig` and trains it in ``run_dir``."""

    def __init__(self, cfg: RunConfig, run_dir: str | Path, data: DataBundle | None = None,
                 quiet: bool = False) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.quiet = quiet or not cfg.logging.progress
        self.rank, self.world, ddp_device = distributed.init(cfg.device)
        self.is_main = self.rank == 0
        self.device = ddp_device if ddp_device is not None else resolve_device(cfg.device)
        if not self.is_main:  # only rank 0 draws progress bars
            self.quiet = True
        torch.manual_seed(cfg.seed)
        self.data = data if data is not None else load_data(cfg.data)
        self._build()

    # ------------------------------------------------------------------ construction
    def _build(self) -> None:
        cfg, d = self.cfg, self.data
        counts = torch.bincount(d.train.y, minlength=d.num_classes).tolist()
        self.ctx = BuildContext(
            num_classes=d.num_classes, in_channels=d.in_channels, image_size=d.image_size,
            norm=cfg.attack.norm, eps=cfg.attack.eps, step_size=cfg.attack.step_size,
            steps=cfg.attack.steps, num_groups=d.num_groups, train_size=len(d.train),
            device=self.device, build_model=self.build_model, bounded=d.bounded,
            extra={"class_counts": counts, "data": d, "seed": cfg.seed,
                   "batch_size": cfg.train.batch_size, "epochs": cfg.train.epochs,
                   "objective": dict(cfg.method.objective)},
        )
        torch.manual_seed(cfg.seed)
        self.model = self.build_model(cfg.model.name, **cfg.model.params).to(self.device)
        if cfg.train.sync_bn and self.world > 1:
            self.model = distributed.convert_sync_batchnorm(self.model)
        m = cfg.method
        self.objective = OBJECTIVES.build(m.objective, ctx=self.ctx).to(self.device)
        self.budget = BUDGETS.build(m.budget, ctx=self.ctx)
        self.weights = WEIGHTS.build(m.weights, ctx=self.ctx)
        self.policy = POLICIES.build(m.policy, ctx=self.ctx)
        on_device = cfg.data.on_device
        self.train_data = d.train.to(self.device) if on_device else d.train
        self.sampler = SAMPLERS.build(m.sampler, data=self.train_data,
                                      batch_size=cfg.train.batch_size, seed=cfg.seed, ctx=self.ctx)
        if cfg.train.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        params = list(self.model.parameters()) + list(self.objective.parameters())
        self.optimizer = make_optimizer(cfg.train, params)
        self.ema = EMA(self.model, cfg.train.ema.decay) if cfg.train.ema.enabled else None
        self.awp = None
        if cfg.train.awp.enabled:
            from .awp import AWP

            self.awp = AWP(self.model, cfg.train.awp.gamma, self.build_model_like)
        self.forward_model: nn.Module = self.model
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.forward_model = DDP(self.model, device_ids=ids)
            if any(p.requires_grad for p in self.objective.parameters()):
                self.objective_ddp = DDP(self.objective, device_ids=ids,
                                         find_unused_parameters=True)
        if cfg.train.compile:
            self.forward_model = torch.compile(self.forward_model)  # type: ignore[assignment]
        self.epoch = 0
        self.step_in_epoch = 0
        self.global_step = 0
        self.best_metric = -1.0
        self.last_val: dict[str, Any] = {}
        self._stats_stash: dict[str, Tensor] | None = None
        self._resumed_stats: dict[str, Tensor] | None = None
        self._adv_seen = False

    def build_model(self, name: str, **params: Any) -> nn.Module:
        d = self.data
        return build_model(name, d.in_channels, d.num_classes, d.image_size, d.mean, d.std,
                           **params)

    def build_model_like(self) -> nn.Module:
        return self.build_model(self.cfg.model.name, **self.cfg.model.params).to(self.device)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {
            "format": "robustfair-checkpoint",
            "version": __version__,
            "model_name": self.cfg.model.name,
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "global_step": self.global_step,
            "best_metric": self.best_metric,
            "model": self.model.state_dict(),
            "objective": self.objective.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "budget": self.budget.state_dict(),
            "policy": self.policy.state_dict(),
            "sampler": self.sampler.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "config": dump_config(self.cfg),
            "metrics": json.loads(json.dumps(self.last_val, default=float)),
            "epoch_stats": self._stats_stash,
        }

    def load_state_dict(self, st: dict[str, Any]) -> None:
        if st.get("format") != "robustfair-checkpoint":
            raise UserError("this file is not a robustfair training checkpoint; use "
                            "'robustfair eval --checkpoint' for plain model weights")
        if st.get("model_name") != self.cfg.model.name:
            raise UserError(f"the checkpoint is of model {st.get('model_name')!r} but the config "
                            f"says {self.cfg.model.name!r}; use the matching config")
        for part in ("model", "objective"):
            module = getattr(self, part)
            problem = state_mismatch(module.state_dict(), st[part])
            if problem:
                raise UserError(f"the checkpoint does not fit this {part} ({problem}); use the "
                                f"config it was trained with")
            module.load_state_dict(st[part])
        self.optimizer.load_state_dict(st["optimizer"])
        self.budget.load_state_dict(st["budget"])
        self.policy.load_state_dict(st["policy"])
        self.sampler.load_state_dict(st["sampler"])
        if self.ema is not None and st.get("ema") is not None:
            self.ema.load_state_dict(st["ema"])
        self.epoch = int(st["epoch"])
        self.step_in_epoch = int(st["step_in_epoch"])
        self.global_step = int(st["global_step"])
        self.best_metric = float(st["best_metric"])
        self.last_val = st.get("metrics") or {}
        es = st.get("epoch_stats")
        self._resumed_stats = ({k: v.to(self.device) for k, v in es.items()}
                               if es is not None and self.step_in_epoch else None)
        if self.rank != 0:  # the checkpoint's sums are whole: the first process continues them
            self._resumed_stats = None
            for t in self._process_sums():
                t.zero_()

    def save(self, name: str, is_best: bool = False) -> Path:
        """Write checkpoints/NAME.pt and its JSON; ``is_best``: this epoch's end is the best so
        far (best.pt is copied from it next, and again on resume if a kill came in between)."""
        path = self.run_dir / "checkpoints" / f"{name}.pt"
        buf = io.BytesIO()
        torch.save(self.state_dict(), buf)
        save_with_sidecar(path, buf.getvalue(), {
            "version": __version__, "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch, "global_step": self.global_step,
            "model": self.cfg.model.name, "dataset": self.cfg.data.name,
            "metrics": self.last_val, "is_best": is_best,
        })
        return path

    def _copy_best(self) -> None:
        """best.pt and best.json become copies of last.pt and last.json (as one pair)."""
        ck = self.run_dir / "checkpoints"
        meta = json.loads((ck / "last.json").read_text(encoding="utf-8"))
        save_with_sidecar(ck / "best.pt", (ck / "last.pt").read_bytes(), meta)

    def resume(self) -> bool:
        """Load ``checkpoints/last.pt`` (hash-checked) and make the run directory agree with it:
        drop temporary files of an interrupted write and log lines newer than the checkpoint."""
        from .integrity import verify_checkpoint

        ckdir = self.run_dir / "checkpoints"
        if self.is_main:
            settle_checkpoints(self.run_dir)
        path = ckdir / "last.pt"
        if not path.exists():
            self._repair_log(0)
            return False
        verify_checkpoint(path)
        self.load_state_dict(load_checkpoint(path, map_location=self.device))
        self._repair_log(self.epoch)
        if self.is_main and self._best_copy_missed(ckdir):
            self._copy_best()
        return True

    @staticmethod
    def _best_copy_missed(ckdir: Path) -> bool:
        """Whether last.pt is an epoch's best end whose copy to best.pt a kill prevented."""
        try:
            last = json.loads((ckdir / "last.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return False
        if not last.get("is_best") or last.get("step_in_epoch"):
            return False
        try:
            best = json.loads((ckdir / "best.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return True
        return best.get("sha256") != last.get("sha256")

    def _repair_log(self, epoch: int) -> None:
        """Keep only complete log lines of epochs up to ``epoch`` (a kill can tear the last)."""
        log_path = self.run_dir / "log.jsonl"
        if not log_path.exists():
            return
        read_jsonl(log_path)  # a damaged line (not a torn last one) is refused
        keep = []
        for line in log_path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict) and int(rec.get("epoch", 0)) <= epoch:
                keep.append(line)
        atomic_write_text(log_path, "".join(k + "\n" for k in keep))

    # ------------------------------------------------------------------ training
    def eval_model(self) -> nn.Module:
        return self.objective.eval_model(self.model)

    def _batch(self, idx: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        d = self.train_data
        idx_d = idx.to(d.y.device)
        x = d.images(idx_d).to(self.device, non_blocking=True)
        y = d.y[idx_d].to(self.device, non_blocking=True)
        g = torch.Generator().manual_seed(step_seed(self.cfg.seed, self.global_step) + 1)
        x = augment_batch(x, self.data.augment, g)
        if self.cfg.train.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, y, idx_d

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.cfg.train.precision == "bf16":  # CUDA, or CPU autocast
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def train_step(self, idx: Tensor, stats: dict[str, Tensor]) -> Tensor:
        cfg = self.cfg
        torch.manual_seed(step_seed(cfg.seed, self.global_step))
        global_size = len(idx)
        if self.world > 1:
            idx = distributed.shard(idx)
        x, y, idx_d = self._batch(idx)
        model = self.forward_model
        model.train()
        self.objective.train()
        eps = self.budget(self.model, x, y, cfg.attack.eps)
        step = torch.full_like(eps.flatten(1)[:, :1], cfg.attack.step_size).view(
            (-1,) + (1,) * (x.dim() - 1))
        scale = self.policy.eps_scale(y)
        if scale is not None:
            s = scale.to(x.dtype).view((-1,) + (1,) * (x.dim() - 1))
            eps = eps * s
            step = self.policy.attack_step(step, s, eps)
        if self.awp is not None and self.epoch >= cfg.train.awp.warmup:
            self.awp.perturb(self.model, self.objective, x, y, eps, step, self.policy)
        objective = getattr(self, "objective_ddp", self.objective)
        with self._autocast():
            out = objective(model, x, y, eps, step)
            per = self.policy.combine(out, y) * self.weights(y)
            # the sum over the global batch / its size: equal to a single process's mean
            loss = per.float().sum() * (self.world / global_size)
        if self.world > 1:
            check = distributed.all_reduce_sum(loss.detach().clone().reshape(1))
        else:
            check = loss
        if not bool(torch.isfinite(check).all()):
            last = self.run_dir / "checkpoints" / "last.pt"
            where = str(last) if last.exists() else "none yet"
            raise TrainingDiverged(
                f"the loss became {float(loss.detach())} at epoch {self.epoch + 1}, step "
                f"{self.step_in_epoch + 1} (global step {self.global_step + 1}); the run stopped; "
                f"last good checkpoint: {where}; lower the learning rate and resume"
            )
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.train.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.train.grad_clip)
        self.optimizer.step()
        if self.awp is not None:
            self.awp.restore(self.model)
        self._sync_buffers()
        if self.ema is not None:
            self.ema.update(self.model)
        with torch.no_grad():
            c = self.data.num_classes
            stats["count"] += torch.bincount(y, minlength=c)
            stats["loss"] += per.detach().float().sum()
            if out.logits_clean is not None:
                stats["clean_correct"] += torch.bincount(
                    y, weights=(out.logits_clean.argmax(1) == y).float(), minlength=c)
            if out.logits_adv is not None:
                self._adv_seen = True
                stats["adv_correct"] += torch.bincount(
                    y, weights=(out.logits_adv.argmax(1) == y).float(), minlength=c)
        if "train_batches" in self.policy.needs:
            self.policy.observe(x, y, out, idx_d)
        return loss.detach()

    def _new_stats(self) -> dict[str, Tensor]:
        c = self.data.num_classes
        z = lambda: torch.zeros(c, device=self.device)  # noqa: E731
        return {"count": torch.zeros(c, device=self.device, dtype=torch.long),
                "clean_correct": z(), "adv_correct": z(),
                "loss": torch.zeros((), device=self.device)}

    def validate(self) -> dict[str, Any]:
        cfg = self.cfg
        val = self.data.val
        if len(val) == 0 or cfg.validation.every == 0:
            return {}
        if cfg.validation.n is not None and cfg.validation.n < len(val):
            val = stratified_holdout(val, cfg.validation.n)[1]
        attacks = ["clean"] + ([cfg.validation.attack] if cfg.attack.eps > 0 else [])
        res = self._evaluate_with_bar(val, attacks, f"epoch {self.epoch} validation")
        s = res.summary()["attacks"]
        out = {"clean": _brief(s["clean"])}
        if len(attacks) > 1:
            out["robust"] = _brief(s[res.attacks[1]])
            out["robust_attack"] = res.attacks[1]
        return out

    def _evaluate_with_bar(self, data: Any, attacks: list[str], desc: str) -> EvalResult:
        """:func:`evaluate` on the training attack's ε, with a bar that moves per attack
        iteration (none when quiet)."""
        cfg = self.cfg
        with EvalProgress(len(data), attacks, desc, cfg.attack.norm, self.quiet) as bar:
            return evaluate(bar.wrap(self.eval_model()), data, attacks, cfg.attack.eps,
                            cfg.attack.norm, self.data.num_classes, cfg.eval.batch_size,
                            device=self.device, seed=cfg.seed, progress=bar.batch_done,
                            bounded=self.data.bounded)

    def _epoch_context(self, stats: dict[str, Tensor]) -> EpochContext:
        cache: dict[str, EvalResult] = {}
        cfg = self.cfg

        def ev(spec: str) -> EvalResult:
            if spec not in cache:
                cache[spec] = self._evaluate_with_bar(self.data.val, ["clean", spec],
                                                      f"epoch {self.epoch} {spec} for the policy")
            return cache[spec]

        return EpochContext(self.epoch, cfg.train.epochs, self.model, self.data.num_classes,
                            self.device, ev, {k: v.detach().cpu() for k, v in stats.items()},
                            {"attack": cfg.attack})

    def fit(self, resume: bool = False) -> None:
        cfg = self.cfg
        if resume and self.resume() and not self.quiet:
            log.info("resumed at epoch %d step %d", self.epoch, self.step_in_epoch)
        writer = self._tensorboard()
        log_path = self.run_dir / "log.jsonl"
        try:
            with determinism(cfg.deterministic):
                while self.epoch < cfg.train.epochs:
                    self._run_epoch(log_path, writer)
        finally:
            if writer is not None:
                writer.close()

    def _run_epoch(self, log_path: Path, writer: Any) -> None:
        cfg = self.cfg
        e = self.epoch + 1
        lr = lr_at(cfg.train.schedule, cfg.train.optimizer.lr, e, cfg.train.epochs)
        for gp in self.optimizer.param_groups:
            gp["lr"] = lr
        self.budget.on_epoch_start(e, self.model)
        self.policy.on_epoch_start(e)
        self.objective.on_epoch_start(e)
        batches = self.sampler.epoch_batches(e)
        self.sampler.on_epoch_start(e, self.model)
        stats = self._new_stats()
        if self.step_in_epoch:
            stats = self._restore_stats()
        t0 = time.perf_counter()
        seen = 0
        self._adv_seen = False  # no adversarial logits (standard training): no adv accuracy
        bar = None
        if not self.quiet:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(batches), initial=self.step_in_epoch,
                       desc=f"{cfg.name} epoch {e}/{cfg.train.epochs}", unit="batch",
                       leave=False, dynamic_ncols=True)
        for k in range(self.step_in_epoch, len(batches)):
            idx = batches[k]
            self.train_step(idx, stats)
            seen += len(idx)
            self.global_step += 1
            self.step_in_epoch = k + 1
            self.sampler.on_step(self.global_step, self.model)
            if bar is not None:
                dt = time.perf_counter() - t0
                bar.set_postfix_str(f"{seen / max(dt, 1e-9):.0f} img/s", refresh=False)
                bar.update(1)
            every = cfg.train.checkpoint_every_steps
            if every and self.global_step % every == 0 and self.step_in_epoch < len(batches):
                self._gather_sums(list(stats.values()))
                self._stash_stats(stats)
                if self.is_main:
                    self.save("last")
        if bar is not None:
            bar.close()
        train_time = time.perf_counter() - t0
        if self.world > 1:
            for v in stats.values():
                distributed.all_reduce_sum(v)
        self.epoch = e
        self.step_in_epoch = 0
        val = self.validate() if cfg.validation.every and e % cfg.validation.every == 0 else {}
        self.last_val = val
        self.policy.on_epoch_end(self._epoch_context(stats))
        self.sampler.on_epoch_end(self._epoch_context(stats))
        self._stash_stats(None)
        metric = val.get("robust", val.get("clean", {})).get("avg", -1.0) if val else -1.0
        cnt = stats["count"].clamp_min(1).float()
        line = {
            "epoch": e, "lr": lr, "global_step": self.global_step,
            "train_loss": float(stats["loss"] / cnt.sum()),
            "train_clean_acc": float(stats["clean_correct"].sum() / cnt.sum()),
            "train_adv_acc": (float(stats["adv_correct"].sum() / cnt.sum())
                              if self._adv_seen or bool(stats["adv_correct"].any()) else None),
            # images trained by this process since the epoch (re)started, over that time
            "images_per_s": seen / max(train_time, 1e-9),
            "time_s": train_time,
            "val": val,
        }
        if line["train_adv_acc"] is None:
            del line["train_adv_acc"]
        pol, smp = self.policy.log(), self.sampler.log()
        if pol:
            line["policy"] = pol
        if smp:
            line["sampler"] = smp
        is_best = metric >= self.best_metric
        if is_best:
            self.best_metric = metric
        self._gather_sums([])
        if self.is_main:
            # the log line first, then the checkpoint: a kill in between re-runs this epoch
            append_line(log_path, json.dumps(line, default=float))
            self.save("last", is_best=is_best)
            if is_best:
                self._copy_best()
        if writer is not None:
            _tb_write(writer, line, e)
        if not self.quiet:
            msg = f"epoch {e}/{cfg.train.epochs} loss {line['train_loss']:.4f}"
            if val:
                msg += f" | val clean {val['clean']['avg']:.3f}"
                if "robust" in val:
                    msg += (f" {val['robust_attack']} {val['robust']['avg']:.3f} "
                            f"(worst class {val['robust']['worst']:.3f})")
            msg += f" | {line['images_per_s']:.0f} img/s"
            log.info(msg)

    def _sync_buffers(self) -> None:
        """Under torchrun: every process takes the first process's model buffers (BatchNorm
        running statistics, which each process updates from its own share of the batch unless
        ``train.sync_bn``), so that every process - its budget, policy, sampler probes,
        validation and evaluation - uses the model that the first process checkpoints."""
        if self.world <= 1:
            return
        bufs = list(self.model.buffers())
        if hasattr(self, "objective_ddp"):  # its DDP wrapper treats them the same way
            bufs += list(self.objective.buffers())
        distributed.broadcast_from_first(bufs)

    def _process_sums(self) -> list[Tensor]:
        return self.objective.process_sums() + self.policy.process_sums()

    def _gather_sums(self, extra: list[Tensor]) -> None:
        """Before a checkpoint: the whole sums over the batches so far (the epoch's statistics
        ``extra``, the objective's and the policy's) into the first process, which writes it,
        and zero parts in the others, so the parts still add up to the same sums."""
        if self.world > 1:
            distributed.gather_into_first(extra + self._process_sums())

    def _stash_stats(self, stats: dict[str, Tensor] | None) -> None:
        """Keep the running epoch's statistics for a mid-epoch checkpoint."""
        self._stats_stash = None if stats is None else {k: v.detach().clone() for k, v in
                                                         stats.items()}

    def _restore_stats(self) -> dict[str, Tensor]:
        st, self._resumed_stats = self._resumed_stats, None
        return st if st is not None else self._new_stats()

    def _tensorboard(self) -> Any:
        if not self.cfg.logging.tensorboard:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UserError("logging.tensorboard=true needs the tensorboard package; "
                            "pip install tensorboard") from None
        return SummaryWriter(str(self.run_dir / "tensorboard"))

    # ------------------------------------------------------------------ final evaluation
    def final_eval(self, attacks: list[str] | None = None, progress: bool = True
                   ) -> dict[str, Any]:
        cfg = self.cfg
        self._sync_buffers()
        ckpt = self.run_dir / "checkpoints" / f"{cfg.eval.checkpoint}.pt"
        if cfg.eval.checkpoint != "last" and ckpt.exists():  # eval.checkpoint: best
            from ..commands.evaluate import load_run

            t = load_run(self.run_dir, which=cfg.eval.checkpoint)
            model, fp = t.model.to(self.device), t.fingerprint
        else:
            from .protocol import trainer_eval_model

            model, weights = trainer_eval_model(self)
            ckpt = self.run_dir / "checkpoints" / "last.pt"
            fp = {"checkpoint": str(ckpt), "sha256": sha256_file(ckpt),
                  "weights": weights} if ckpt.exists() else {"weights": weights}
        with determinism(cfg.deterministic):
            return run_eval(model, self.data, cfg, self.run_dir / "eval", attacks, self.device,
                            quiet=self.quiet or not progress, fingerprint=fp)

    def policy_eval_model(self) -> nn.Module | None:
        """A copy of the model holding the weights the policy asks evaluation to use (CFA's
        fairness-aware average), or None when the policy has none."""
        state = self.policy.eval_state()
        if state is None:
            return None
        m = copy.deepcopy(self.model)
        m.load_state_dict(state)
        return m


def state_mismatch(expected: dict[str, Tensor], given: dict[str, Any], show: int = 3) -> str:
    """Why ``given`` does not load into a module whose state is ``expected`` ('' if it does):
    the missing and unexpected keys and the tensors of another shape, a few of each."""
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    shapes = [f"{k} {tuple(given[k].shape)} instead of {tuple(v.shape)}" for k, v in
              expected.items() if k in given and hasattr(given[k], "shape")
              and tuple(given[k].shape) != tuple(v.shape)]
    parts = []
    for label, items in (("missing", missing), ("unexpected", unexpected),
                         ("other shape", shapes)):
        if items:
            more = f" and {len(items) - show} more" if len(items) > show else ""
            parts.append(f"{label}: {', '.join(items[:show])}{more}")
    return "; ".join(parts)


def _brief(s: dict[str, Any]) -> dict[str, Any]:
    return {k: s[k] for k in ("avg", "worst", "worst_class", "gap", "per_class") if k in s}


def _tb_write(writer: Any, line: dict[str, Any], step: int) -> None:
    for k in ("train_loss", "train_clean_acc", "train_adv_acc", "lr", "images_per_s"):
        if k in line:
            writer.add_scalar(f"train/{k}", line[k], step)
    for part, v in line.get("val", {}).items():
        if isinstance(v, dict):
            writer.add_scalar(f"val/{part}_avg", v["avg"], step)
            writer.add_scalar(f"val/{part}_worst", v["worst"], step)


def run_eval(model: nn.Module, data: DataBundle, cfg: RunConfig, out_dir: Path,
             attacks: list[str] | None = None, device: torch.device | None = None,
             quiet: bool = False, fingerprint: dict[str, Any] | None = None) -> dict[str, Any]:
    """Evaluate with ``cfg.eval`` (the routine ``robustfair eval`` uses, see
    :mod:`robustfair.engine.protocol`); add it to the record in ``out_dir`` as the run's main
    evaluation; return its summary."""
    from .protocol import evaluate_split

    res, _ = evaluate_split(model, data, cfg, out_dir, attacks=attacks, device=device,
                            fingerprint=fingerprint, quiet=quiet, primary=True)
    return res.summary()


def prepare_run_dir(cfg: RunConfig, force: bool = False, resume: bool = False,
                    run_dir: str | Path | None = None) -> Path:
    """Create ``runs/NAME`` and write the resolved config; refuse to overwrite by accident."""
    from .lock import LOCK_NAME

    path = Path(run_dir) if run_dir is not None else Path(cfg.output_dir) / cfg.name
    cfg_text = dump_config(cfg)
    # the training lock (taken before this) is not part of the run
    content = [p for p in path.iterdir() if p.name != LOCK_NAME] if path.is_dir() else []
    if content:
        if resume:
            return path
        if not force:
            raise UserError(f"run directory {str(path)!r} already exists; continue it with "
                            f"--resume, or start over with --force, or --set name=OTHER")
        for p in content:
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    elif resume:
        raise UserError(f"nothing to resume: {str(path)!r} has no run; drop --resume")
    make_dir(path)
    atomic_write_text(path / "config.yaml", cfg_text)
    return path
