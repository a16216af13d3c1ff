"""Compare runs in the layout of the DAFA paper's main table.

Columns: clean average / worst-class accuracy / ρ_nat, robust average / worst-class accuracy /
ρ_rob, with ρ = (worst − worst_base)/worst_base − (avg_base − avg)/avg_base against a baseline
(Lee et al., "DAFA: Distance-Aware Fair Adversarial Training", ICLR 2024, arXiv 2401.12532,
§5 and Table 1). Runs that differ only in their seed form one row, shown as mean ± std over the
seeds; ρ is computed from the rows' means.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from ..engine.history import NOT_SETTINGS as _NOT_SETTINGS
from ..engine.history import flatten as _flat
from ..engine.io import atomic_write_bytes, atomic_write_text, make_dir
from ..errors import UserError
from ..metrics.classwise import rho
from . import figures
from .html import esc, image, page, para
from .loading import CONFIG, SUMMARY, read_json

log = logging.getLogger("robustfair")

_SEED_SUFFIX = re.compile(r"[-_.]?(seed|s)[-_]?\d+$", re.I)
_AUTOATTACK = re.compile(r"^(autoattack|aa)([-_].*)?$")


@dataclass
class RunResult:
    """The evaluation of one run directory."""

    run_dir: Path
    name: str
    config: dict[str, Any] | None
    summary: dict[str, Any]

    def attacks(self) -> set[str]:
        names = set(self.summary.get("attacks", {}))
        return names | ({"worst_case"} if "worst_case" in self.summary else set())

    def figures(self, attack: str) -> dict[str, Any] | None:
        if attack == "worst_case":
            return self.summary.get("worst_case")
        return self.summary.get("attacks", {}).get(attack)


@dataclass
class Stat:
    """Mean and std (population, ddof 0) over the seeds of one row; ``values`` per run."""

    values: list[float]

    @property
    def mean(self) -> float:
        return float(np.mean(self.values)) if self.values else float("nan")

    @property
    def std(self) -> float:
        return float(np.std(self.values)) if len(self.values) > 1 else 0.0


@dataclass
class Row:
    """One method (a group of runs that differ only in the seed)."""

    label: str
    runs: list[RunResult]
    clean_avg: Stat
    clean_worst: Stat
    robust_avg: Stat
    robust_worst: Stat
    rho_nat: float = float("nan")
    rho_rob: float = float("nan")
    baseline: bool = False
    measured: dict[str, str] = field(default_factory=dict)


@dataclass
class Comparison:
    rows: list[Row]
    attack: str
    notes: list[str] = field(default_factory=list)

    @property
    def baseline(self) -> Row:
        return next(r for r in self.rows if r.baseline)


def load_result(run_dir: str | Path) -> RunResult:
    """The config and evaluation summary of a run directory."""
    run_dir = Path(run_dir)
    if not (run_dir / SUMMARY).exists():
        raise UserError(f"{str(run_dir)!r} has no eval/summary.json; evaluate it first with "
                        f"'robustfair eval {run_dir}'")
    config = None
    if (run_dir / CONFIG).exists():
        config = yaml.safe_load((run_dir / CONFIG).read_text(encoding="utf-8")) or {}
    name = str((config or {}).get("name") or run_dir.name)
    return RunResult(run_dir, name, config, read_json(run_dir / SUMMARY))


def group_key(result: RunResult, by: str) -> str:
    """What identifies a setting: the config without its seed (and name, output folder,
    description, device, logging), or the run name without a seed suffix (``-s1``,
    ``_seed2``)."""
    if by == "config" and result.config is not None:
        cfg = {k: v for k, v in result.config.items() if k not in _NOT_SETTINGS}
        return "config:" + json.dumps(cfg, sort_keys=True, default=str)
    return "name:" + base_name(result.name)


def base_name(name: str) -> str:
    return _SEED_SUFFIX.sub("", name) or name


def choose_attack(results: list[RunResult], requested: str | None = None) -> str:
    """The robust attack of the table: ``requested``, else the strongest present in every run:
    AutoAttack, then the per-sample worst case over the attacks, then PGD, then CW, then any."""
    common = set.intersection(*(r.attacks() for r in results))
    if requested is not None:
        req = "worst_case" if requested in ("worst-case", "worst_case") else requested
        lacking = [r.name for r in results if req not in r.attacks()]
        if lacking:
            raise UserError(f"--attack {requested!r} is missing from the evaluation of "
                            f"{', '.join(lacking)}; evaluate them with it, or pick one of: "
                            f"{', '.join(sorted(common - {'clean'})) or 'none in common'}")
        return req
    ranked = sorted(common - {"clean"}, key=lambda a: (
        0 if _AUTOATTACK.match(a) else 1 if a == "worst_case" else 2 if a.startswith("pgd")
        else 3 if a.startswith("cw") else 4, a))
    if not ranked:
        raise UserError("the runs have no attack in common besides 'clean'; evaluate them with "
                        "the same attacks, e.g. 'robustfair eval RUN --attack clean,pgd20'")
    return ranked[0]


def _row(label: str, runs: list[RunResult], attack: str) -> Row:
    def stat(att: str, key: str) -> Stat:
        vals = [(r.figures(att) or {}).get(key) for r in runs]
        return Stat([float(v) for v in vals if v is not None])

    return Row(label, runs, stat("clean", "avg"), stat("clean", "worst"), stat(attack, "avg"),
               stat(attack, "worst"))


#: what a run's figures were measured at, shown per row and required equal across runs
MEASURES = ("eps", "norm", "attack", "epochs")


def measured_at(result: RunResult, attack: str) -> dict[str, Any]:
    """The evaluation ε, norm and robust attack's settings and the training length of a run
    (None where the run does not say)."""
    s = result.summary.get("settings", {})
    names = (result.summary.get("worst_case", {}).get("over", []) if attack == "worst_case"
             else [attack])
    specs = [a for a in s.get("attacks", []) if isinstance(a, dict) and a.get("attack") in names]
    epochs = ((result.config or {}).get("train") or {}).get("epochs")
    return {"eps": s.get("eps"), "norm": s.get("norm"),
            "attack": json.dumps(specs, sort_keys=True) if specs else None, "epochs": epochs}


def fmt_eps(eps: Any) -> str:
    """ε as k/255 when it is one (8/255), else in 4 significant digits."""
    if not isinstance(eps, (int, float)):
        return "?"
    k = eps * 255
    short = f"{eps:g}"
    if len(short) > 4 and eps > 0 and abs(k - round(k)) < 1e-6:
        return f"{round(k)}/255"
    return f"{eps:.4g}"


def _shown(key: str, values: list[Any]) -> str:
    known = sorted({json.dumps(v) for v in values if v is not None})
    if not known:
        return "?"
    vals = [json.loads(v) for v in known]
    if key == "eps":
        return ", ".join(fmt_eps(v) for v in vals)
    if key == "attack":
        return ", ".join("; ".join(_attack_text(a) for a in json.loads(v)) for v in vals)
    return ", ".join(str(v) for v in vals)


def _attack_text(a: dict[str, Any]) -> str:
    fast = ("fast_queries", "near") if a.get("version") == "fast" else ()
    keys = [k for k in ("steps", "step_size", "restarts", "n_queries", "version", *fast)
            if a.get(k) is not None]
    inner = ", ".join(f"{k} {round(a[k], 5) if isinstance(a[k], float) else a[k]}" for k in keys)
    return f"{a.get('attack')}" + (f" ({inner})" if inner else "")


def check_measured_alike(results: list[RunResult], attack: str, allow_mixed: bool) -> list[str]:
    """Refuse runs measured at different ε, norm, attack settings or training lengths (a
    UserError naming them), or with ``allow_mixed`` return one note per difference."""
    notes = []
    label = {"eps": "ε", "norm": "norm", "attack": f"{attack} settings", "epochs": "epochs"}
    at = [measured_at(r, attack) for r in results]
    for key in MEASURES:
        by_value: dict[str, list[str]] = {}
        for r, m in zip(results, at, strict=True):
            if m[key] is not None:
                by_value.setdefault(json.dumps(m[key], sort_keys=True), []).append(r.name)
        if len(by_value) < 2:
            continue
        parts = [f"{_shown(key, [json.loads(v)])} ({', '.join(names[:3])}"
                 f"{', …' if len(names) > 3 else ''})" for v, names in by_value.items()]
        notes.append(f"the runs differ in {label[key]}: " + " vs ".join(parts))
    if notes and not allow_mixed:
        raise UserError("; ".join(notes) + "; compare runs measured alike (re-evaluate them with "
                        "the same settings, e.g. 'robustfair eval RUN --eps 8/255'), or pass "
                        "--allow-mixed to compare them anyway")
    return notes


def compare_runs(run_dirs: list[str | Path], baseline: str | Path | None = None,
                 attack: str | None = None, group_by: str = "config",
                 allow_mixed: bool = False) -> Comparison:
    """Rows of the comparison table (baseline first), ρ against the baseline row.

    Runs measured at different ε, norm or robust-attack settings, or trained for different
    numbers of epochs, are refused unless ``allow_mixed`` (then the differences are notes)."""
    if not run_dirs:
        raise UserError("give one or more run directories to compare")
    results = [load_result(d) for d in run_dirs]
    base_dir = Path(baseline).resolve() if baseline is not None else None
    if base_dir is not None and base_dir not in [r.run_dir.resolve() for r in results]:
        results.insert(0, load_result(base_dir))
    att = choose_attack(results, attack)
    mixed = check_measured_alike(results, att, allow_mixed)
    groups: dict[str, list[RunResult]] = {}
    for r in results:  # runs measured differently are never pooled as seeds of one row
        key = group_key(r, group_by) + json.dumps(measured_at(r, att), sort_keys=True)
        groups.setdefault(key, []).append(r)
    rows = [_row(base_name(g[0].name), g, att) for g in groups.values()]
    _unique_labels(rows)
    base = rows[0] if base_dir is None else next(
        row for row in rows if base_dir in [r.run_dir.resolve() for r in row.runs])
    base.baseline = True
    rows.remove(base)
    rows.insert(0, base)
    for row in rows:
        row.rho_nat = rho(row.clean_avg.mean, row.clean_worst.mean, base.clean_avg.mean,
                          base.clean_worst.mean)
        row.rho_rob = rho(row.robust_avg.mean, row.robust_worst.mean, base.robust_avg.mean,
                          base.robust_worst.mean)
    for row in rows:
        at = [measured_at(r, att) for r in row.runs]
        row.measured = {k: _shown(k, [m[k] for m in at]) for k in MEASURES}
    comp = Comparison(rows, att, notes=list(mixed))
    if att == "worst_case":
        overs = {tuple(r.summary["worst_case"].get("over", [])) for r in results}
        if len(overs) > 1:
            comp.notes.append("the worst case is taken over different attacks in different "
                              "runs: " + "; ".join(", ".join(o) for o in sorted(overs)))
    for note in comp.notes:
        log.warning("warning: %s", note)
    return comp


def _unique_labels(rows: list[Row]) -> None:
    """Rows that share a name are told apart by the settings in which they differ."""
    by_label: dict[str, list[Row]] = {}
    for row in rows:
        by_label.setdefault(row.label, []).append(row)
    for label, same in by_label.items():
        if len(same) < 2:
            continue
        flats = [_flat({k: v for k, v in (r.runs[0].config or {}).items()
                        if k not in _NOT_SETTINGS}) for r in same]
        keys = sorted({k for f in flats for k in f if len({str(g.get(k)) for g in flats}) > 1})
        for i, (row, f) in enumerate(zip(same, flats, strict=True)):
            diff = ", ".join(f"{k}={f.get(k)}" for k in keys[:3])
            row.label = f"{label} [{diff}]" if diff else f"{label} ({i + 1})"


# ------------------------------------------------------------------------------- output
HEAD = ["method", "runs", "clean avg", "clean worst", "ρ_nat", "robust avg", "robust worst",
        "ρ_rob", "ε", "norm", "epochs"]


def _pm(s: Stat) -> str:
    if not s.values:
        return "–"
    text = f"{100 * s.mean:.2f}"
    return text + (f" ± {100 * s.std:.2f}" if len(s.values) > 1 else "")


def _rho(v: float) -> str:
    return "–" if np.isnan(v) else f"{v:.2f}"


def table_rows(comp: Comparison) -> list[list[str]]:
    """The table's cells as text (accuracies in percent, mean ± std over seeds)."""
    return [[row.label, str(len(row.runs)), _pm(row.clean_avg), _pm(row.clean_worst),
             _rho(row.rho_nat), _pm(row.robust_avg), _pm(row.robust_worst), _rho(row.rho_rob),
             row.measured.get("eps", "?"), row.measured.get("norm", "?"),
             row.measured.get("epochs", "?")]
            for row in comp.rows]


