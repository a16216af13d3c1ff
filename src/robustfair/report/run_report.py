"""One self-contained HTML page per run: settings, training curves, per-class accuracy under
each attack, the confusion and class-similarity matrices under attack, robust accuracy against
ε, per-group figures, the method's own state over epochs and the sanity-check verdicts.

Images are PNGs embedded as base64 (matplotlib Agg), so the page opens with no network. Every
number is written with the file and JSON pointer it comes from (see :mod:`.html`); figures
recomputed from the evaluation matrix are saved to ``report_data.json`` first.
"""

from __future__ import annotations

import base64
import datetime
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__
from ..engine.io import atomic_write_json, atomic_write_text
from ..errors import UserError
from . import derive, figures
from .eps_curve import DEFAULT_FACTORS, eps_curve_for_report
from .html import (
    Num,
    Raw,
    details,
    esc,
    figure_grid,
    image,
    page,
    para,
    pointer,
    table,
    unavailable,
)
from .loading import CHECKS, CONFIG, EPS_CURVE, LOG, SUMMARY, RunFiles, load_run, strongest_attack

log = logging.getLogger("robustfair")

DATA = "report_data.json"

#: section ids, in page order
SECTIONS = ("settings", "training", "per-class", "confusion", "similarity", "eps-curve",
            "groups", "method-state", "checks")


@dataclass
class ReportOptions:
    """What ``robustfair report`` computes.

    Attributes:
        attack: attack of the confusion and similarity matrices (default: the strongest).
        eps_curve: compute the ε curve when ``eval/eps_curve.json`` is missing or stale.
        eps_factors: radii of the ε curve as multiples of the run's ε.
        eps_attack: attack of the ε curve.
        eps_n: samples (stratified by class) of the ε curve.
        recompute_eps_curve: compute the ε curve even when a current one is saved.
        out: the page's path (default ``RUN_DIR/report.html``).
    """

    attack: str | None = None
    eps_curve: bool = True
    eps_factors: tuple[float, ...] = DEFAULT_FACTORS
    eps_attack: str = "pgd10"
    eps_n: int = 200
    recompute_eps_curve: bool = False
    out: Path | None = None


@dataclass
class _Ctx:
    rf: RunFiles
    opts: ReportOptions
    data: dict[str, Any] = field(default_factory=dict)
    tick: Callable[[int], None] = lambda n: None

    @property
    def names(self) -> list[str]:
        return self.rf.class_names()


def build_report(run_dir: str | Path, opts: ReportOptions | None = None,
                 progress: Callable[[int], None] | None = None) -> Path:
    """Write the report of ``run_dir`` and return its path.

    ``progress`` (optional) is called with 1 after each section and after each attack run of
    the ε curve; :func:`report_steps` says how many calls to expect."""
    opts = opts or ReportOptions()
    rf = load_run(run_dir)
    ctx = _Ctx(rf, opts, tick=progress or (lambda n: None))
    sections = []
    for sid, title, builder in _BUILDERS:
        sections.append((sid, title, builder(ctx)))
        ctx.tick(1)
    atomic_write_json(rf.run_dir / DATA, ctx.data)
    when = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    subtitle = (f"run directory {rf.run_dir}; written by robustfair {__version__} on {when}. "
                f"Accuracies are in percent. Each number carries its source file and JSON "
                f"pointer in the page source (attribute data-src).")
    if rf.problems:
        subtitle += " Problems: " + "; ".join(rf.problems)
    out = opts.out or rf.run_dir / "report.html"
    atomic_write_text(out, page(f"robustfair report: {rf.name}", subtitle, sections))
    return out


def report_steps(run_dir: str | Path, opts: ReportOptions) -> int:
    """Number of progress calls :func:`build_report` makes (sections + ε-curve runs)."""
    return len(_BUILDERS) + (len(opts.eps_factors) if opts.eps_curve else 0)


# ---------------------------------------------------------------------------------- settings
def _settings(ctx: _Ctx) -> str:
    rows: list[list[Any]] = []
    cfg = ctx.rf.config
    if cfg is not None:
        rows += _config_rows(cfg)
    rows += _history_rows(ctx.rf.run_dir)
    s = (ctx.rf.summary or {}).get("settings")
    if s is not None:
        rows += _eval_rows(s)
    ck = ctx.rf.checkpoint
    if ck is not None:
        src = "checkpoints/last.json#"
        for key, fmt in (("epoch", "int"), ("global_step", "int"), ("sha256", "str")):
            if key in ck:
                rows.append([f"checkpoint {key}", Num(ck[key], src + pointer(key), fmt),
                             "checkpoints/last.json"])
    if not rows:
        return unavailable("no config.yaml and no evaluation settings in eval/summary.json")
    return table(["setting", "value", "from"], rows, css="left")


