"""Staged, resumable evaluation.

Each attack runs over the whole split before the next one starts, and AutoAttack is expanded
into its components: a component attacks only the points that the previous ones left classified
correctly, and its row of the matrix holds the robustness *after* it (``autoattack/apgd-ce``,
``autoattack/apgd-t``, …; ``autoattack`` itself is the per-sample worst case over all of them).
A point misclassified without attack counts as broken under every attack and is not attacked.

Progress is kept in a state file (per-row correct flags and predictions, the finished rows, and
how many batches of the current row are done), written atomically after every finished row and
at most every ``save_every`` seconds in between, so that a stopped evaluation resumes without
repeating finished work. Every batch is seeded from (seed, row, batch number) (see
:func:`batch_seed`): torch's global generator is seeded with it, and so is the private generator
of a stochastic attack (APGD, FAB, Square, each AutoAttack component) unless the attack was given
its own ``seed``. A resumed evaluation gives the same matrix as an uninterrupted one, and another
run seed gives other random draws.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..attacks import Attack, build_attack
from ..attacks.autoattack import AutoAttack
from ..attacks.base import as_eps, eval_mode, fold_batchnorm, inference_layout
from ..errors import UserError
from . import distributed
from .evaluator import EvalResult
from .io import atomic_write_json

log = logging.getLogger("robustfair.eval")

STATE_FORMAT = "robustfair-eval-state"


@dataclass
class Stage:
    """One row of the matrix: ``attack`` on the points that row ``after`` left correct (all
    points when None); no attack and ``after`` set means a copy of that row."""

    row: str
    attack: Attack | None
    after: str | None
    ensemble: AutoAttack | None = None  # the ensemble whose stage this is (it may gate points)


def plan(attacks: Sequence[Attack]) -> list[Stage]:
    """Rows in order: clean first, then each attack; AutoAttack as its cumulative stages."""
    stages = [Stage("clean", None, None)]
    for atk in attacks:
        if atk.name == "clean":
            continue
        if isinstance(atk, AutoAttack):
            prev = "clean"
            for comp_name, comp in atk.stages():
                row = f"{atk.name}/{comp_name}"
                stages.append(Stage(row, comp, prev, atk))
                prev = row
            stages.append(Stage(atk.name, None, prev))
        else:
            stages.append(Stage(atk.name, atk, "clean"))
    return stages


class EvalState:
    """The resumable progress of one evaluation (JSON, written atomically)."""

    def __init__(self, path: Path | None, fingerprint: dict[str, Any], n: int) -> None:
        self.path, self.fingerprint, self.n = path, fingerprint, n
        self.rows: dict[str, tuple[Tensor, Tensor]] = {}
        self.current: dict[str, Any] | None = None
        self.checks: dict[str, dict[str, Any]] = {}  # row -> its bf16-against-fp32 check
        self._saved = time.monotonic()

    @classmethod
    def open(cls, path: Path | None, fingerprint: dict[str, Any], n: int,
             resume: bool) -> EvalState:
        st = cls(path, fingerprint, n)
        if path is None or not resume:
            return st
        if not path.exists():
            log.warning("nothing to resume in %s; starting from the beginning", path)
            return st
        try:
            raw = json.loads(path.read_text())
            if not isinstance(raw, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError):
            raise UserError(f"the evaluation state {str(path)!r} is unreadable; delete it and "
                            f"run without --resume") from None
        if raw.get("format") != STATE_FORMAT or raw.get("fingerprint") != _jsonable(fingerprint):
            raise UserError(f"{str(path)!r} belongs to an evaluation with other settings "
                            f"(model, eps, norm, attacks, n or seed); run without --resume to "
                            f"start over")
        try:
            for row, rec in raw.get("rows", {}).items():
                st.rows[row] = _decode(rec, n)
            st.checks = dict(raw.get("precision_checks") or {})
            cur = raw.get("current")
            if cur is not None:
                c, p = _decode(cur, n)
                st.current = {"row": cur["row"], "batches_done": int(cur["batches_done"]),
                              "correct": c, "pred": p}
        except (KeyError, TypeError, ValueError, AttributeError):  # valid JSON, damaged content
            raise UserError(f"the evaluation state {str(path)!r} is damaged; delete it and run "
                            f"without --resume") from None
        return st

    def done(self, row: str) -> bool:
        return row in self.rows

    def finish(self, row: str, correct: Tensor, pred: Tensor) -> None:
        self.rows[row] = (correct.clone(), pred.clone())
        self.current = None
        self.save()

    def progress(self, row: str, batches_done: int, correct: Tensor, pred: Tensor,
                 every: float) -> None:
        self.current = {"row": row, "batches_done": batches_done, "correct": correct,
                        "pred": pred}
        if time.monotonic() - self._saved >= every:
            self.save()

    def save(self) -> None:
        if self.path is None:
            return
        cur = None
        if self.current is not None:
            cur = {"row": self.current["row"], "batches_done": self.current["batches_done"],
                   **_encode(self.current["correct"], self.current["pred"])}
        atomic_write_json(self.path, {
            "format": STATE_FORMAT, "version": 1, "fingerprint": _jsonable(self.fingerprint),
            "finished": list(self.rows), "current": cur,
            "rows": {r: _encode(c, p) for r, (c, p) in self.rows.items()},
            "precision_checks": self.checks,
        })
        self._saved = time.monotonic()

    def remove(self) -> None:
        if self.path is not None and self.path.exists():
            self.path.unlink()


def _encode(correct: Tensor, pred: Tensor) -> dict[str, Any]:
    return {"correct": "".join("1" if b else "0" for b in correct.tolist()),
            "pred": [int(v) for v in pred.tolist()]}


def _decode(rec: dict[str, Any], n: int) -> tuple[Tensor, Tensor]:
    c, p = rec["correct"], rec["pred"]
    if len(c) != n or len(p) != n:
        raise UserError("the evaluation state does not match the data; run without --resume")
    if not isinstance(c, str) or set(c) - {"0", "1"}:
        raise ValueError("a row's flags are not 0 and 1")
    return torch.tensor([ch == "1" for ch in c], dtype=torch.bool), torch.tensor(p).long()


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


PRECISIONS = ("fp32", "bf16", "auto")


def resolve_precision(precision: str, device: torch.device) -> str:
    """The precision the attacks' own passes run in: ``auto`` is bf16 on a CUDA device that
    supports it, fp32 elsewhere (on a CPU without bf16 units bf16 is slower)."""
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        cuda = device.type == "cuda" and torch.cuda.is_available()
        return "bf16" if cuda and torch.cuda.is_bf16_supported() else "fp32"
    return precision


class Bf16Logits(nn.Module):
    """``model`` under bf16 autocast, its logits returned in fp32: what the attacks' own passes
    see when the evaluation's precision is bf16. Whether a point is broken is always decided on
    ``model`` itself, in fp32."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            out = self.model(x)
        return out.float()


