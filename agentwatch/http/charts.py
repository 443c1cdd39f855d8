"""Charts as inline SVG, drawn on the server: no chart library, no script, nothing to download.

Only numbers and our own labels go into the SVG; the one agent-supplied string a chart shows
(an incident's summary, as a tooltip) is escaped. Presentation attributes (``fill``,
``stroke``), never ``style``, so the pages' Content-Security-Policy needs no inline styles.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Final

from markupsafe import Markup, escape

from agentwatch.http.views import Incident
from agentwatch.series import Point

WIDTH: Final = 720
HEIGHT: Final = 120
_PAD_LEFT: Final = 56
_PAD_BOTTOM: Final = 18
_SPAN_COLORS: Final = {
    "silence": "#e5534b",
    "exit": "#e5534b",
    "stall": "#db6d28",
    "tokens": "#d29922",
    "loop": "#d29922",
    "memory": "#a371f7",
}


def sparkline(values: Sequence[float], width: int = 120, height: int = 24) -> Markup:
    """A small line of recent values (e.g. tokens per minute over the last hour)."""
    if not values:
        return Markup('<span class="muted">-</span>')
    top = max(*values, 1e-9)
    step = width / max(len(values) - 1, 1)
    points = " ".join(
        f"{i * step:.1f},{height - 2 - (v / top) * (height - 4):.1f}" for i, v in enumerate(values)
    )
    return Markup(
        f'<svg class="spark" viewBox="0 0 {width} {height}" width="{width}" height="{height}" '
        f'role="img" aria-label="tokens per minute, last hour, peak {top:,.0f}">'
        f'<polyline fill="none" stroke="currentColor" stroke-width="1.5" points="{points}"/></svg>'
    )


def chart(
    title: str,
    points: Sequence[Point],
    value: str,
    *,
    start_ms: int,
    end_ms: int,
    incidents: Sequence[Incident] = (),
    unit: str = "",
    scale: float = 1.0,
) -> Markup:
    """One metric (``value``: a Point attribute) over [start, end], a bar per bucket, with the
    agent's incidents drawn as bands on the same time axis."""
    span = max(end_ms - start_ms, 1)
    inner = WIDTH - _PAD_LEFT
    plot_h = HEIGHT - _PAD_BOTTOM

    def x(at_ms: float) -> float:
        return _PAD_LEFT + (min(max(at_ms, start_ms), end_ms) - start_ms) / span * inner

    values = [float(getattr(p, value)) * scale for p in points]
    top = max(values, default=0.0) or 1.0
    parts = [
        f'<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" data-metric="{value}" '
        f'aria-label="{escape(title)} over time">',
    ]
    for incident in incidents:
        left, right = x(incident.start_ms), x(incident.end_ms or end_ms)
        color = _SPAN_COLORS.get(incident.detector, "#8b949e")
        parts.append(
            f'<rect class="incident" x="{left:.1f}" y="0" width="{max(right - left, 1.5):.1f}" '
            f'height="{plot_h}" fill="{color}" fill-opacity="0.18">'
            f"<title>{escape(incident.summary)}</title></rect>"
        )
    bucket = (points[1].start_ms - points[0].start_ms) if len(points) > 1 else span
    bar_w = max(bucket / span * inner - 1, 1)
    for point, number in zip(points, values, strict=True):
        if number <= 0:
            continue
        h = number / top * (plot_h - 4)
        parts.append(
            f'<rect class="bar" x="{x(point.start_ms):.1f}" y="{plot_h - h:.1f}" width="{bar_w:.1f}" '
            f'height="{h:.1f}" fill="currentColor"/>'
        )
    parts.append(f'<line x1="{_PAD_LEFT}" y1="{plot_h}" x2="{WIDTH}" y2="{plot_h}" stroke="#8b949e"/>')
    parts.append(f'<text x="4" y="12" class="axis">{_short(top)}{escape(unit)}</text>')
    parts.append(f'<text x="4" y="{plot_h}" class="axis">0</text>')
    for tick in _ticks(start_ms, end_ms):
        label = datetime.fromtimestamp(tick / 1000, tz=UTC).strftime("%H:%M")
        parts.append(
            f'<text x="{x(tick):.1f}" y="{HEIGHT - 4}" class="axis" text-anchor="middle">{label}</text>'
        )
    parts.append("</svg>")
    return Markup("".join(parts))


def _ticks(start_ms: int, end_ms: int) -> list[int]:
    """Round UTC hours, about six across the span."""
    span_h = max((end_ms - start_ms) / 3_600_000, 1)
    every = next(step for step in (1, 2, 3, 4, 6, 12, 24, 48, 168, 10**6) if span_h / step <= 7) * 3_600_000
    first = -(-start_ms // every) * every
    return list(range(first, end_ms + 1, every))


def _short(number: float) -> str:
    for size, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if number >= size:
            return f"{number / size:.1f}{suffix}"
    return f"{number:.3g}"
