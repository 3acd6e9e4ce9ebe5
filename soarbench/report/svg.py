"""Line charts as inline SVG, written by hand (the project does not depend on a plotting library).

A chart has numbered axes with grid lines, axis labels, a legend, lines with optional shaded bands, and dashed
horizontal reference lines. This module knows nothing of soarbench's data: html.py turns runs into `Chart`s.
The SVG has no xmlns attribute: HTML5 does not need it for inline SVG, and the page stays free of any URL.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from html import escape
from typing import Sequence

WIDTH = 640
PLOT_TOP = 34  # room for the title
PLOT_HEIGHT = 240
PLOT_LEFT = 64  # room for y tick labels and the y-axis label
LEGEND_WIDTH = 168
PLOT_RIGHT = WIDTH - LEGEND_WIDTH
BOTTOM_MARGIN = 48  # x tick labels and the x-axis label
LEGEND_ROW = 18
LEGEND_MAX_CHARS = 22
MAX_MARKERS = 40  # more points than this and markers would blur into the line
MARKER_RADIUS = 3
TARGET_TICKS = 5
Y_PADDING = 0.04  # fraction of the data range left free above and below the data
FONT = "system-ui, -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif"
AXIS_COLOR = "#444"
GRID_COLOR = "#e5e5e5"
BAND_OPACITY = 0.18
DASH = "6 4"


@dataclass(frozen=True)
class Series:
    """A line; `lo`/`hi` (NaN where unknown) draw a shaded band around it. Non-finite y breaks the line."""

    name: str
    color: str
    x: Sequence[float]
    y: Sequence[float]
    lo: Sequence[float] | None = None
    hi: Sequence[float] | None = None
    width: float = 2.0
    opacity: float = 1.0
    markers: bool = True
    in_legend: bool = True


@dataclass(frozen=True)
class HLine:
    """A dashed horizontal line across the whole plot, e.g. the base model's score."""

    name: str
    color: str
    y: float


@dataclass(frozen=True)
class Chart:
    chart_id: str  # unique within the page: names the chart's clip path and title element
    title: str
    x_label: str
    y_label: str
    series: Sequence[Series]
    hlines: Sequence[HLine] = ()
    y_range: tuple[float, float] | None = None  # fixed y data range; data outside it is clipped
    x_integer: bool = False  # x values are counts (steps): ticks at whole numbers only


def render_chart(chart: Chart) -> str:
    """The chart as one <svg> element."""
    x_extent = _finite(v for s in chart.series for v in s.x)
    x_axis = _Axis.fit(x_extent, PLOT_LEFT, PLOT_RIGHT, padding=0.0, integer=chart.x_integer)
    y_axis = _Axis.fit(_y_extent(chart), PLOT_TOP + PLOT_HEIGHT, PLOT_TOP, padding=Y_PADDING)
    legend = _legend_entries(chart)
    height = max(PLOT_TOP + PLOT_HEIGHT + BOTTOM_MARGIN, PLOT_TOP + LEGEND_ROW * len(legend) + 8)
    clip_id = f"{chart.chart_id}-clip"
    title_id = f"{chart.chart_id}-title"
    parts = [
        f'<svg viewBox="0 0 {WIDTH} {height}" width="{WIDTH}" height="{height}" role="img" '
        f'aria-labelledby="{title_id}" font-family="{escape(FONT)}" font-size="12" id="{escape(chart.chart_id)}">',
        f'<title id="{title_id}">{escape(chart.title)}</title>',
        _clip_path(clip_id),
        f'<text x="{PLOT_LEFT}" y="20" font-size="13" font-weight="600" fill="#222">{escape(chart.title)}</text>',
        *_grid_and_ticks(x_axis, y_axis),
        f'<g clip-path="url(#{clip_id})">',
        *(_band(s, x_axis, y_axis) for s in chart.series if s.lo is not None and s.hi is not None),
        *(_hline(h, x_axis, y_axis) for h in chart.hlines),
        *(_line(s, x_axis, y_axis) for s in chart.series),
        "</g>",
        *_axis_labels(chart),
        *_legend(legend),
        "</svg>",
    ]
    return "\n".join(p for p in parts if p)


