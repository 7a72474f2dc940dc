"""Self-contained HTML pages: one file, inline CSS and SVG, images as data: URIs, no script, no URL.

Shared by the doctor page and the run report. Every piece of text that comes from the user (class
names, paths, config values) goes through :func:`esc`; callers build the body from the helpers below,
which escape what they are given. The CSS is responsive (tables scroll sideways, a single column on a
phone) and has print rules (no shadows, avoid breaking a figure or table row across pages).
"""
from __future__ import annotations

import base64
import html
import io
import math
import re
from typing import Any, Iterable, Sequence

from finetune.core.io import printable
from finetune.data import load_image

__all__ = ["esc", "page", "table", "line_chart", "thumbnail_uri", "heatmap", "section", "GENERATOR"]

_CSS = """
:root{--fg:#1d2430;--muted:#5b6575;--line:#d8dde5;--bg:#fff;--soft:#f4f6f9;--bad:#b3261e;--ok:#1b6e3a}
*{box-sizing:border-box}
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:var(--fg);background:var(--bg);
 margin:0 auto;max-width:1100px;padding:12px 16px 40px}
h1{font-size:1.5em;margin:.4em 0 .2em}h2{font-size:1.2em;margin:1.4em 0 .4em;border-bottom:1px solid var(--line)}
p.sub{color:var(--muted);margin:.2em 0 1em}
.scroll{overflow-x:auto;-webkit-overflow-scrolling:touch;margin:.4em 0}
table{border-collapse:collapse;font-size:.92em;min-width:50%}
th,td{border:1px solid var(--line);padding:3px 7px;text-align:left;vertical-align:top}
th{background:var(--soft)}td.num{text-align:right;font-variant-numeric:tabular-nums}
code,.path{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:.9em;word-break:break-all}
.cards{display:flex;flex-wrap:wrap;gap:8px}
.card{border:1px solid var(--line);border-radius:6px;padding:6px 10px;background:var(--soft);min-width:9em}
.card b{display:block;font-size:1.4em}
.bad{color:var(--bad)}.ok{color:var(--ok)}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(150px,1fr));gap:10px}
figure{margin:0;border:1px solid var(--line);border-radius:6px;padding:6px;break-inside:avoid;page-break-inside:avoid}
figure img{width:100%;height:auto;max-height:170px;object-fit:contain;display:block}
figcaption{font-size:.82em;color:var(--muted);word-break:break-all}
svg{max-width:100%;height:auto;display:block}
ul.advice li{margin:.2em 0}
@media (max-width:600px){body{font-size:14px;padding:8px}.grid{grid-template-columns:repeat(2,1fr)}}
@media print{body{max-width:none;padding:0;font-size:11pt}.scroll{overflow:visible}
 h2{break-after:avoid;page-break-after:avoid}tr,figure,svg{break-inside:avoid;page-break-inside:avoid}
 .card{background:none}a{color:inherit;text-decoration:none}}
"""


def esc(value: Any) -> str:
    """HTML-escape any value (quotes included) on one line: file names that are not UTF-8, and control characters
    (a class folder named with a newline or a tab), are shown escaped, as the console prints them (a raw newline
    showed as a space, so ``ca\\nt`` read as ``ca t``)."""
    return html.escape(printable(value), quote=True)


GENERATOR = '<meta name="generator" content="zoo-finetune">'     # a page zoo drew (zoo report redraws it)


def page(title: str, subtitle: str, body: str) -> str:
    """A whole document around ``body`` (already HTML); ``title``/``subtitle`` are escaped here."""
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">" + GENERATOR +
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{esc(title)}</title><style>{_CSS}</style></head><body>"
            f"<h1>{esc(title)}</h1><p class=\"sub\">{esc(subtitle)}</p>{body}</body></html>\n")


def section(title: str, inner: str) -> str:
    return f"<section><h2>{esc(title)}</h2>{inner}</section>"


_SHOWN_NUMBER = re.compile(r"-|-?\d+(\.\d+)?%")   # a number already formatted (98.64%, "-" for none): as numbers


def _cell(v: Any) -> str:
    if isinstance(v, str) and _SHOWN_NUMBER.fullmatch(v):
        return f"<td class=\"num\">{v}</td>"
    if isinstance(v, float):
        if math.isnan(v):
            return "<td class=\"num\">-</td>"
        return f"<td class=\"num\">{v:.3f}</td>"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"<td class=\"num\">{v}</td>"
    return f"<td>{esc('' if v is None else v)}</td>"