def _history_rows(run_dir: Path) -> list[list[Any]]:
    """One row per setting changed on --resume: old → new, and from which epoch and step."""
    from ..engine.history import HISTORY, read_history

    rows = []
    for entry in read_history(run_dir):
        pos = entry.get("from", {})
        when = f"from epoch {pos.get('epoch', 0) + 1} step {pos.get('step_in_epoch', 0) + 1}"
        for key, ch in entry.get("changes", {}).items():
            rows.append([f"changed on resume: {key}",
                         f"{ch.get('old')} → {ch.get('new')} ({when})", HISTORY])
    return rows


def _get(d: dict[str, Any], *path: str) -> Any:
    for p in path:
        if not isinstance(d, dict) or p not in d:
            return None
        d = d[p]
    return d


def _config_rows(cfg: dict[str, Any]) -> list[list[Any]]:
    spec: list[tuple[str, tuple[str, ...], str]] = [
        ("name", ("name",), "str"), ("description", ("description",), "str"),
        ("dataset", ("data", "name"), "str"), ("class imbalance", ("data", "imbalance"), "json"),
        ("training images (limit)", ("data", "train_limit"), "json"),
        ("model", ("model", "name"), "str"), ("model parameters", ("model", "params"), "json"),
        ("objective", ("method", "objective"), "json"), ("budget", ("method", "budget"), "json"),
        ("weights", ("method", "weights"), "json"), ("policy", ("method", "policy"), "json"),
        ("sampler", ("method", "sampler"), "json"),
        ("training attack: norm", ("attack", "norm"), "str"),
        ("training attack: ε", ("attack", "eps"), "eps"),
        ("training attack: step size", ("attack", "step_size"), "eps"),
        ("training attack: steps", ("attack", "steps"), "int"),
        ("epochs", ("train", "epochs"), "int"), ("batch size", ("train", "batch_size"), "int"),
        ("optimizer", ("train", "optimizer"), "json"),
        ("lr schedule", ("train", "schedule"), "json"),
        ("seed", ("seed",), "int"),
        ("validation attack", ("validation", "attack"), "str"),
        ("evaluation checkpoint", ("eval", "checkpoint"), "str"),
    ]
    rows = []
    for label, path, fmt in spec:
        v = _get(cfg, *path)
        if v is None or v == "":
            continue
        rows.append([label, Num(v, CONFIG + "#" + pointer(*path), fmt), CONFIG])
    return rows


def _eval_rows(s: dict[str, Any]) -> list[list[Any]]:
    src = SUMMARY + "#"
    rows = []
    for label, key, fmt in (("evaluation split", "split", "str"), ("evaluation images", "n", "int"),
                            ("evaluation ε", "eps", "eps"), ("evaluation norm", "norm", "str"),
                            ("evaluation seed", "seed", "int")):
        if s.get(key) is not None:
            rows.append([label, Num(s[key], src + pointer("settings", key), fmt), SUMMARY])
    for i, a in enumerate(s.get("attacks", [])):
        rows.append(["evaluation attack", Num(a, src + pointer("settings", "attacks", i), "json"), SUMMARY])
    return rows


# ---------------------------------------------------------------------------------- training
def _training(ctx: _Ctx) -> str:
    lines = ctx.rf.log
    if not lines:
        return unavailable("no log.jsonl (the run was not trained here, or not yet)")
    epochs = [int(ln.get("epoch", i + 1)) for i, ln in enumerate(lines)]
    acc: dict[str, list[Any]] = {}
    robust_name = next((ln["val"].get("robust_attack") for ln in lines
                        if ln.get("val", {}).get("robust_attack")), "robust")
    for part, label in (("clean", "clean"), ("robust", robust_name)):
        if any(part in ln.get("val", {}) for ln in lines):
            acc[f"{label}: average"] = [_get(ln, "val", part, "avg") for ln in lines]
            acc[f"{label}: worst class"] = [_get(ln, "val", part, "worst") for ln in lines]
    adversarial = _adversarial_training(ctx.rf.config, lines)
    train_acc: dict[str, list[Any]] = {}
    for key, label in (("train_clean_acc", "clean (training batches)"),
                       ("train_adv_acc", "adversarial (training batches)")):
        if (key != "train_adv_acc" or adversarial) and any(key in ln for ln in lines):
            train_acc[label] = [ln.get(key) for ln in lines]
    fig = figures.training_curves(epochs, [ln.get("train_loss") for ln in lines], acc,
                                  train_acc)
    body = "" if acc else para("This run did not validate (validation.every = 0 or no "
                               "validation split): the accuracy shown is measured on the "
                               "training batches as they were trained.", "note")
    body += image(figures.to_base64(fig), "training loss and accuracy")
    body += details("numbers per epoch", _training_table(lines, robust_name, adversarial),
                    open_=len(lines) <= 12)
    return body


