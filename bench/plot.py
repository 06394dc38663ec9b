"""Tiny dependency-free SVG line charts for the results (latency against rate)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from xml.sax.saxutils import escape

COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b")
Series = tuple[str, Sequence[tuple[float, float]]]


def line_chart(path: Path, title: str, x_label: str, y_label: str, series: Sequence[Series],
               log_y: bool = True) -> Path:  # fmt: skip
    """Write an SVG chart of ``series`` (name, [(x, y), ...]); y on a log scale by default (latencies)."""
    width, height, left, right, top, bottom = 720, 420, 70, 170, 40, 50
    points = [(x, y) for _name, pts in series for x, y in pts if y > 0 and math.isfinite(y)]
    if not points:
        path.write_text("<svg xmlns='http://www.w3.org/2000/svg'/>")
        return path
    x_max = max(x for x, _ in points) * 1.05
    ys = [y for _, y in points]

    def fy(y: float) -> float:
        return math.log10(y) if log_y else y

    y_lo = math.floor(fy(min(ys))) if log_y else 0.0
    y_hi = math.ceil(fy(max(ys))) if log_y else max(ys) * 1.1
    if y_hi <= y_lo:
        y_hi = y_lo + 1

    def sx(x: float) -> float:
        return left + x / x_max * (width - left - right)

    def sy(y: float) -> float:
        return height - bottom - (fy(y) - y_lo) / (y_hi - y_lo) * (height - top - bottom)

    out = [f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' font-family='sans-serif' "
           f"font-size='12'>", "<rect width='100%' height='100%' fill='white'/>",
           f"<text x='{width / 2}' y='22' text-anchor='middle' font-size='15'>{escape(title)}</text>",
           f"<line x1='{left}' y1='{height - bottom}' x2='{width - right}' y2='{height - bottom}' stroke='black'/>",
           f"<line x1='{left}' y1='{top}' x2='{left}' y2='{height - bottom}' stroke='black'/>",
           f"<text x='{(left + width - right) / 2}' y='{height - 12}' text-anchor='middle'>{escape(x_label)}</text>",
           f"<text x='16' y='{(top + height - bottom) / 2}' text-anchor='middle' "
           f"transform='rotate(-90 16 {(top + height - bottom) / 2})'>{escape(y_label)}</text>"]  # fmt: skip
    ticks = [10**e for e in range(int(y_lo), int(y_hi) + 1)] if log_y else [y_hi * i / 5 for i in range(6)]
    for tick in ticks:
        y = sy(tick)
        out.append(f"<line x1='{left}' y1='{y:.1f}' x2='{width - right}' y2='{y:.1f}' stroke='#ddd'/>")
        out.append(f"<text x='{left - 6}' y='{y + 4:.1f}' text-anchor='end'>{tick:g}</text>")
    for i in range(6):
        x = x_max * i / 5
        out.append(f"<text x='{sx(x):.1f}' y='{height - bottom + 16}' text-anchor='middle'>{x:,.0f}</text>")
    for n, (name, pts) in enumerate(series):
        colour = COLOURS[n % len(COLOURS)]
        good = [(x, y) for x, y in pts if y > 0 and math.isfinite(y)]
        if good:
            coords = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in good)
            out.append(f"<polyline points='{coords}' fill='none' stroke='{colour}' stroke-width='2'/>")
            out.extend(f"<circle cx='{sx(x):.1f}' cy='{sy(y):.1f}' r='3' fill='{colour}'/>" for x, y in good)
        ly = top + 16 * n + 10
        out.append(f"<line x1='{width - right + 10}' y1='{ly}' x2='{width - right + 30}' y2='{ly}' "
                   f"stroke='{colour}' stroke-width='2'/>")  # fmt: skip
        out.append(f"<text x='{width - right + 35}' y='{ly + 4}'>{escape(name)}</text>")
    out.append("</svg>")
    path.write_text("\n".join(out) + "\n")
    return path