def precision_used(settings: dict[str, Any]) -> str:
    """``bf16`` when some row of an evaluation was attacked in bf16, else ``fp32``."""
    prec = settings.get("precision")
    if not isinstance(prec, dict):
        return "fp32"
    return "bf16" if any(c.get("used") == "bf16" for c in (prec.get("checks") or {}).values()) \
        else "fp32"


def batch_seed(seed: int, row: str, batch: int) -> int:
    """A seed per (run seed, row, batch), stable across processes (unlike ``hash``)."""
    return zlib.crc32(f"{seed}/{row}/{batch}".encode()) + seed * 1_000_003


def derives_seed(attack: Attack | None, ensemble: Attack | None = None) -> bool:
    """Whether ``attack`` takes its seed from :func:`batch_seed`: it has a ``seed`` parameter
    and neither it (standalone) nor its ensemble (a component) was given one explicitly."""
    if attack is None or "seed" not in type(attack.params).model_fields:
        return False
    owner = ensemble if ensemble is not None else attack
    return "seed" not in owner.params.model_fields_set


@contextlib.contextmanager
def attack_seeded(attack: Attack, seed: int, derive: bool) -> Iterator[None]:
    """With ``derive``: ``attack``'s private generator seeded with ``seed`` for the block (its
    own ``seed`` restored after)."""
    if not derive:
        yield
        return
    own = attack.seed
    attack.seed = seed
    try:
        yield
    finally:
        attack.seed = own