def _adversarial_training(cfg: dict[str, Any] | None, lines: list[dict[str, Any]]) -> bool:
    """Whether the run trained on adversarial examples (so that the accuracy on them means
    something): not for the ``standard`` objective, ε = 0 or no attack step."""
    if not any("train_adv_acc" in ln for ln in lines):
        return False
    if cfg is None:
        return True
    objective = _get(cfg, "method", "objective")
    name = objective.get("name") if isinstance(objective, dict) else objective
    return not (name == "standard" or _get(cfg, "attack", "eps") == 0
                or _get(cfg, "attack", "steps") == 0)


def _training_table(lines: list[dict[str, Any]], robust_name: str,
                    adversarial: bool = True) -> str:
    cols: list[tuple[str, tuple[str, ...], str]] = [
        ("lr", ("lr",), "num"), ("train loss", ("train_loss",), "num"),
        ("train clean acc", ("train_clean_acc",), "pct"),
        ("train adv acc", ("train_adv_acc",), "pct"),
        ("val clean avg", ("val", "clean", "avg"), "pct"),
        ("val clean worst", ("val", "clean", "worst"), "pct"),
        ("worst class", ("val", "clean", "worst_class"), "int"),
        (f"val {robust_name} avg", ("val", "robust", "avg"), "pct"),
        (f"val {robust_name} worst", ("val", "robust", "worst"), "pct"),
        ("worst class ", ("val", "robust", "worst_class"), "int"),
        ("img/s", ("images_per_s",), "num"),
    ]
    cols = [c for c in cols if any(_get(ln, *c[1]) is not None for ln in lines)
            and (adversarial or c[1] != ("train_adv_acc",))]
    rows = []
    for i, ln in enumerate(lines):
        row: list[Any] = [Num(ln.get("epoch", i + 1), f"{LOG}#{pointer(i, 'epoch')}", "int")]
        for _, path, fmt in cols:
            v = _get(ln, *path)
            row.append(Num(v, f"{LOG}#{pointer(i, *path)}", fmt) if v is not None else "")
        rows.append(row)
    return table(["epoch"] + [c[0].strip() for c in cols], rows,
                 caption="training (this epoch's batches) and validation, per epoch")


# ---------------------------------------------------------------------------------- per class
def _per_class(ctx: _Ctx) -> str:
    s = ctx.rf.summary
    if s is None:
        return unavailable("no eval/summary.json; run 'robustfair eval RUN_DIR'")
    cols = {a: (s["attacks"][a], pointer("attacks", a)) for a in s["attacks"]}
    if "worst_case" in s:
        cols["worst-case"] = (s["worst_case"], pointer("worst_case"))
    body = para(_which_evaluation(ctx), "note") + _class_table(ctx.names, cols)
    if "worst_case" in s:
        over = ", ".join(s["worst_case"].get("over", []))
        body += para(f"worst-case: the per-sample worst case over the ensemble ({over}); a "
                     f"sample counts as robust only if it resists every one of these attacks. "
                     f"The 'average' row shows the drop-off from attack to attack.", "note")
    clean = s["attacks"].get("clean")
    images = []
    for name, (col, _) in cols.items():
        if name == "clean":
            continue
        base = clean["per_class"] if clean else [None] * len(col["per_class"])
        fig = figures.class_bars(ctx.names, base, col["per_class"], name, col.get("worst_class"))
        images.append(image(figures.to_base64(fig), f"per-class accuracy under {name}"))
    return body + figure_grid(images)


def _which_evaluation(ctx: _Ctx) -> str:
    """Which of the run's evaluations the report shows (eval/summary.json) and which others
    exist (eval/index.json)."""
    from ..engine.record import describe_evaluation, list_evaluations

    text = "Shown: " + describe_evaluation((ctx.rf.summary or {}).get("settings", {}))
    others = [e["summary"] for e in list_evaluations(ctx.rf.run_dir / "eval")
              if e["summary"] != "summary.json"]
    if others:
        text += (f". Other evaluations of this run (other settings), not shown: "
                 f"{', '.join('eval/' + o for o in others)}")
    return text + "."


