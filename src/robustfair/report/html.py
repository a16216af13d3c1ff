"""A small HTML builder for self-contained pages (no template engine, no external assets).

Every number is written with its provenance: ``data-src="FILE#/json/pointer"`` names the file
and the place in it where the number comes from (for ``log.jsonl`` the first pointer token is
the 0-based line), ``data-value`` holds the exact value as JSON and ``data-fmt`` the display
format, so that a reader (or a test) can check each figure on the page against its source.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

#: display formats of :class:`Num`: percent with 2 decimals, integer, 4 significant digits, a
#: radius (4 significant digits, and k/255 when it is one), a check verdict, JSON, text
FORMATS = ("pct", "int", "num", "eps", "verdict", "json", "str")


def fmt_value(value: Any, fmt: str) -> str:
    """The text shown for ``value`` in format ``fmt`` (``'–'`` for a missing value)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if fmt == "pct":
        return f"{100 * float(value):.2f}"
    if fmt == "int":
        return str(int(value))
    if fmt == "num":
        return f"{float(value):.4g}"
    if fmt == "eps":
        k = float(value) * 255
        inexact = float(f"{float(value):.4g}") != float(value)
        frac = f" (= {round(k)}/255)" if inexact and abs(k - round(k)) < 1e-6 else ""
        return f"{float(value):.4g}{frac}"
    if fmt == "verdict":
        return verdict(value)
    if fmt == "json":
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def verdict(value: Any) -> str:
    """PASS / FAIL / WARN for the usual ways of writing a check's outcome, else the text."""
    if isinstance(value, bool):
        return "PASS" if value else "FAIL"
    text = str(value).strip().lower()
    if text in ("pass", "passed", "ok", "true", "success"):
        return "PASS"
    if text in ("fail", "failed", "false", "error"):
        return "FAIL"
    if text in ("warn", "warning"):
        return "WARN"
    return str(value)


def pointer(*parts: Any) -> str:
    """JSON pointer (RFC 6901) from path parts: ``pointer('attacks', 'pgd20', 3)``."""
    return "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in parts)


@dataclass(frozen=True)
class Num:
    """A value shown on the page together with where it came from.

    Args:
        value: the exact value (as stored in the source file).
        src: ``FILE#POINTER``, e.g. ``eval/summary.json#/attacks/pgd20/avg``.
        fmt: one of :data:`FORMATS`.
        css: extra CSS classes of the table cell (e.g. ``worst``).
    """

    value: Any
    src: str
    fmt: str = "pct"
    css: str = ""

    def text(self) -> str:
        return fmt_value(self.value, self.fmt)

    def attrs(self) -> str:
        value = json.dumps(_jsonable(self.value))
        return (f' data-src="{esc(self.src)}" data-value="{esc(value)}" '
                f'data-fmt="{self.fmt}"')

    def span(self) -> str:
        return f"<span{self.attrs()}>{esc(self.text())}</span>"


@dataclass(frozen=True)
class Raw:
    """A table cell whose content is ready-made HTML (e.g. several :class:`Num` spans)."""

    html: str
    css: str = "text"


def _jsonable(v: Any) -> Any:
    if isinstance(v, float) and math.isnan(v):
        return None
    return v


def esc(text: Any) -> str:
    return html.escape(str(text), quote=True)


def cell(item: Any, header: bool = False) -> str:
    """A table cell: a :class:`Num`, or plain text (escaped)."""
    if isinstance(item, Raw):
        return f'<td class="{esc(item.css)}">{item.html}</td>'
    if isinstance(item, Num):
        cls = f' class="{esc(item.css)}"' if item.css else ""
        return f"<td{cls}{item.attrs()}>{esc(item.text())}</td>"
    tag = "th" if header else "td"
    scope = ' scope="row"' if header else ""
    return f"<{tag}{scope}>{esc(item)}</{tag}>"


def table(head: Sequence[str], rows: Iterable[Sequence[Any]], caption: str = "",
          row_headers: bool = True, css: str = "") -> str:
    """An HTML table; the first item of each row is a row header when ``row_headers``."""
    out = [f'<table class="{esc(css)}">' if css else "<table>"]
    if caption:
        out.append(f"<caption>{esc(caption)}</caption>")
    out.append("<thead><tr>" + "".join(f'<th scope="col">{esc(h)}</th>' for h in head)
               + "</tr></thead><tbody>")
    for row in rows:
        cells = [cell(x, header=row_headers and i == 0) for i, x in enumerate(row)]
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def image(b64_png: str, alt: str) -> str:
    return f'<img class="fig" alt="{esc(alt)}" src="data:image/png;base64,{b64_png}">'


def figure_grid(images: list[str]) -> str:
    """Several figures side by side (two per row)."""
    return f'<div class="figs">{"".join(images)}</div>'


def details(summary: str, body: str, open_: bool = False) -> str:
    return (f"<details{' open' if open_ else ''}><summary>{esc(summary)}</summary>"
            f"{body}</details>")


def para(text: str, css: str = "") -> str:
    cls = f' class="{esc(css)}"' if css else ""
    return f"<p{cls}>{esc(text)}</p>"


def section(sid: str, title: str, body: str) -> str:
    return f'<section id="{esc(sid)}"><h2>{esc(title)}</h2>{body}</section>'


def unavailable(reason: str) -> str:
    """The body of a section whose inputs are missing: says why and how to get them."""
    return para(f"Not available: {reason}", css="missing")


CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:0 auto;max-width:1150px;
padding:1em 2em;color:#222;line-height:1.4}
h1{margin-bottom:.2em}h2{border-bottom:2px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
nav a{margin-right:1em}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}
th,td{border:1px solid #ccc;padding:.2em .55em;text-align:right}
thead th{background:#f2f2f2}th[scope=row]{text-align:left;background:#fafafa}
caption{caption-side:top;text-align:left;font-weight:600;padding:.3em 0}
table.left td,table.left th{text-align:left}table.left th[scope=row]{white-space:nowrap}td.worst{background:#fbd5d5;font-weight:700}td.text{text-align:left}
td.pass{background:#d8f3dc}td.fail{background:#fbd5d5}td.warn{background:#fff3bf}
img.fig{max-width:100%;display:block;margin:.6em 0}
div.figs{display:flex;flex-wrap:wrap;gap:.5em}div.figs img.fig{max-width:49%}
p.missing{color:#777;font-style:italic}p.note{color:#555;font-size:.9em}
details{margin:.4em 0}summary{cursor:pointer;color:#333}
"""


def page(title: str, subtitle: str, sections: list[tuple[str, str, str]]) -> str:
    """The whole document: a title, a table of contents and the sections ``(id, title, body)``."""
    nav = "".join(f'<a href="#{esc(sid)}">{esc(t)}</a>' for sid, t, _ in sections)
    body = "".join(section(sid, t, b) for sid, t, b in sections)
    return (
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{esc(title)}</title><style>{CSS}</style></head><body>"
        f"<h1>{esc(title)}</h1>{para(subtitle, 'note')}<nav>{nav}</nav>{body}</body></html>\n"
    )
