"""Draw docs/algorithms-boundary.svg: admitted requests over time across a window boundary, for
each algorithm of docs/algorithms.md, as the limiter itself answers them (memory store, a fake
clock). Rerun after changing an algorithm: ``.venv/bin/python scripts/algorithms_figure.py``.

The traffic: 100 per minute allowed; 150 requests at 00:59, 150 at 01:00, then 4 per second
until 02:00. Plain SVG is written by hand, so no plotting library is needed.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from ratelimit_svc.backends.memory import MemoryStore
from ratelimit_svc.config.loader import ConfigFile, load_config
from ratelimit_svc.limiter.limiter import Limiter, LimiterOptions, Request, RequestDescriptor
from ratelimit_svc.limiter.windows import Code
from ratelimit_svc.stats.registry import MemoryStats

OUT = Path(__file__).resolve().parents[1] / "docs" / "algorithms-boundary.svg"
START = 1_699_999_980.0  # a minute boundary
RULES = """\
domain: figure
descriptors:
  - {key: fixed_window, rate_limit: {unit: minute, requests_per_unit: 100}}
  - key: sliding_window
    rate_limit: {unit: minute, requests_per_unit: 100, algorithm: sliding_window}
  - key: token_bucket
    rate_limit: {unit: minute, requests_per_unit: 100, algorithm: token_bucket}
"""
COLOURS = {"fixed_window": "#d62728", "sliding_window": "#1f77b4", "token_bucket": "#2ca02c"}


def arrivals() -> list[float]:
    times = [59.0] * 150 + [60.0] * 150
    times += [60.0 + 0.25 * i for i in range(1, 241)]
    return times


class Clock:
    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> float:
        return self.now


async def admitted_times(algorithm: str) -> list[float]:
    config = load_config([ConfigFile("figure.yaml", RULES)])
    clock = Clock()
    limiter = Limiter(
        store=MemoryStore(clock), stats=MemoryStats(), options=LimiterOptions(), clock=clock
    )
    request = Request("figure", (RequestDescriptor(((algorithm, "client"),)),))
    admitted = []
    for at in arrivals():
        clock.now = START + at
        if (await limiter.should_rate_limit(config, request)).overall is Code.OK:
            admitted.append(at)
    return admitted


def svg(series: dict[str, list[float]]) -> str:
    width, height, left, right, top, bottom = 760, 380, 60, 180, 20, 50
    x0, x1, y1 = 55.0, 120.0, 300
    plot_w, plot_h = width - left - right, height - top - bottom

    def x(t: float) -> float:
        return left + (t - x0) / (x1 - x0) * plot_w

    def y(n: float) -> float:
        return top + plot_h - n / y1 * plot_h

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<line x1="{left}" y1="{y(0)}" x2="{left + plot_w}" y2="{y(0)}" stroke="black"/>',
        f'<line x1="{left}" y1="{y(0)}" x2="{left}" y2="{top}" stroke="black"/>',
    ]
    for n in range(0, y1 + 1, 50):
        parts.append(f'<text x="{left - 6}" y="{y(n) + 4}" text-anchor="end">{n}</text>')
        parts.append(
            f'<line x1="{left}" y1="{y(n)}" x2="{left + plot_w}" y2="{y(n)}" stroke="#eee"/>'
        )
    for t in range(60, 121, 10):
        label = f"0{t // 60}:{t % 60:02d}"
        parts.append(f'<text x="{x(t)}" y="{y(0) + 16}" text-anchor="middle">{label}</text>')
    parts.append(
        f'<line x1="{x(60)}" y1="{top}" x2="{x(60)}" y2="{y(0)}" stroke="gray" '
        'stroke-dasharray="4 3"/>'
    )
    parts.append(f'<text x="{x(60) + 4}" y="{top + 12}" fill="gray">window boundary</text>')
    parts.append(
        f'<text x="{left + plot_w / 2}" y="{height - 10}" text-anchor="middle">time (mm:ss); '
        "150 requests at 00:59 and at 01:00, then 4/s</text>"
    )
    parts.append(
        f'<text x="16" y="{top + plot_h / 2}" transform="rotate(-90 16 {top + plot_h / 2})" '
        'text-anchor="middle">requests admitted so far</text>'
    )
    for row, (name, times) in enumerate(series.items()):
        points = [(x0, 0)]
        for count, at in enumerate(times, start=1):
            points += [(at, count - 1), (at, count)]
        points.append((x1, len(times)))
        path = " ".join(f"{x(t):.1f},{y(n):.1f}" for t, n in points)
        colour = COLOURS[name]
        parts.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2"/>')
        ly = top + 20 + row * 22
        parts.append(
            f'<line x1="{left + plot_w + 15}" y1="{ly}" x2="{left + plot_w + 35}" y2="{ly}" '
            f'stroke="{colour}" stroke-width="3"/>'
        )
        parts.append(
            f'<text x="{left + plot_w + 40}" y="{ly + 4}">{name} ({len(times)})</text>'
        )
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def main() -> None:
    series = {name: asyncio.run(admitted_times(name)) for name in COLOURS}
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(svg(series))
    for name, times in series.items():
        across = sum(1 for t in times if 59.0 <= t <= 60.0)
        print(f"{name}: {across} admitted at 00:59-01:00, {len(times)} by 02:00")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