def table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A table in a sideways-scrolling box; numbers right-aligned, text escaped."""
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(_cell(v) for v in row) + "</tr>" for row in rows)
    return f"<div class=\"scroll\"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>"


_COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b")


def _tick_texts(values: Sequence[float], *, log_y: bool = False, percent: bool = False) -> list[str]:
    """The y tick labels: ``percent``: fractions as percent (an accuracy, ``0.875`` -> ``87.5%``, as every printed
    accuracy reads); ``log_y``: ``values`` are the log10 of the labels; else the values themselves. 3 significant
    digits, more where they would print two ticks alike (99.9% to 100% read 99.9%, 99.9%, 100%, 100%, 100%)."""
    numbers = [10 ** v if log_y else v * 100 if percent else v for v in values]
    for digits in range(3, 17):
        labels = [f"{n:.{digits}g}" + ("%" if percent and not log_y else "") for n in numbers]
        if len(set(labels)) == len(labels):
            break
    return labels


def line_chart(title: str, x: Sequence[float], series: dict[str, Sequence[float | None]], *,
               log_y: bool = False, percent: bool = False, marks: Sequence[float] = (), width: int = 520,
               height: int = 220) -> str:
    """An inline SVG line chart (NaN/None points skipped); ``marks``: dashed vertical lines at these x;
    ``percent``: the y values are fractions (accuracies), labelled in percent (the data stays fractions)."""
    pad_l, pad_r, pad_t, pad_b = 56, 12, 22, 28
    pts = {k: [(float(a), float(b)) for a, b in zip(x, v) if b is not None and math.isfinite(float(b))
               and (not log_y or float(b) > 0)] for k, v in series.items()}
    ys = [b for v in pts.values() for _, b in v]
    if not ys or not x:
        return f"<p>{esc(title)}: no data</p>"
    tr = math.log10 if log_y else (lambda v: v)
    y0, y1 = tr(min(ys)), tr(max(ys))
    if y1 - y0 < 1e-12:     # one value: a band around it; an accuracy's within 0-100% (1.0 read "50%-150%")
        pad = 0.05 if percent else 0.5
        y0, y1 = (max(0.0, y0 - pad), min(1.0, y1 + pad)) if percent and 0 <= y0 <= 1 else (y0 - pad, y1 + pad)
    x0, x1 = float(min(x)), float(max(x))
    if x1 - x0 < 1e-12:
        x0, x1 = x0 - 0.5, x1 + 0.5
    w, h = width - pad_l - pad_r, height - pad_t - pad_b

    def px(a: float) -> float:
        return pad_l + (a - x0) / (x1 - x0) * w

    def py(b: float) -> float:
        return pad_t + (1 - (tr(b) - y0) / (y1 - y0)) * h

    parts = [f"<svg viewBox=\"0 0 {width} {height}\" role=\"img\" aria-label=\"{esc(title)}\" "
             f"font-size=\"11\" font-family=\"sans-serif\">",
             f"<text x=\"{pad_l}\" y=\"14\" font-weight=\"bold\">{esc(title)}</text>",
             f"<rect x=\"{pad_l}\" y=\"{pad_t}\" width=\"{w}\" height=\"{h}\" fill=\"none\" stroke=\"#bbb\"/>"]
    labels = _tick_texts([y0 + (y1 - y0) * t / 4 for t in range(5)], log_y=log_y, percent=percent)
    for t, label in enumerate(labels):
        yy = pad_t + (1 - t / 4) * h
        parts.append(f"<line x1=\"{pad_l}\" x2=\"{pad_l + w}\" y1=\"{yy:.1f}\" y2=\"{yy:.1f}\" stroke=\"#eee\"/>"
                     f"<text x=\"{pad_l - 4}\" y=\"{yy + 4:.1f}\" text-anchor=\"end\">{label}</text>")
    for t in range(5):
        v = x0 + (x1 - x0) * t / 4
        parts.append(f"<text x=\"{px(v):.1f}\" y=\"{height - 10}\" text-anchor=\"middle\">{v:.3g}</text>")
    for m in marks:
        parts.append(f"<line x1=\"{px(m):.1f}\" x2=\"{px(m):.1f}\" y1=\"{pad_t}\" y2=\"{pad_t + h}\" "
                     "stroke=\"#555\" stroke-dasharray=\"4 3\"/>")
    for k, (name, v) in enumerate(pts.items()):
        colour = _COLOURS[k % len(_COLOURS)]
        if v:
            path = " ".join(f"{px(a):.1f},{py(b):.1f}" for a, b in v)
            parts.append(f"<polyline fill=\"none\" stroke=\"{colour}\" stroke-width=\"1.8\" points=\"{path}\"/>")
        if len(v) <= 30:      # few points: each one visible (a single point draws no line)
            parts.extend(f"<circle cx=\"{px(a):.1f}\" cy=\"{py(b):.1f}\" r=\"3\" fill=\"{colour}\"/>" for a, b in v)
        parts.append(f"<text x=\"{pad_l + w - 4}\" y=\"{pad_t + 14 + 13 * k}\" text-anchor=\"end\" "
                     f"fill=\"{colour}\">{esc(name)}</text>")
    parts.append("</svg>")
    return "".join(parts)


def heatmap(labels: Sequence[str], matrix: Sequence[Sequence[int]]) -> str:
    """A confusion matrix as a table (rows: true class, columns: predicted) shaded by row fraction."""
    head = "<th>true \\ predicted</th>" + "".join(f"<th>{esc(c)}</th>" for c in labels)
    rows = []
    for name, row in zip(labels, matrix):
        total = sum(row) or 1
        cells = []
        for j, v in enumerate(row):
            a = v / total
            colour = "27,110,58" if labels[j] == name else "179,38,30"
            cells.append(f"<td class=\"num\" style=\"background:rgba({colour},{0.08 + 0.6 * a:.2f})\">{int(v)}</td>"
                         if v else "<td class=\"num\">0</td>")
        rows.append(f"<tr><th>{esc(name)}</th>{''.join(cells)}</tr>")
    return f"<div class=\"scroll\"><table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table></div>"


def thumbnail_uri(path: str, size: int = 160, quality: int = 80) -> str | None:
    """A JPEG data: URI of the image scaled to fit ``size`` px, or None when it cannot be read."""
    try:
        im = load_image(path)
        im.thumbnail((size, size))
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=quality)
    except Exception:  # noqa: BLE001 - a thumbnail is decoration: an unreadable image is just left out
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
