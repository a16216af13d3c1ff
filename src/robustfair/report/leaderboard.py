"""A leaderboard: several models evaluated on the same images with the same attack, one row per
model with clean and robust accuracy, the worst class, the gap, the robust accuracy of every
class and DAFA's ρ against a baseline. Each row records how it was measured (the images'
sha256 and indices, the attack's settings, the seed and the package versions), so the table can
be checked again.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..engine.io import atomic_write_json, atomic_write_text
from ..metrics.classwise import rho


@dataclass
class Entry:
    """One model's row: its label, where it came from, and the summary of its evaluation."""

    label: str
    source: dict[str, Any]
    summary: dict[str, Any]
    rho: float = float("nan")
    extra: dict[str, Any] = field(default_factory=dict)

    def figures(self, attack: str) -> dict[str, Any]:
        return self.summary["attacks"][attack]

    def record(self, attack: str) -> dict[str, Any]:
        """How the row was measured."""
        s = self.summary["settings"]
        sub = s.get("subset") or {}
        return {"model": self.label, **self.source, "dataset": s.get("dataset"),
                "images": {k: sub.get(k) for k in ("split", "n", "of", "rule", "seed",
                                                   "sha256", "indices")},
                "attack": next((a for a in s.get("attacks", []) if a.get("attack") == attack),
                               {"attack": attack}),
                "stages": s.get("stages", {}).get(attack), "eps": s.get("eps"),
                "norm": s.get("norm"), "seed": s.get("seed"), "versions": s.get("versions")}


@dataclass
class Leaderboard:
    entries: list[Entry]
    attack: str
    baseline: int = 0
    class_names: list[str] = field(default_factory=list)

    def compute_rho(self) -> None:
        b = self.entries[self.baseline].figures(self.attack)
        for e in self.entries:
            f = e.figures(self.attack)
            e.rho = rho(f["avg"], f["worst"], b["avg"], b["worst"])

    def header(self) -> list[str]:
        return (["model", "clean", self.attack, "worst class", "worst", "gap",
                 f"ρ vs {self.entries[self.baseline].label}"]
                + [f"{self.attack}: {c}" for c in self.class_names])

    def rows(self) -> list[list[str]]:
        out = []
        for e in self.entries:
            f = e.figures(self.attack)
            wc = f.get("worst_class")
            name = self.class_names[wc] if wc is not None and wc >= 0 else "-"
            out.append([e.label, _pct(e.figures("clean")["avg"]), _pct(f["avg"]),
                        f"{wc} ({name})", _pct(f["worst"]), _pct(f["gap"]),
                        "—" if e.rho != e.rho else f"{e.rho:+.3f}"]
                       + [_pct(v) for v in f["per_class"]])
        return out

    def caption(self) -> str:
        s = self.entries[0].summary["settings"]
        sub = s.get("subset") or {}
        return (f"{self.attack} at eps {float(s['eps']):.4g} ({s['norm']}), seed {s['seed']}, "
                f"on the same {sub.get('n')} of {sub.get('of')} {s.get('dataset')} "
                f"{sub.get('split', 'test')} images (sha256 {str(sub.get('sha256'))[:12]}); "
                f"accuracy in %; ρ = (worst − worst_base)/worst_base − (avg_base − avg)/avg_base "
                f"on the robust accuracy")


def _pct(v: Any) -> str:
    return "-" if v is None or v != v else f"{100 * float(v):.1f}"


def to_markdown(board: Leaderboard) -> str:
    head = board.header()
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in board.rows()]
    return "\n".join(lines) + f"\n\n{board.caption()}\n"


def to_csv(board: Leaderboard) -> str:
    """Accuracies as fractions, with the measurement record of each row in its last columns."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["model", "clean", "robust", "worst_class", "worst_class_name", "worst", "gap",
                "rho", *[f"robust_{c}" for c in board.class_names], "attack", "eps", "norm",
                "seed", "images_n", "images_sha256", "versions"])
    for e in board.entries:
        f, rec = e.figures(board.attack), e.record(board.attack)
        wc = f.get("worst_class")
        w.writerow([e.label, e.figures("clean")["avg"], f["avg"], wc,
                    board.class_names[wc] if wc is not None and wc >= 0 else "", f["worst"],
                    f["gap"], "" if e.rho != e.rho else e.rho, *f["per_class"],
                    json.dumps(rec["attack"]), rec["eps"], rec["norm"], rec["seed"],
                    rec["images"]["n"], rec["images"]["sha256"], json.dumps(rec["versions"])])
    return buf.getvalue()


def to_html(board: Leaderboard) -> str:
    from .html import details, page, para, table

    records = "".join(details(e.label, f"<pre>{_esc(json.dumps(e.record(board.attack), indent=1))}"
                                       f"</pre>") for e in board.entries)
    body = table(board.header(), board.rows(), caption=board.caption())
    return page("robustfair leaderboard", board.caption(),
                [("table", "Per-class robust accuracy", body),
                 ("records", "How each row was measured",
                  para("Images (indices and sha256), attack settings, seed and package versions "
                       "of each row.") + records)])


def _esc(text: str) -> str:
    from .html import esc

    return esc(text)


def write_outputs(board: Leaderboard, out: Path) -> dict[str, Path]:
    """leaderboard.md, .csv, .html and .json (every row's summary and record) in ``out``."""
    paths = {"markdown": out / "leaderboard.md", "csv": out / "leaderboard.csv",
             "html": out / "leaderboard.html", "json": out / "leaderboard.json"}
    atomic_write_text(paths["markdown"], to_markdown(board))
    atomic_write_text(paths["csv"], to_csv(board))
    atomic_write_text(paths["html"], to_html(board))
    atomic_write_json(paths["json"], {
        "attack": board.attack, "baseline": board.entries[board.baseline].label,
        "rows": [{"record": e.record(board.attack), "rho": None if e.rho != e.rho else e.rho,
                  "summary": e.summary} for e in board.entries]})
    return paths


__all__ = ["Entry", "Leaderboard", "to_csv", "to_html", "to_markdown", "write_outputs"]