def settings_text(comp: Comparison) -> str:
    """ε, norm, robust attack and epochs of the comparison (per row when they differ)."""
    parts = []
    for key, label in (("eps", "ε"), ("norm", "norm"), ("attack", "attack"),
                       ("epochs", "epochs")):
        vals = {row.measured.get(key, "?") for row in comp.rows}
        parts.append(f"{label} {vals.pop()}" if len(vals) == 1 else f"{label} differs by row")
    return ", ".join(parts)


def caption(comp: Comparison) -> str:
    return (f"Accuracy (%) on the evaluation split, mean ± std (ddof 0) over the seeds of each "
            f"row; robust = {comp.attack}"
            + (" (per-sample worst case over the attacks)" if comp.attack == "worst_case" else "")
            + f"; ρ against {comp.baseline.label}, from the rows' means; measured at "
            + settings_text(comp) + "; each run's main evaluation (eval/summary.json; others "
            "in eval/index.json are not used).")


def to_markdown(comp: Comparison) -> str:
    lines = ["| " + " | ".join(HEAD) + " |", "|" + "---|" * len(HEAD)]
    lines += ["| " + " | ".join(r) + " |" for r in table_rows(comp)]
    return "\n".join(lines) + "\n\n" + caption(comp) + "\n"


def to_csv(comp: Comparison) -> str:
    """Machine-readable form: accuracies as fractions in [0, 1], full precision."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["method", "runs", "run_dirs", "attack", "baseline", "clean_avg", "clean_avg_std",
                "clean_worst", "clean_worst_std", "rho_nat", "robust_avg", "robust_avg_std",
                "robust_worst", "robust_worst_std", "rho_rob", "eps", "norm", "epochs"])
    for row in comp.rows:
        stats = [row.clean_avg, row.clean_worst, row.robust_avg, row.robust_worst]
        ms = [(s.mean, s.std) if s.values else ("", "") for s in stats]
        w.writerow([row.label, len(row.runs), ";".join(str(r.run_dir) for r in row.runs),
                    comp.attack, int(row.baseline), *ms[0], *ms[1], _num(row.rho_nat),
                    *ms[2], *ms[3], _num(row.rho_rob), *_measured_csv(row)])
    return buf.getvalue()


def _measured_csv(row: Row) -> list[Any]:
    """ε (as a number), norm and epochs of a row, '' where unknown or mixed."""
    at = [measured_at(r, "clean") for r in row.runs]
    out = []
    for key in ("eps", "norm", "epochs"):
        vals = {json.dumps(m[key]) for m in at}
        out.append("" if len(vals) != 1 or (v := json.loads(vals.pop())) is None else v)
    return out


def _num(v: float) -> Any:
    return "" if np.isnan(v) else v


def points(comp: Comparison) -> list[dict[str, Any]]:
    mixed = _mixed(comp)
    return [{"label": _point_label(r, mixed), "avg": r.robust_avg.mean,
             "worst": r.robust_worst.mean, "avg_std": r.robust_avg.std,
             "worst_std": r.robust_worst.std}
            for r in comp.rows if r.robust_avg.values]


def _mixed(comp: Comparison) -> bool:
    return any(len({row.measured.get(k) for row in comp.rows}) > 1 for k in MEASURES)


def _point_label(row: Row, mixed: bool) -> str:
    """The row's label; with its ε, norm and epochs when the rows differ in them."""
    m = row.measured
    return row.label + (f" (ε {m.get('eps')}, {m.get('norm')}, {m.get('epochs')} ep)"
                        if mixed else "")