def describe_seeded(attack: Attack, seed: int) -> dict[str, Any]:
    """``attack.describe()`` with the seed its random draws actually use."""
    d = attack.describe()
    if "seed" in d and derives_seed(attack):
        d["seed"] = f"per batch from run seed {seed}"
    return d


def evaluate_staged(
    model: nn.Module, data: Any, attacks: Sequence[str | Attack], eps: float, norm: str = "linf",
    num_classes: int | None = None, batch_size: int = 500, step_size: float | None = None,
    device: torch.device | str | None = None, seed: int = 0, state_path: Path | None = None,
    resume: bool = False, fingerprint: dict[str, Any] | None = None, save_every: float = 30.0,
    quiet: bool = True, bounded: bool = True, layout: str = "auto", precision: str = "fp32",
    fold_bn: bool = True,
) -> EvalResult:
    """Evaluate ``model`` on ``data`` (an :class:`ArrayData`) attack by attack; see the module
    docstring. Returns the :class:`EvalResult` (rows of AutoAttack stages included).

    ``precision`` (``fp32``, ``bf16`` or ``auto``, see :func:`resolve_precision`): the
    precision of the attacks' own passes. With bf16, the first batch each row attacks is attacked
    twice, in fp32 and in bf16; the row goes on in bf16 only if bf16 broke every point there that
    fp32 broke, else in fp32. That batch keeps its fp32 result, every verdict (is the point
    still classified correctly?) is taken in fp32, and each check is recorded in
    ``settings["precision"]``.

    ``fold_bn``: the attacks pass a copy of the model with each BatchNorm that follows a
    convolution folded into it (see :func:`~robustfair.attacks.base.fold_batchnorm`; the same
    function, faster passes); whether a point is broken is decided on ``model`` itself."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    resolved = resolve_precision(precision, device)
    built = [a if isinstance(a, Attack) else build_attack(a, norm, step_size, bounded=bounded)
             for a in attacks]
    stages = plan(built)
    n = len(data)
    fp = {"eps": eps, "norm": norm, "seed": seed, "n": n, "batch_size": batch_size,
          "attacks": [describe_seeded(a, seed) for a in built], **(fingerprint or {})}
    if resolved != "fp32":
        fp["precision"] = resolved
    state = EvalState.open(state_path, fp, n, resume)
    if state.rows:
        log.info("resuming: %s already done", ", ".join(state.rows))
    labels = data.y.cpu().long()
    timing: dict[str, float] = {}
    attacked: dict[str, int] = {}
    probe = data.images(torch.arange(min(4, n))).to(device) if n else None
    attacker, folded = fold_batchnorm(model, probe) if fold_bn else (model, 0)
    with contextlib.ExitStack() as stack:
        used = stack.enter_context(inference_layout(attacker, probe, layout)) \
            if probe is not None else "unchanged"
        try:
            for stage in stages:
                if state.done(stage.row):
                    continue
                t0 = time.perf_counter()
                correct, pred, attacked[stage.row] = _run_stage(
                    model, data, stage, state, labels, eps, batch_size, device, seed, save_every,
                    quiet, Bf16Logits(attacker) if resolved == "bf16" else None, attacker)
                timing[stage.row] = round(time.perf_counter() - t0, 3)
                state.finish(stage.row, correct, pred)
                acc = 100 * float(correct.float().mean())
                if stage.attack is not None:
                    log.info("%-24s %5.1f%%  (%.1f s, %d points attacked)", stage.row, acc,
                             timing[stage.row], attacked[stage.row])
                elif stage.row != "clean":  # an ensemble's row: the worst case over its stages
                    spent = sum(t for r, t in timing.items() if r.startswith(stage.row + "/"))
                    log.info("%-24s %5.1f%%  (%.1f s over its stages)", stage.row, acc, spent)
        except BaseException:  # interrupted: keep what is done for --resume
            state.save()
            raise
    names = [s.row for s in stages]
    correct = torch.stack([state.rows[r][0] for r in names])
    pred = torch.stack([state.rows[r][1] for r in names])
    settings = {
        "eps": eps, "norm": norm, "seed": seed, "n": n,
        "attacks": [describe_seeded(a, seed) for a in built],
        "stages": {a.name: [s for s, _ in a.stages()] for a in built if isinstance(a, AutoAttack)},
        "timing_s": timing,
        "layout": used,
        "folded_batchnorm": folded,
        "precision": "fp32" if resolved == "fp32" else {
            "requested": precision, "attacks": resolved,
            "rule": "each row's first batch attacked in fp32 and in bf16; bf16 for the rest of "
                    "the row only if it broke every point there that fp32 broke; verdicts in "
                    "fp32",
            "checks": {r: c for r, c in state.checks.items() if r in names}},
        "stage_time": {r: {"seconds": t, "points": attacked.get(r, 0)} for r, t in timing.items()
                       if r != "clean"},
        "protocol": "a point misclassified without attack counts as broken under every attack; "
                    "an ensemble's row is the per-sample worst case over its stages",
    }
    groups = data.group.cpu() if getattr(data, "group", None) is not None else None
    result = EvalResult(names, correct, pred, labels, num_classes or int(labels.max()) + 1,
                        groups, settings)
    state.remove()
    return result


def _run_stage(model: nn.Module, data: Any, stage: Stage, state: EvalState, labels: Tensor,
               eps: float, batch_size: int, device: torch.device, seed: int, save_every: float,
               quiet: bool, half: nn.Module | None = None, attacker: nn.Module | None = None
               ) -> tuple[Tensor, Tensor, int]:
    """(correct, pred, points attacked in this call) of one row; ``attacker``: the model the
    attacks pass (``model`` when None; e.g. with BatchNorm folded), ``half``: it in bf16 (see
    :func:`evaluate_staged`), None for fp32. Verdicts are taken on ``model``."""
    attacker = model if attacker is None else attacker
    if stage.after is None:
        return (*_clean(model, data, labels, batch_size, device), 0)
    base_c, base_p = state.rows[stage.after]
    if stage.attack is None:
        return base_c.clone(), base_p.clone(), 0
    correct, pred, start = base_c.clone(), base_p.clone(), 0
    if state.current is not None and state.current["row"] == stage.row:
        correct, pred = state.current["correct"], state.current["pred"]
        start = state.current["batches_done"]
    todo = base_c.nonzero().flatten()
    chunks = list(torch.split(todo, batch_size))
    bar = _bar(quiet, stage.row, len(todo), sum(len(c) for c in chunks[:start]))
    ticker = _IterationTicker(attacker, bar, len(chunks))
    attacked = 0
    derive = derives_seed(stage.attack, stage.ensemble)
    for b in range(start, len(chunks)):
        ticker.batch = b
        if b % distributed.world_size() != distributed.rank():
            continue  # under torchrun each process attacks every world_size-th batch
        idx = chunks[b]
        x = data.images(idx).to(device)
        y = labels[idx].to(device)
        if stage.ensemble is not None:
            with eval_mode(attacker):
                sel = stage.ensemble.gate(stage.row.split("/", 1)[1], attacker, x, y,
                                          as_eps(eps, x))
            if sel is not None:
                if bar is not None:
                    bar.update(int((~sel).sum()))
                sel = sel.cpu()
                idx, x, y = idx[sel], x[sel.to(device)], y[sel.to(device)]
        attacked += len(idx)
        if len(idx) == 0:
            state.progress(stage.row, b + 1, correct, pred, save_every)
            continue
        b_seed = batch_seed(seed, stage.row, b)

        def verdict(attacked_model: nn.Module) -> Tensor:
            rng = torch.get_rng_state()
            torch.manual_seed(b_seed)
            try:
                with attack_seeded(stage.attack, b_seed, derive):
                    x_adv = stage.attack(attacked_model, x, y, eps)
            finally:
                torch.set_rng_state(rng)
            with eval_mode(model), torch.no_grad():
                return model(x_adv).argmax(1).cpu()

        check = state.checks.get(stage.row) if half is not None else None
        if half is not None and check is None:
            p = verdict(attacker)
            state.checks[stage.row] = check = _check_bf16(
                stage.row, p != labels[idx], verdict(half) != labels[idx])
        else:
            p = verdict(half if check is not None and check["used"] == "bf16" else attacker)
        pred[idx], correct[idx] = p, p == labels[idx]
        state.progress(stage.row, b + 1, correct, pred, save_every)
        if bar is not None:
            bar.update(len(idx))
    ticker.close()
    if bar is not None:
        bar.close()
    if distributed.active():  # every batch was attacked by one process: sum the shares
        both = torch.stack([correct[todo].long(), pred[todo]])
        both *= (torch.arange(len(todo)) // batch_size % distributed.world_size()
                 == distributed.rank())
        both = distributed.all_reduce_sum(both.to(device)).cpu()
        correct[todo], pred[todo] = both[0].bool(), both[1]
    return correct, pred, attacked


def _check_bf16(row: str, broke32: Tensor, broke16: Tensor) -> dict[str, Any]:
    """The record of one row's check of bf16 against fp32 on the same points and seed."""
    missed = int((broke32 & ~broke16).sum())
    check = {"points": len(broke32), "fp32_broke": int(broke32.sum()),
             "bf16_broke": int(broke16.sum()), "bf16_missed": missed,
             "bf16_only": int((broke16 & ~broke32).sum()), "used": "fp32" if missed else "bf16"}
    level = logging.WARNING if missed else logging.INFO
    log.log(level, "%s: bf16 check on %d points: fp32 broke %d, bf16 %d, missed %d; %s for "
            "the rest of the row", row, check["points"], check["fp32_broke"], check["bf16_broke"],
            missed, "fp32 (bf16 is weaker here)" if missed else "bf16")
    return check