# ---------------------------------------------------------------------------------------------------------------
# Axes


@dataclass(frozen=True)
class _Axis:
    """A linear map from data to pixels over [ticks[0], ticks[-1]]."""

    ticks: tuple[float, ...]
    labels: tuple[str, ...]
    pixel_lo: float  # pixel of ticks[0]
    pixel_hi: float  # pixel of ticks[-1]

    @classmethod
    def fit(
        cls, extent: tuple[float, float], pixel_lo: float, pixel_hi: float, padding: float, integer: bool = False
    ) -> _Axis:
        lo, hi = extent
        span = hi - lo
        # non-negative data (accuracies, counts) keeps its axis at or above zero
        low = lo - padding * span if lo - padding * span >= 0 or lo < 0 else 0.0
        ticks, step = nice_ticks(low, hi + padding * span, integer=integer)
        return cls(tuple(ticks), tuple(tick_labels(ticks, step)), pixel_lo, pixel_hi)

    def __call__(self, value: float) -> float:
        lo, hi = self.ticks[0], self.ticks[-1]
        return self.pixel_lo + (value - lo) / (hi - lo) * (self.pixel_hi - self.pixel_lo)


def nice_ticks(lo: float, hi: float, target: int = TARGET_TICKS, integer: bool = False) -> tuple[list[float], float]:
    """Round tick values covering [lo, hi], spaced 1, 2, 2.5 or 5 times a power of ten; returns (ticks, step).

    With `integer`, the step is a whole number (no 2.5, nothing below 1), for axes of counts such as steps.
    """
    if not (math.isfinite(lo) and math.isfinite(hi)):
        lo, hi = 0.0, 1.0
    if hi < lo:
        lo, hi = hi, lo
    if hi == lo:  # one value: centre it in a small range around itself (not below zero if it is >= 0)
        pad = abs(lo) * 0.1 or 1.0
        lo, hi = (lo - pad if lo - pad >= 0 or lo < 0 else 0.0), hi + pad
    raw_step = (hi - lo) / target
    magnitude = 10 ** math.floor(math.log10(raw_step))
    multipliers: tuple[float, ...] = (1, 2, 2.5, 5, 10)
    if integer:
        magnitude = max(magnitude, 1)
        multipliers = tuple(m for m in multipliers if float(m * magnitude).is_integer())
    step = next(m * magnitude for m in multipliers if m * magnitude >= raw_step * (1 - 1e-9))
    first = math.floor(lo / step + 1e-9)
    last = math.ceil(hi / step - 1e-9)
    # Rounding to 12 significant digits removes float noise such as 0.30000000000000004.
    return [float(f"{i * step:.12g}") for i in range(first, last + 1)], step


def tick_labels(ticks: Sequence[float], step: float) -> list[str]:
    """Labels with just enough decimals for the step; values of 10,000 and more as "20k", "1.5M"."""
    biggest = max(abs(t) for t in ticks)
    scale, suffix = (1e6, "M") if biggest >= 1e6 else (1e3, "k") if biggest >= 1e4 else (1.0, "")
    decimals = _decimals_for(step / scale)
    labels = []
    for tick in ticks:
        value = tick / scale
        if abs(value) < step / scale * 1e-6:
            labels.append(f"{0:.{decimals}f}")  # zero has no unit and no sign ("-0.00")
            continue
        labels.append(f"{value:.{decimals}f}{suffix}")
    return labels


def _decimals_for(step: float) -> int:
    """Fewest decimals that write `step` exactly: 20 -> 0, 2.5 -> 1, 0.25 -> 2, 0.05 -> 2."""
    for decimals in range(0, 12):
        if abs(round(step, decimals) - step) <= step * 1e-6:
            return decimals
    return 12


def _y_extent(chart: Chart) -> tuple[float, float]:
    if chart.y_range is not None:
        return chart.y_range
    values = [v for s in chart.series for v in (*s.y, *(s.lo or ()), *(s.hi or ()))]
    values += [h.y for h in chart.hlines]
    return _finite(values)