def to_html(comp: Comparison, png_b64: str) -> str:
    head = "".join(f'<th scope="col">{esc(h)}</th>' for h in HEAD)
    body = "".join("<tr>" + "".join(
        f'<th scope="row">{esc(c)}</th>' if i == 0 else f"<td>{esc(c)}</td>"
        for i, c in enumerate(r)) + "</tr>" for r in table_rows(comp))
    runs = "".join(f"<li>{esc(row.label)}: {esc(', '.join(str(r.run_dir) for r in row.runs))}"
                   f"</li>" for row in comp.rows)
    tbl = (f"<table><caption>{esc(caption(comp))}</caption><thead><tr>{head}</tr></thead>"
           f"<tbody>{body}</tbody></table>")
    notes = "".join(para("Note: " + n, "note") for n in comp.notes)
    sections = [("table", "Table", tbl + notes),
                ("figure", "Average against worst class", image(png_b64, "average against "
                                                                "worst-class robust accuracy")),
                ("runs", "Runs", f"<ul>{runs}</ul>")]
    return page("robustfair comparison", f"robust attack: {comp.attack}; baseline: "
                f"{comp.baseline.label}", sections)


def write_outputs(comp: Comparison, out_dir: str | Path) -> dict[str, Path]:
    """Write ``compare.md``, ``compare.csv``, ``compare.html`` and ``avg_vs_worst.png``."""
    out = make_dir(out_dir)
    fig = figures.avg_vs_worst(points(comp), comp.attack,
                               _point_label(comp.baseline, _mixed(comp)))
    fig.axes[0].set_title(f"robust accuracy: average against worst class\n{settings_text(comp)}",
                          fontsize=9)
    png = figures.to_png(fig)
    import base64

    paths = {"markdown": out / "compare.md", "csv": out / "compare.csv",
             "html": out / "compare.html", "figure": out / "avg_vs_worst.png"}
    atomic_write_text(paths["markdown"], to_markdown(comp))
    atomic_write_text(paths["csv"], to_csv(comp))
    atomic_write_bytes(paths["figure"], png)
    atomic_write_text(paths["html"], to_html(comp, base64.b64encode(png).decode("ascii")))
    return paths
