"""Paired comparison of runs over seeds: for every row of a comparison, the per-seed differences
against the baseline row (same seed on both sides) and a 95% t-interval on their mean
(:mod:`robustfair.metrics.stats`), for the clean and robust average and worst-class accuracy."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..engine.io import atomic_write_text
from ..errors import UserError
from ..metrics.stats import PairedInterval, paired_interval
from .compare import Comparison, Row, RunResult

#: (column, attack key, summary field); the robust attack is the comparison's
FIGURES = (("clean avg", "clean", "avg"), ("clean worst", "clean", "worst"),
           ("robust avg", None, "avg"), ("robust worst", None, "worst"))
_SEED_IN_NAME = re.compile(r"(?:seed|s)[-_]?(\d+)$", re.I)


def run_seed(result: RunResult) -> int:
    """The seed of a run: its config's ``seed``, else a ``-sN`` / ``_seedN`` name suffix."""
    if result.config is not None and "seed" in result.config:
        return int(result.config["seed"])
    m = _SEED_IN_NAME.search(result.name)
    if m is None:
        raise UserError(f"run {str(result.run_dir)!r} has no config.yaml and no seed suffix in "
                        f"its name; --paired needs each run's seed")
    return int(m.group(1))


@dataclass
class PairedRow:
    label: str
    seeds: list[int]
    intervals: dict[str, PairedInterval]


def _by_seed(row: Row) -> dict[int, RunResult]:
    out: dict[int, RunResult] = {}
    for r in row.runs:
        s = run_seed(r)
        if s in out:
            raise UserError(f"{row.label!r} has two runs with seed {s} ({out[s].run_dir}, "
                            f"{r.run_dir}); --paired needs one run per seed and setting")
        out[s] = r
    return out


def _figure(r: RunResult, attack: str, key: str) -> float:
    fig = r.figures(attack) or {}
    if fig.get(key) is None:
        raise UserError(f"run {str(r.run_dir)!r} has no {attack} {key} figure; evaluate it with "
                        f"the same attacks as the others")
    return 100.0 * float(fig[key])


def paired_rows(comp: Comparison, level: float = 0.95) -> list[PairedRow]:
    """Each non-baseline row against the baseline, on the seeds both have (at least 2)."""
    base = _by_seed(comp.baseline)
    out = []
    for row in comp.rows:
        if row.baseline:
            continue
        mine = _by_seed(row)
        seeds = sorted(set(mine) & set(base))
        if len(seeds) < 2:
            raise UserError(f"{row.label!r} shares {len(seeds)} seed(s) with the baseline "
                            f"{comp.baseline.label!r}; --paired needs at least 2 common seeds")
        ivs = {}
        for col, att, key in FIGURES:
            a = att or comp.attack
            ivs[col] = paired_interval([_figure(mine[s], a, key) for s in seeds],
                                       [_figure(base[s], a, key) for s in seeds], level)
        out.append(PairedRow(row.label, seeds, ivs))
    return out


def paired_markdown(comp: Comparison, level: float = 0.95) -> str:
    """The paired table: per-seed differences and the t-interval, in percentage points."""
    rows = paired_rows(comp, level)
    head = ["method", "seeds", *(c for c, _, _ in FIGURES)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r.label, ",".join(map(str, r.seeds))]
        for col, _, _ in FIGURES:
            iv = r.intervals[col]
            cells.append(f"{iv.mean:+.2f} [{iv.low:+.2f}, {iv.high:+.2f}] "
                         f"({', '.join(f'{d:+.1f}' for d in iv.diffs)})")
        lines.append("| " + " | ".join(cells) + " |")
    caption = (f"Paired differences against {comp.baseline.label} (method − baseline, same "
               f"seed), percentage points: mean [{int(level * 100)}% Student-t interval] "
               f"(per-seed differences); robust = {comp.attack}.")
    return "\n".join(lines) + "\n\n" + caption + "\n"


def paired_json(comp: Comparison, level: float = 0.95) -> list[dict[str, Any]]:
    return [{"label": r.label, "seeds": r.seeds,
             **{c: iv.to_dict() for c, iv in r.intervals.items()}}
            for r in paired_rows(comp, level)]


def write_paired(comp: Comparison, out_dir: str | Path, level: float = 0.95) -> str:
    """Compute the paired table (raising before anything is written if runs cannot be paired),
    then write ``paired.md`` and ``paired.json`` into ``out_dir``; return the markdown."""
    md = paired_markdown(comp, level)
    data = paired_json(comp, level)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "paired.md", md)
    atomic_write_text(out / "paired.json", json.dumps({"baseline": comp.baseline.label,
                                                       "attack": comp.attack, "level": level,
                                                       "rows": data}, indent=1) + "\n")
    return md