def _finite(values) -> tuple[float, float]:
    """(min, max) of the finite values; (0, 1) when there are none, so an empty chart still has axes."""
    finite = [float(v) for v in values if v is not None and math.isfinite(v)]
    return (min(finite), max(finite)) if finite else (0.0, 1.0)


def _grid_and_ticks(x_axis: _Axis, y_axis: _Axis) -> list[str]:
    top, bottom = PLOT_TOP, PLOT_TOP + PLOT_HEIGHT
    out = []
    for tick, label in zip(y_axis.ticks, y_axis.labels, strict=True):
        y = _px(y_axis(tick))
        out.append(f'<line x1="{PLOT_LEFT}" y1="{y}" x2="{PLOT_RIGHT}" y2="{y}" stroke="{GRID_COLOR}"/>')
        out.append(f'<text x="{PLOT_LEFT - 6}" y="{y}" text-anchor="end" dominant-baseline="middle" '
                   f'fill="{AXIS_COLOR}">{escape(label)}</text>')
    for tick, label in zip(x_axis.ticks, x_axis.labels, strict=True):
        x = _px(x_axis(tick))
        out.append(f'<line x1="{x}" y1="{top}" x2="{x}" y2="{bottom}" stroke="{GRID_COLOR}"/>')
        out.append(f'<line x1="{x}" y1="{bottom}" x2="{x}" y2="{bottom + 4}" stroke="{AXIS_COLOR}"/>')
        out.append(f'<text x="{x}" y="{bottom + 16}" text-anchor="middle" fill="{AXIS_COLOR}">{escape(label)}</text>')
    out.append(f'<rect x="{PLOT_LEFT}" y="{top}" width="{PLOT_RIGHT - PLOT_LEFT}" height="{PLOT_HEIGHT}" '
               f'fill="none" stroke="{AXIS_COLOR}"/>')
    return out


def _clip_path(clip_id: str) -> str:
    """The plot area, widened by a marker's radius so that a point on the frame shows whole."""
    m = MARKER_RADIUS
    return (f'<clipPath id="{clip_id}"><rect x="{PLOT_LEFT - m}" y="{PLOT_TOP - m}" '
            f'width="{PLOT_RIGHT - PLOT_LEFT + 2 * m}" height="{PLOT_HEIGHT + 2 * m}"/></clipPath>')


def _axis_labels(chart: Chart) -> list[str]:
    centre_x = (PLOT_LEFT + PLOT_RIGHT) / 2
    centre_y = PLOT_TOP + PLOT_HEIGHT / 2
    return [
        f'<text x="{_px(centre_x)}" y="{PLOT_TOP + PLOT_HEIGHT + 38}" text-anchor="middle" '
        f'fill="#222">{escape(chart.x_label)}</text>',
        f'<text transform="translate(16 {_px(centre_y)}) rotate(-90)" text-anchor="middle" '
        f'fill="#222">{escape(chart.y_label)}</text>',
    ]


# ---------------------------------------------------------------------------------------------------------------
# Marks


def _line(series: Series, x_axis: _Axis, y_axis: _Axis) -> str:
    points = [(x_axis(x), y_axis(y)) for x, y in zip(series.x, series.y, strict=True) if _ok(x) and _ok(y)]
    segments = _segments(series.x, series.y, x_axis, y_axis)
    out = [
        f'<path d="{_path(seg)}" fill="none" stroke="{series.color}" stroke-width="{series.width}" '
        f'stroke-opacity="{series.opacity}" stroke-linejoin="round" stroke-linecap="round"/>'
        for seg in segments
        if len(seg) > 1
    ]
    if series.markers and len(points) <= MAX_MARKERS:
        dots = points
    else:  # a point with no neighbour draws no line: mark it so that it still shows
        dots = [seg[0] for seg in segments if len(seg) == 1]
    opacity = f' fill-opacity="{series.opacity}"' if series.opacity < 1 else ""
    out += [f'<circle cx="{_px(x)}" cy="{_px(y)}" r="{MARKER_RADIUS}" fill="{series.color}"{opacity}/>'
            for x, y in dots]
    return "\n".join(out)


