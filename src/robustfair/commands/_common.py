"""Shared helpers of the command-line sub-commands."""

from __future__ import annotations

import logging
import math
import sys
from typing import Any

import click


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is when a record is emitted, not to the stream it was
    when the handler was made: a command run from Python (a notebook, a test capturing
    output) leaves no handler writing to a stream that has since been closed."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property  # type: ignore[override]
    def stream(self):  # noqa: ANN201
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # noqa: ANN001
        pass


def setup_logging(quiet: bool) -> None:
    logger = logging.getLogger("robustfair")
    logger.handlers.clear()
    h = _StderrHandler()
    h.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(h)
    logger.setLevel(logging.WARNING if quiet else logging.INFO)
    logger.propagate = False


def pct(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "  -  "
    return f"{100 * v:5.1f}"


def bf16_rows(settings: dict[str, Any]) -> list[str]:
    """The rows of an evaluation whose attacks ran in bf16 (``eval.precision``)."""
    prec = settings.get("precision")
    checks = prec.get("checks", {}) if isinstance(prec, dict) else {}
    return [r for r, c in checks.items() if c.get("used") == "bf16"]


def class_table(summary: dict[str, Any], class_names: list[str] | None = None,
                title: str = "") -> str:
    """Per-class accuracy table (rows: classes; columns: attacks), then avg / worst / gap / std."""
    attacks = list(summary["attacks"])
    cols = attacks + (["worst-case"] if "worst_case" in summary else [])
    data = {a: summary["attacks"][a] for a in attacks}
    if "worst_case" in summary:
        data["worst-case"] = summary["worst_case"]
    c = summary["num_classes"]
    names = class_names or summary.get("settings", {}).get("class_names") or [
        str(i) for i in range(c)]
    w = max(8, *(len(a) + 1 for a in cols))
    nw = max(7, *(len(str(n)) for n in names[:c]))
    lines = []
    s = summary.get("settings", {})
    if title:
        lines.append(title)
    if s:
        steps = ", ".join(
            f"{a['attack']}" + (f" (steps {a['steps']}, step size "
                                f"{'2.5·eps/steps' if a.get('step_size') is None else round(a['step_size'], 5)})"
                                if "steps" in a else "")
            for a in s.get("attacks", []) if a.get("attack") != "clean")
        lines.append(f"eps {s.get('eps', 0):.4f} ({s.get('norm', '')}), seed {s.get('seed')}, "
                     f"n {summary.get('n')}" + (f"; attacks: {steps}" if steps else ""))
        half = bf16_rows(s)
        if half:
            lines.append(f"attacked in bf16 (checked against fp32 on each row's first batch, "
                         f"verdicts in fp32): {', '.join(half)}")
    lines.append(f"{'class':<{nw}} {'count':>6} " + " ".join(f"{a:>{w}}" for a in cols))
    counts = data[cols[0]]["counts"]
    for k in range(c):
        row = f"{str(names[k]):<{nw}} {counts[k]:>6} "
        row += " ".join(f"{pct(data[a]['per_class'][k]):>{w}}" for a in cols)
        worst_marks = [a for a in cols if data[a].get("worst_class") == k]
        lines.append(row + ("  ← worst" if worst_marks and cols[-1] in worst_marks else ""))
    lines.append("-" * (nw + 8 + (w + 1) * len(cols)))
    for label, key in (("average", "avg"), ("worst", "worst"), ("gap", "gap"), ("std", "std")):
        lines.append(f"{label:<{nw}} {'':>6} " + " ".join(
            f"{pct(data[a].get(key)):>{w}}" for a in cols))
    if summary.get("groups"):
        from ..metrics.groups import group_table

        lines += ["", group_table(summary)]
    return "\n".join(lines)


def echo_err(msg: str) -> None:
    click.echo(msg, err=True)