def _class_table(names: list[str], cols: dict[str, tuple[dict[str, Any], str]]) -> str:
    first = next(iter(cols.values()))
    rows = []
    for k, name in enumerate(names):
        row: list[Any] = [name]
        if "counts" in first[0]:
            row.append(Num(first[0]["counts"][k], SUMMARY + "#" + first[1] + pointer(
                "counts", k), "int"))
        for col, ptr in cols.values():
            css = "worst" if col.get("worst_class") == k else ""
            row.append(Num(col["per_class"][k], f"{SUMMARY}#{ptr}{pointer('per_class', k)}",
                           "pct", css))
        rows.append(row)
    for label, key in (("average", "avg"), ("worst class", "worst"), ("best−worst gap", "gap"),
                       ("std across classes", "std")):
        row = [label] + ([""] if "counts" in first[0] else [])
        for col, ptr in cols.values():
            row.append(Num(col[key], f"{SUMMARY}#{ptr}{pointer(key)}", "pct")
                       if key in col else "")
        rows.append(row)
    head = ["class"] + (["count"] if "counts" in first[0] else []) + list(cols)
    return table(head, rows, caption="accuracy (%) per class; the worst class of each "
                 "column is highlighted")


# ---------------------------------------------------------------------------------- matrices
def _matrix_attack(ctx: _Ctx) -> str | None:
    m = ctx.rf.matrix
    if m is None:
        return None
    if ctx.opts.attack is not None:
        if ctx.opts.attack not in m.attacks:
            raise UserError(f"--attack {ctx.opts.attack!r} is not in the evaluation of this run "
                            f"(it has: {', '.join(m.attacks)}); pick one of those")
        return ctx.opts.attack
    return strongest_attack(m.attacks, ctx.rf.summary, allow_worst_case=False) or m.attacks[0]


def _confusion(ctx: _Ctx) -> str:
    attack = _matrix_attack(ctx)
    if attack is None:
        return unavailable("no eval/summary_matrix.npz; run 'robustfair eval RUN_DIR'")
    conf = derive.confusion(ctx.rf.matrix, attack)
    ctx.data["confusion"] = conf
    rows_arr = np.array([[np.nan if v is None else v for v in r] for r in conf["rows"]])
    fig = figures.heatmap(rows_arr, ctx.names, f"confusion under {attack} (row-normalised)",
                          "predicted class", "true class",
                          cbar_label=f"fraction of the true class\npredicted as j under {attack}")
    body = image(figures.to_base64(fig), f"confusion matrix under {attack}")
    rows = [[name] + [Num(v, f"{DATA}#{pointer('confusion', 'counts', i, j)}", "int",
                          "worst" if i != j and v == max(r[:i] + r[i + 1:] or [0]) and v > 0
                          else "")
                      for j, v in enumerate(r)]
            for i, (name, r) in enumerate(zip(ctx.names, conf["counts"], strict=True))]
    body += details("counts (rows: true class, columns: predicted; the largest error per row "
                    "is highlighted)", table(["true \\ predicted"] + ctx.names, rows),
                    open_=len(ctx.names) <= 12)
    return body


def _similarity(ctx: _Ctx) -> str:
    if ctx.rf.analysis is not None:
        rel, data = ctx.rf.analysis
        from .loading import similarity_pointer

        path = similarity_pointer(data, ctx.rf.num_classes()) or ()
        mat = _get(data, *path)
        src = f"{rel}#{pointer(*path)}"
        what = f"read from {rel}, key {'/'.join(path)!r} (written by 'robustfair analyze')"
        atk = data.get("attack", "the attack") if isinstance(data, dict) else "the attack"
        cbar = f"P[i][j] under {atk}:\nmean softmax probability of class j"
    else:
        attack = _matrix_attack(ctx)
        if attack is None:
            return unavailable("no eval/summary_matrix.npz and no analysis JSON; run "
                               "'robustfair eval RUN_DIR' or 'robustfair analyze RUN_DIR'")
        mat = derive.confusion(ctx.rf.matrix, attack)["rows"]
        ctx.data["similarity"] = {"source": "eval/summary_matrix.npz", "attack": attack,
                                  "matrix": mat}
        src = f"{DATA}#{pointer('similarity', 'matrix')}"
        what = (f"computed from the evaluation matrix under {attack}: P[i][j] is the fraction of "
                f"class-i test images predicted as class j, the argmax form of DAFA's class "
                f"similarity (mean adversarial prediction of class i)")
        cbar = f"P[i][j] under {attack}:\nfraction of class i predicted as j"
    arr = np.array([[np.nan if v is None else float(v) for v in r] for r in mat])
    off = arr.copy()
    np.fill_diagonal(off, np.nan)
    fig = figures.heatmap(off, ctx.names, "class similarity (diagonal left out)", "class j",
                          "class i", annotate=False, cbar_label=cbar)
    body = para(f"Class similarity {what}.", "note")
    body += image(figures.to_base64(fig), "class-similarity heatmap")
    body += _top_pairs(arr, ctx.names, src)
    rows = [[name] + [Num(v, f"{src}{pointer(i, j)}", "num") for j, v in enumerate(r)]
            for i, (name, r) in enumerate(zip(ctx.names, mat, strict=True))]
    body += details("the matrix", table(["class i \\ j"] + ctx.names, rows))
    return body