def _band(series: Series, x_axis: _Axis, y_axis: _Axis) -> str:
    """The lo-hi band as one polygon per unbroken run of points; a lone point gets an error bar instead."""
    out = []
    triples = list(zip(series.x, series.lo or (), series.hi or (), strict=True))
    for run in _runs(triples, lambda p: all(_ok(v) for v in p)):
        if len(run) == 1:
            x, lo, hi = run[0]
            out.append(f'<line class="band" x1="{_px(x_axis(x))}" y1="{_px(y_axis(lo))}" x2="{_px(x_axis(x))}" '
                       f'y2="{_px(y_axis(hi))}" stroke="{series.color}" stroke-width="1.5" stroke-opacity="0.6"/>')
            continue
        upper = [(x_axis(x), y_axis(hi)) for x, _, hi in run]
        lower = [(x_axis(x), y_axis(lo)) for x, lo, _ in reversed(run)]
        out.append(f'<path class="band" d="{_path(upper + lower)} Z" fill="{series.color}" '
                   f'fill-opacity="{BAND_OPACITY}" stroke="none"/>')
    return "\n".join(out)


def _hline(line: HLine, x_axis: _Axis, y_axis: _Axis) -> str:
    if not _ok(line.y):
        return ""
    y = _px(y_axis(line.y))
    return (f'<line class="baseline" x1="{PLOT_LEFT}" y1="{y}" x2="{PLOT_RIGHT}" y2="{y}" stroke="{line.color}" '
            f'stroke-width="1.5" stroke-dasharray="{DASH}"/>')


def _segments(xs: Sequence[float], ys: Sequence[float], x_axis: _Axis, y_axis: _Axis) -> list[list[tuple]]:
    runs = _runs(list(zip(xs, ys, strict=True)), lambda p: _ok(p[0]) and _ok(p[1]))
    return [[(x_axis(x), y_axis(y)) for x, y in run] for run in runs]


def _runs(items: list, keep) -> list[list]:
    """Maximal runs of consecutive items that satisfy `keep`: a missing value breaks a line, not joins across."""
    runs, current = [], []
    for item in items:
        if keep(item):
            current.append(item)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return runs


def _path(points: Sequence[tuple[float, float]]) -> str:
    return "M" + " L".join(f"{_px(x)},{_px(y)}" for x, y in points)


def _ok(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def _px(value: float) -> str:
    return f"{value:.1f}".rstrip("0").rstrip(".")


# ---------------------------------------------------------------------------------------------------------------
# Legend


@dataclass(frozen=True)
class _LegendEntry:
    name: str
    color: str
    dashed: bool
    opacity: float


def _legend_entries(chart: Chart) -> list[_LegendEntry]:
    entries = [_LegendEntry(s.name, s.color, False, s.opacity) for s in chart.series if s.in_legend]
    return entries + [_LegendEntry(h.name, h.color, True, 1.0) for h in chart.hlines if _ok(h.y)]


def _legend(entries: Sequence[_LegendEntry]) -> list[str]:
    x = PLOT_RIGHT + 12
    out = []
    for i, entry in enumerate(entries):
        y = PLOT_TOP + 8 + i * LEGEND_ROW
        dash = f' stroke-dasharray="{DASH}"' if entry.dashed else ""
        name = entry.name if len(entry.name) <= LEGEND_MAX_CHARS else entry.name[: LEGEND_MAX_CHARS - 1] + "…"
        out.append(
            f'<g><title>{escape(entry.name)}</title>'
            f'<line x1="{x}" y1="{y}" x2="{x + 22}" y2="{y}" stroke="{entry.color}" stroke-width="2.5" '
            f'stroke-opacity="{entry.opacity}"{dash}/>'
            f'<text x="{x + 28}" y="{y}" dominant-baseline="middle" fill="#222">{escape(name)}</text></g>'
        )
    return out
