"""Shared by the benchmark printers: run a spec of ``benchmarks/specs`` with ``robustfair sweep``'s
runner (finished runs are kept and skipped) and read every run's evaluation back per row."""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

from robustfair.commands._common import setup_logging
from robustfair.sweep import SweepResult, load_spec, run_sweep

SPECS = Path(__file__).parent / "specs"


def parse_args(doc: str, argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=doc.strip().splitlines()[0])
    p.add_argument("--quick", action="store_true", help="the short version (its own spec)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="replace the spec's seeds")
    p.add_argument("--set", dest="extra", action="append", default=[], metavar="KEY=VALUE",
                   help="an override applied to every run (repeatable)")
    p.add_argument("--engine", choices=["local", "ray"], default="local")
    p.add_argument("--workers", type=int, default=None, help="concurrent local runs")
    p.add_argument("--address", default=None, help="Ray cluster address (--engine ray)")
    p.add_argument("--out", type=Path, default=None, help="sweep folder (default runs/NAME)")
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    return p.parse_args(argv)


def run(name: str, args: argparse.Namespace) -> SweepResult:
    """Run ``specs/NAME.yaml`` (``NAME-quick.yaml`` with ``--quick``); print the compare table."""
    spec = load_spec(SPECS / f"{name}{'-quick' if args.quick else ''}.yaml")
    if args.seeds:
        spec.seeds = args.seeds
    setup_logging(False)
    out = args.out or Path("runs") / str(spec.name)
    res = run_sweep(spec, out, args.extra, engine=args.engine, workers=args.workers,
                    address=args.address)
    for p in res.failed:
        print(f"failed: {p.trial.name}: {p.error}")
    if res.comparison is not None:
        from robustfair.report.compare import to_markdown

        print(to_markdown(res.comparison))
    for note in res.notes:
        print(f"note: {note}")
    return res


def summaries(res: SweepResult) -> dict[str, list[dict[str, Any]]]:
    """Every finished run's ``eval/summary.json``, per row of the spec, in its order."""
    rows: dict[str, list[dict[str, Any]]] = {}
    for p in res.planned:
        if p.status == "done":
            summary = json.loads((p.run_dir / "eval" / "summary.json").read_text())
            rows.setdefault(p.trial.row, []).append(summary | {"run_dir": str(p.run_dir)})
    return rows


def mean_std(values: list[float], scale: float = 100.0) -> str:
    """``mean ± std`` (population std, as the compare table) of ``values`` × ``scale``."""
    if not values:
        return "n/a"
    m = statistics.fmean(values) * scale
    s = statistics.pstdev(values) * scale if len(values) > 1 else 0.0
    return f"{m:5.1f} ± {s:4.1f}"


def attack_table(rows: dict[str, list[dict[str, Any]]], attacks: list[str]) -> str:
    """Average and worst-class accuracy (%) per row and attack, mean ± std over seeds."""
    w = max(8, *(len(r) for r in rows))
    head = f"{'method':<{w}}" + "".join(f"{a + ' avg':>16}{a + ' worst':>16}" for a in attacks)
    lines = [head, "-" * len(head)]
    for row, runs in rows.items():
        cells = ""
        for a in attacks:
            figs = [r["attacks"][a] for r in runs if a in r["attacks"]]
            cells += (f"{mean_std([f['avg'] for f in figs]):>16}"
                      f"{mean_std([f['worst'] for f in figs]):>16}")
        lines.append(f"{row:<{w}}" + cells)
    return "\n".join(lines)


def write_json(path: Path | None, payload: dict[str, Any]) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(payload, indent=1, default=str))
        print(f"saved: {path}")