def _top_pairs(arr: np.ndarray, names: list[str], src: str, k: int = 5) -> str:
    off = np.where(np.isnan(arr), -np.inf, arr)
    np.fill_diagonal(off, -np.inf)
    flat = off.ravel()
    order = [int(t) for t in np.argsort(-flat, kind="stable")[:k] if flat[t] > 0]
    c = len(names)
    rows = [[f"{names[t // c]} → {names[t % c]}",
             Num(float(arr[t // c, t % c]), f"{src}{pointer(t // c, t % c)}", "num")]
            for t in order]
    return table(["class pair (i → j)", "P[i][j]"], rows, caption="most similar class pairs")


# ---------------------------------------------------------------------------------- ε curve
def _eps_curve(ctx: _Ctx) -> str:
    rf, o = ctx.rf, ctx.opts
    curve = rf.eps_curve
    failed = ""
    if o.eps_curve and (rf.run_dir / "checkpoints" / "last.pt").exists() and (
            rf.run_dir / CONFIG).exists():
        done = [0]

        def tick(n: int) -> None:
            done[0] += n
            ctx.tick(n)

        try:
            curve = eps_curve_for_report(rf.run_dir, curve, o.eps_factors, o.eps_attack,
                                         o.eps_n, progress=tick, recompute=o.recompute_eps_curve)
        except UserError as exc:
            log.warning("warning: no ε curve: %s", exc)
            failed = f"the ε curve could not be computed ({exc})"
        ctx.tick(len(o.eps_factors) - done[0])
    elif o.eps_curve:
        ctx.tick(len(o.eps_factors))
    if curve is None:
        why = failed or ("skipped (--no-eps-curve)" if not o.eps_curve else
                         "no checkpoint to attack (checkpoints/last.pt) and no "
                         "eval/eps_curve.json")
        return unavailable(why)
    names = ctx.names if len(ctx.names) == len(curve["per_class"][0]) else [
        str(k) for k in range(len(curve["per_class"][0]))]
    fig = figures.eps_curve(curve["eps"], curve["per_class"], curve["avg"], names,
                            curve.get("attack", "attack"), curve.get("norm", ""))
    body = para(f"{curve.get('attack', 'the attack')} at several radii on a class-stratified "
                f"subset of the {curve.get('split', 'evaluation')} split (size below the table); "
                f"ε = 0 is clean accuracy. Accuracy should fall as ε grows; a class that "
                f"stays high at large ε hints at gradient masking.", "note")
    body += image(figures.to_base64(fig), "accuracy against epsilon per class")
    src = EPS_CURVE + "#"
    rows = []
    for e, eps in enumerate(curve["eps"]):
        row: list[Any] = [Num(eps, src + pointer("eps", e), "eps"),
                          Num(curve["avg"][e], src + pointer("avg", e), "pct")]
        if "worst" in curve:
            row.append(Num(curve["worst"][e], src + pointer("worst", e), "pct"))
        row += [Num(v, src + pointer("per_class", e, k), "pct")
                for k, v in enumerate(curve["per_class"][e])]
        rows.append(row)
    head = ["ε", "average"] + (["worst class"] if "worst" in curve else []) + names
    n = Num(curve["n"], src + pointer("n"), "int").span() if "n" in curve else "?"
    body += details("numbers", table(head, rows), open_=True)
    body += f'<p class="note">images used: {n}</p>'
    return body


# ---------------------------------------------------------------------------------- groups
def _groups(ctx: _Ctx) -> str:
    s = ctx.rf.summary or {}
    block = s.get("groups")
    if _is_group_block(block):
        return _summary_groups(block, ctx)
    body = ""
    if isinstance(block, dict | list):
        body += _generic_numbers(block, SUMMARY, ("groups",), "group figures in "
                                 "eval/summary.json")
    if ctx.rf.matrix is not None:
        g = derive.group_accuracy(ctx.rf.matrix)
        if g is not None:
            ctx.data["groups"] = g
            body += _group_figure(g, _group_names(s, g["num_groups"]))
    return body or unavailable("the data has no groups (no 'groups' in the evaluation)")


def _is_group_block(block: Any) -> bool:
    return (isinstance(block, dict) and isinstance(block.get("attacks"), dict)
            and bool(block["attacks"]) and all(isinstance(v, dict) and "per_group" in v
                                               for v in block["attacks"].values()))


_GROUP_ROWS = (("worst group", "worst_group"), ("best−worst gap", "group_gap"),
               ("worst (label, group) cell", "worst_label_group"),
               ("DP difference", "dp_diff"), ("EqOdds difference", "eqodds_diff"),
               ("EqOpp difference", "eopp_diff"), ("ED (pairwise)", "ed_pairwise"))


def _summary_groups(block: dict[str, Any], ctx: _Ctx) -> str:
    """The group figures that the evaluation wrote into ``summary["groups"]``."""
    cols = {a: (v, pointer("groups", "attacks", a)) for a, v in block["attacks"].items()}
    if isinstance(block.get("worst_case"), dict):
        cols["worst-case"] = (block["worst_case"], pointer("groups", "worst_case"))
    n = len(next(iter(cols.values()))[0]["per_group"])
    names = _group_names(ctx.rf.summary or {}, n)
    fig = figures.grouped_bars(names, {a: v["per_group"] for a, (v, _) in cols.items()},
                               "accuracy per group")
    body = image(figures.to_base64(fig), "accuracy per group")
    src = SUMMARY + "#"
    counts = block.get("counts")
    rows = []
    for k, name in enumerate(names):
        row: list[Any] = [name]
        if isinstance(counts, list) and len(counts) == n:
            row.append(Num(counts[k], src + pointer("groups", "counts", k), "int"))
        row += [Num(v["per_group"][k], src + p + pointer("per_group", k), "pct",
                    "worst" if v.get("worst_group_index") == k else "")
                for v, p in cols.values()]
        rows.append(row)
    pad = [""] if isinstance(counts, list) and len(counts) == n else []
    for label, key in _GROUP_ROWS:
        if any(key in v for v, _ in cols.values()):
            rows.append([label] + pad + [Num(v[key], src + p + pointer(key), "pct")
                                         if key in v else "" for v, p in cols.values()])
    head = ["group"] + (["count"] if pad else []) + list(cols)
    from ..metrics.groups import difference_definition

    defs = block.get("differences") or difference_definition(ctx.rf.num_classes())
    body += table(head, rows, caption=f"accuracy (%) per group and fairness differences (%; "
                  f"DP, EqOdds, EqOpp: {defs}) under each attack")
    return body + _label_group_table(cols, names, ctx)


def _label_group_table(cols: dict[str, tuple[dict[str, Any], str]], names: list[str],
                       ctx: _Ctx) -> str:
    attack = strongest_attack([a for a in cols if a != "worst-case"], ctx.rf.summary,
                              allow_worst_case=False)
    if attack is None or not isinstance(cols[attack][0].get("per_label_group"), list):
        return ""
    v, p = cols[attack]
    cells = v["per_label_group"]
    if len(cells) != len(ctx.names):
        return ""
    rows = [[cname] + [Num(x, f"{SUMMARY}#{p}{pointer('per_label_group', i, k)}", "pct")
                       for k, x in enumerate(r)]
            for i, (cname, r) in enumerate(zip(ctx.names, cells, strict=True))]
    return details(f"accuracy (%) per (class, group) under {attack}",
                   table(["class \\ group"] + names, rows))


def _group_names(summary: dict[str, Any], n: int) -> list[str]:
    names = _get(summary, "groups", "names") or _get(summary, "settings", "group_names")
    names = [f"group {x}" if str(x).isdigit() else x for x in names] if names else names
    if isinstance(names, list) and len(names) == n:
        return [str(x) for x in names]
    return [f"group {k}" for k in range(n)]


def _group_figure(g: dict[str, Any], names: list[str]) -> str:
    atk = g["attacks"]
    fig = figures.grouped_bars(names, {a: v["per_class"] for a, v in atk.items()},
                               "accuracy per group")
    body = image(figures.to_base64(fig), "accuracy per group")
    rows = []
    for k, name in enumerate(names):
        rows.append([name] + [
            Num(v["per_class"][k], DATA + "#" + pointer("groups", "attacks", a, "per_class", k),
                "pct", "worst" if v.get("worst_class") == k else "")
            for a, v in atk.items()])
    for label, key in (("average", "avg"), ("worst group", "worst"), ("best−worst gap", "gap")):
        rows.append([label] + [Num(v[key], f"{DATA}#{pointer('groups', 'attacks', a, key)}",
                                   "pct") if key in v else "" for a, v in atk.items()])
    return body + table(["group"] + list(atk), rows,
                        caption="accuracy (%) per group, from the evaluation matrix")


def _generic_numbers(obj: Any, file: str, prefix: tuple[Any, ...], caption: str) -> str:
    rows = []
    for path, v in _leaves(obj, prefix):
        if isinstance(v, bool) or not isinstance(v, int | float | str) or v is None:
            continue
        fmt = "str" if isinstance(v, str) else "int" if isinstance(v, int) else "num"
        rows.append([" / ".join(str(p) for p in path[len(prefix):]),
                     Num(v, f"{file}#{pointer(*path)}", fmt)])
    return table(["figure", "value"], rows, caption=caption) if rows else ""


def _leaves(obj: Any, path: tuple[Any, ...]) -> list[tuple[tuple[Any, ...], Any]]:
    if isinstance(obj, dict):
        return [x for k, v in obj.items() for x in _leaves(v, (*path, k))]
    if isinstance(obj, list):
        return [x for i, v in enumerate(obj) for x in _leaves(v, (*path, i))]
    return [(path, obj)]


# ---------------------------------------------------------------------------------- state
def _method_state(ctx: _Ctx) -> str:
    series = derive.method_state(ctx.rf.log)
    body = ""
    if series:
        arrays = {"/".join([s["part"], *s["path"]]): derive.as_array(s["values"])
                  for s in series}
        names_for = {k: _state_names(s, ctx) for k, s in zip(arrays, series, strict=True)}
        # a quantity that never changes (e.g. DAFA's warm-up length) is a setting: a table
        # row, not a flat line
        constant = [k for k, a in arrays.items() if len(a) > 1 and np.all(a == a[0])]
        moving = [k for k in arrays if k not in constant]
        by_key = dict(zip(arrays, series, strict=True))
        epochs = series[0]["epochs"]
        if moving and all(by_key[k]["epochs"] == epochs for k in moving):
            fig = figures.state_over_epochs(epochs, {k: arrays[k] for k in moving}, names_for)
            body += image(figures.to_base64(fig), "method state over epochs")
        else:
            for k in moving:
                fig = figures.state_over_epochs(by_key[k]["epochs"], {k: arrays[k]}, names_for)
                body += image(figures.to_base64(fig), f"{k} over epochs")
        if constant:
            body += _constant_table(constant, by_key, names_for)
        for key, s in by_key.items():
            body += details(f"{key} per epoch", _state_table(s, names_for[key]))
    for p in ctx.rf.cam_images:
        rel = p.relative_to(ctx.rf.run_dir)
        b64 = base64.b64encode(p.read_bytes()).decode("ascii")
        body += para(f"mask / class-activation-map examples: {rel}", "note") + image(b64, str(rel))
    return body or unavailable(
        "the method logs no policy or sampler state in log.jsonl and no CAM image was saved "
        "('robustfair analyze RUN_DIR --cam' writes one)")


def _constant_table(keys: list[str], by_key: dict[str, dict[str, Any]],
                    names_for: dict[str, list[str]]) -> str:
    """The logged quantities that kept one value over the whole run (not plotted)."""
    rows = []
    for key in keys:
        s = by_key[key]
        first = pointer(s["lines"][0], s["part"], *s["path"])
        values = [f"{n}: " + Num(v, f"{LOG}#{first}{pointer(*idx)}", "num").span()
                  if len(s["index"]) > 1 else Num(v, f"{LOG}#{first}{pointer(*idx)}",
                                                  "num").span()
                  for n, idx, v in zip(names_for[key], s["index"], s["values"][0], strict=True)]
        span = [Num(s["epochs"][k], f"{LOG}#{pointer(s['lines'][k], 'epoch')}", "int").span()
                for k in (0, -1)]
        rows.append([key, Raw("; ".join(values)), Raw(f"epochs {span[0]}–{span[1]}")])
    return table(["quantity", "value", "logged"], rows, css="left",
                 caption="unchanged over training (not plotted)")


def _state_names(s: dict[str, Any], ctx: _Ctx) -> list[str]:
    """Column names: class or group names where the length says so, else the indices."""
    c = ctx.rf.num_classes()
    summary = ctx.rf.summary or {}
    n_groups = _get(summary, "groups", "num_groups")
    groups = _group_names(summary, n_groups) if isinstance(n_groups, int) else []

    def axis(n: int, prefer_groups: bool = False) -> list[str]:
        if prefer_groups and n == len(groups) and n > 1:
            return groups
        if n == c and c > 1:
            return ctx.names
        if n == len(groups) and n > 1:
            return groups
        return [str(i) for i in range(n)]

    if not s["shape"]:
        return [s["path"][-1]]
    if len(s["shape"]) == 1:
        return axis(s["shape"][0])
    # a matrix (e.g. FairBatch's and Dr-Fairness' λ): rows are labels, columns groups
    rows, cols = axis(s["shape"][0]), axis(s["shape"][1], prefer_groups=True)
    return [f"{rows[i]} / {cols[j]}" for i, j in s["index"]]


def _state_table(s: dict[str, Any], names: list[str]) -> str:
    rows = []
    for e, line, values in zip(s["epochs"], s["lines"], s["values"], strict=True):
        base = pointer(line, s["part"], *s["path"])
        cells = [Num(v, f"{LOG}#{base}{pointer(*idx)}", "num")
                 for idx, v in zip(s["index"], values, strict=True)]
        rows.append([Num(e, f"{LOG}#{pointer(line, 'epoch')}", "int")] + cells)
    return table(["epoch"] + names, rows)


# ---------------------------------------------------------------------------------- checks
def _checks(ctx: _Ctx) -> str:
    if ctx.rf.checks is None:
        return unavailable("no eval/checks.json (the sanity checks have not been run)")
    rows = _check_rows(ctx.rf.checks, ())
    if not rows:
        return _generic_numbers(ctx.rf.checks, CHECKS, (), "eval/checks.json") or unavailable(
            "eval/checks.json holds no check")
    return table(["check", "verdict", "details"], rows, caption="sanity checks of the evaluation",
                 css="left")


_VERDICT_KEYS = ("passed", "ok", "pass", "status", "verdict", "result", "flag")
_NAME_KEYS = ("name", "check", "id", "title")


def _check_rows(obj: Any, path: tuple[Any, ...]) -> list[list[Any]]:
    if isinstance(obj, dict) and isinstance(obj.get("checks"), list | dict):
        return _check_rows(obj["checks"], (*path, "checks"))
    items: list[tuple[Any, Any, tuple[Any, ...]]] = []
    if isinstance(obj, list):
        items = [(None, v, (*path, i)) for i, v in enumerate(obj)]
    elif isinstance(obj, dict):
        items = [(k, v, (*path, k)) for k, v in obj.items()]
    rows = []
    for key, v, p in items:
        row = _check_row(key, v, p)
        if row is not None:
            rows.append(row)
    return rows


def _check_row(key: Any, v: Any, p: tuple[Any, ...]) -> list[Any] | None:
    src = CHECKS + "#"
    if isinstance(v, bool | str):
        if key is None:
            return None
        return [str(key), _verdict_num(v, src + pointer(*p)), ""]
    if not isinstance(v, dict):
        return None
    name_key = next((k for k in _NAME_KEYS if k in v), None)
    name: Any = Num(v[name_key], src + pointer(*p, name_key), "str") if name_key else str(key)
    vkey = next((k for k in _VERDICT_KEYS if k in v), None)
    verdict_cell: Any = _verdict_num(v[vkey], src + pointer(*p, vkey)) if vkey else ""
    parts = []
    for k, x in v.items():
        if k in (name_key, vkey) or isinstance(x, dict | list) or x is None:
            continue
        fmt = "str" if isinstance(x, str | bool) else "int" if isinstance(x, int) else "num"
        parts.append(f"{esc(k)}: {Num(x, src + pointer(*p, k), fmt).span()}")
    return [name, verdict_cell, Raw("; ".join(parts))]


def _verdict_num(v: Any, src: str) -> Num:
    from .html import verdict

    css = {"PASS": "pass", "FAIL": "fail", "WARN": "warn"}.get(verdict(v), "")
    return Num(v, src, "verdict", css)


_BUILDERS: list[tuple[str, str, Callable[[_Ctx], str]]] = [
    ("settings", "Settings", _settings),
    ("training", "Training curves", _training),
    ("per-class", "Per-class accuracy under each attack", _per_class),
    ("confusion", "Confusion matrix under attack", _confusion),
    ("similarity", "Class similarity", _similarity),
    ("eps-curve", "Accuracy against ε", _eps_curve),
    ("groups", "Groups", _groups),
    ("method-state", "The method's state over training", _method_state),
    ("checks", "Sanity checks", _checks),
]

__all__ = ["SECTIONS", "ReportOptions", "build_report", "report_steps"]