def _clean(model: nn.Module, data: Any, labels: Tensor, batch_size: int,
           device: torch.device) -> tuple[Tensor, Tensor]:
    preds = []
    with eval_mode(model), torch.no_grad():
        for idx in torch.split(torch.arange(len(labels)), max(batch_size, 1000)):
            preds.append(model(data.images(idx).to(device)).argmax(1).cpu())
    pred = torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long)
    return pred == labels, pred


def _bar(quiet: bool, desc: str, total: int, initial: int) -> Any:
    if quiet or total == 0:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="img", leave=False)


class _IterationTicker:
    """Progress within a batch: counts the model's forward passes (one or a few per attack
    iteration) and shows them beside the bar, at most every ``every`` seconds."""

    def __init__(self, model: nn.Module, bar: Any, batches: int, every: float = 0.5) -> None:
        self.bar, self.batches, self.every = bar, batches, every
        self.batch, self.passes, self.last_batch, self._shown = 0, 0, -1, 0.0
        self.handle = model.register_forward_hook(self._tick) if bar is not None else None

    def _tick(self, *_: Any) -> None:
        if self.batch != self.last_batch:
            self.passes, self.last_batch = 0, self.batch
        self.passes += 1
        now = time.monotonic()
        if now - self._shown >= self.every:
            self._shown = now
            self.bar.set_postfix_str(f"batch {self.batch + 1}/{self.batches}, "
                                     f"{self.passes} model passes", refresh=True)

    def close(self) -> None:
        if self.handle is not None:
            self.handle.remove()
