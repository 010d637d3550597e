"""Line charts for the run report, as HTML fragments that need no file beside them.

With matplotlib installed (the `[report]` extra) a chart is a PNG embedded as a data: URI; without it, an
inline SVG drawn here, so the report works with the core dependencies alone. matplotlib is used through
its object API (Figure + Agg), never pyplot, so no global state or GUI backend is touched.
"""

from __future__ import annotations

import base64
import html
import importlib.util
import io
import math
from dataclasses import dataclass

COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"]
WIDTH, HEIGHT = 560, 280  # pixels; the PNG is drawn at this size too
MAX_POINTS = 400  # a long run is averaged into this many points per line
FEW_POINTS = 20  # lines this short get point markers


@dataclass
class Series:
    label: str
    x: list[float]
    y: list[float]
    dashed: bool = False


def thin(x: list[float], y: list[float], max_points: int = MAX_POINTS) -> tuple[list[float], list[float]]:
    """Average consecutive points into at most `max_points` bins: a long run's curve stays light and readable."""
    if len(x) <= max_points:
        return x, y
    bins = [(i * len(x) // max_points, (i + 1) * len(x) // max_points) for i in range(max_points)]
    return ([sum(x[a:b]) / (b - a) for a, b in bins], [sum(y[a:b]) / (b - a) for a, b in bins])


def have_matplotlib() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def chart(title: str, series: list[Series], ylabel: str = "", renderer: str = "auto") -> str:
    """One chart as an HTML fragment: renderer "png" (matplotlib), "svg", or "auto" (png when possible)."""
    series = [Series(s.label, *thin(s.x, s.y), s.dashed) for s in series if s.x]
    if renderer == "auto":
        renderer = "png" if have_matplotlib() else "svg"
    return (_png if renderer == "png" else _svg)(title, series, ylabel)


def _png(title: str, series: list[Series], ylabel: str) -> str:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(WIDTH / 100, HEIGHT / 100), dpi=100)
    fig.subplots_adjust(left=0.14, right=0.98, top=0.9, bottom=0.16)  # fixed margins: twice as fast as a layout engine
    ax = fig.add_subplot()
    for i, s in enumerate(series):
        ax.plot(s.x, s.y, label=s.label, color=COLOURS[i % len(COLOURS)], linestyle="--" if s.dashed else "-",
                linewidth=1.4, marker="o" if len(s.x) <= FEW_POINTS else None, markersize=3)
    ax.set_title(title, fontsize=11)
    ax.set_xlabel("step")
    ax.xaxis.get_major_locator().set_params(integer=True)  # steps are whole numbers
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    if series:
        ax.legend(fontsize=8, ncols=min(4, len(series)), loc="best")
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return f'<img class="chart" alt="{html.escape(title)}" src="data:image/png;base64,{data}">'


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """About `count` round values covering [lo, hi] (steps of 1, 2 or 5 times a power of ten)."""
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0)
    raw = (hi - lo) / count
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    start = math.floor(lo / step) * step
    return [start + i * step for i in range(int(math.ceil((hi - start) / step)) + 1)]


def _label(v: float) -> str:
    return f"{v:.4g}"


def _svg(title: str, series: list[Series], ylabel: str) -> str:
    left, right, bottom = 64, 16, 40
    top = 34 + 14 * math.ceil(len(series) / 4)  # room for the legend rows
    xs = [v for s in series for v in s.x] or [0.0, 1.0]
    ys = [v for s in series for v in s.y if math.isfinite(v)] or [0.0, 1.0]
    xt, yt = nice_ticks(min(xs), max(xs)), nice_ticks(min(ys), max(ys))
    (x0, x1), (y0, y1) = (xt[0], xt[-1]), (yt[0], yt[-1])

    def px(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * (WIDTH - left - right)

    def py(y: float) -> float:
        return HEIGHT - bottom - (y - y0) / (y1 - y0) * (HEIGHT - top - bottom)

    out = [f'<svg class="chart" xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
           f'viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="11" role="img">',
           f'<title>{html.escape(title)}</title><rect width="100%" height="100%" fill="white"/>',
           f'<text x="{WIDTH / 2}" y="16" text-anchor="middle" font-size="13">{html.escape(title)}</text>']
    for v in yt:
        out.append(f'<line x1="{left}" x2="{WIDTH - right}" y1="{py(v):.1f}" y2="{py(v):.1f}" stroke="#e5e5e5"/>'
                   f'<text x="{left - 6}" y="{py(v) + 4:.1f}" text-anchor="end">{_label(v)}</text>')
    for v in xt:
        out.append(f'<text x="{px(v):.1f}" y="{HEIGHT - bottom + 16}" text-anchor="middle">{_label(v)}</text>')
    out.append(f'<rect x="{left}" y="{top}" width="{WIDTH - left - right}" height="{HEIGHT - top - bottom}" '
               'fill="none" stroke="#888"/>')
    out.append(f'<text x="{WIDTH / 2}" y="{HEIGHT - 6}" text-anchor="middle">step</text>')
    if ylabel:
        out.append(f'<text transform="translate(14 {HEIGHT / 2}) rotate(-90)" text-anchor="middle">'
                   f'{html.escape(ylabel)}</text>')
    for i, s in enumerate(series):
        colour = COLOURS[i % len(COLOURS)]
        points = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in zip(s.x, s.y) if math.isfinite(y))
        dash = ' stroke-dasharray="6 4"' if s.dashed else ""
        out.append(f'<polyline fill="none" stroke="{colour}" stroke-width="1.5"{dash} points="{points}"/>')
        if len(s.x) <= FEW_POINTS:  # a line of one or two points is hard to see without markers
            out += [f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="2.5" fill="{colour}"/>'
                    for x, y in zip(s.x, s.y) if math.isfinite(y)]
        lx = left + 8 + i % 4 * 120
        ly = 30 + i // 4 * 14
        out.append(f'<line x1="{lx}" x2="{lx + 18}" y1="{ly - 4}" y2="{ly - 4}" stroke="{colour}" '
                   f'stroke-width="2"{dash}/>'
                   f'<text x="{lx + 22}" y="{ly}">{html.escape(s.label)}</text>')
    out.append("</svg>")
    return "\n".join(out)
