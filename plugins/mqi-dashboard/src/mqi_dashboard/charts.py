"""Inline SVG pictures: the per-beam timeline of a case, GPU history, hourly throughput.

Colours are SVG presentation attributes (not CSS), so the strict Content-Security-Policy
needs no ``unsafe-inline`` for them; every bar carries a ``<title>`` tooltip.
"""

from __future__ import annotations

import math
import time
from typing import Optional

from markupsafe import Markup, escape

PALETTE = ("#4e79a7", "#f28e2b", "#59a14f", "#b07aa1", "#76b7b2", "#edc948", "#9c755f", "#ff9da7", "#bab0ac")
FAILED = "#d62728"
_NICE_STEPS = (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 14400, 28800, 43200, 86400)


def duration(seconds: Optional[float]) -> str:
    """``1h02m``, ``3m05s``, ``4.2s``."""
    if seconds is None:
        return "–"
    seconds = max(0.0, float(seconds))
    if seconds < 10:
        return f"{seconds:.1f}s"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"


def _tick_step(span: float, max_ticks: int = 8) -> float:
    for step in _NICE_STEPS:
        if span / step <= max_ticks:
            return step
    return math.ceil(span / max_ticks / 86400) * 86400


def _f(value: float) -> str:
    return f"{value:.1f}"


def gantt(detail: dict, *, now: Optional[float] = None, width: int = 960) -> Markup:
    """Per-beam timeline of a case: one row for case-level steps, one per beam; a bar per
    attempt (light part: waiting for a worker or GPU after dispatch; solid: running)."""
    now = time.time() if now is None else now
    step_names = list(dict.fromkeys(s["step"] for s in detail["steps"]))
    colour = {name: PALETTE[i % len(PALETTE)] for i, name in enumerate(step_names)}
    bars = []
    for s in detail["steps"]:
        row = "case" if s["beam"] is None else f"beam {s['beam']}"
        for a in s["attempts"]:
            queued = a["dispatched_at"]
            current = a["attempt"] == s["attempt"] and a["finished_at"] is None
            if a["started_at"] is None:  # dispatched, not started yet: only the waiting part
                if queued is None:
                    continue
                waited_until = a["finished_at"] or (now if current else queued)
                bars.append((row, s, a, queued, waited_until, waited_until, current))
                continue
            start = a["started_at"]
            end = a["finished_at"] if a["finished_at"] is not None else (now if current else start)
            bars.append((row, s, a, queued, start, end, current))
    if not bars:
        return Markup('<p class="muted">No step has started yet: the timeline appears once work begins.</p>')
    rows = ["case"] + sorted({b[0] for b in bars if b[0] != "case"}, key=lambda r: int(r.split()[1]))
    if not any(b[0] == "case" for b in bars):
        rows.remove("case")
    t0 = min(min(b[3] or b[4], b[4]) for b in bars)
    t1 = max(b[5] for b in bars)
    span = max(t1 - t0, 1.0)
    label_w, top, row_h, right = 70, 22, 24, 10
    plot_w = width - label_w - right
    height = top + row_h * len(rows) + 26

    def x(t: float) -> float:
        return label_w + (t - t0) / span * plot_w

    out = [f'<svg class="gantt" viewBox="0 0 {width} {height}" width="100%" role="img" '
           f'aria-label="timeline of {escape(detail["id"])}" xmlns="http://www.w3.org/2000/svg">']
    step = _tick_step(span)
    tick = 0.0
    while tick <= span + 1e-9:
        tx = x(t0 + tick)
        out.append(f'<line x1="{_f(tx)}" y1="{top - 4}" x2="{_f(tx)}" y2="{top + row_h * len(rows)}" '
                   f'stroke="#ddd" stroke-width="1"/>')
        out.append(f'<text x="{_f(tx)}" y="{top - 8}" font-size="11" text-anchor="middle" fill="#555">'
                   f'+{escape(duration(tick))}</text>')
        tick += step
    for i, row in enumerate(rows):
        y = top + i * row_h
        if i % 2:
            out.append(f'<rect x="0" y="{y}" width="{width}" height="{row_h}" fill="#f6f7f9"/>')
        out.append(f'<text x="4" y="{y + row_h * 0.65:.0f}" font-size="12" fill="#222">{escape(row)}</text>')
    for row, s, a, queued, start, end, current in bars:
        y = top + rows.index(row) * row_h + 4
        h = row_h - 8
        fill = colour[s["step"]]
        failed = a["outcome"] not in (None, "ok", "incomplete")  # a re-check of a waiting case is no failure
        what = f"{s['step']}{' beam ' + str(s['beam']) if s['beam'] else ''} attempt {a['attempt']}"
        if a["started_at"] is None:
            tip = f"{what}: dispatched, waiting {duration(start - queued)} for a worker"
            out.append(f'<rect x="{_f(x(queued))}" y="{y + h / 4:.1f}" width="{_f(max(x(start) - x(queued), 2))}" '
                       f'height="{h / 2:.1f}" fill="{fill}" fill-opacity="0.3"><title>{escape(tip)}</title></rect>')
            continue
        tip = (f"{what}: {duration(end - start)}"
               + (f", waited {duration(start - queued)}" if queued and start > queued else "")
               + (f", {a['outcome']}" if a["outcome"] else ", running" if current else "")
               + (f" (exit {a['exit_code']})" if a["exit_code"] is not None else ""))
        if queued is not None and start > queued:
            out.append(f'<rect x="{_f(x(queued))}" y="{y + h / 4:.1f}" width="{_f(max(x(start) - x(queued), 1))}" '
                       f'height="{h / 2:.1f}" fill="{fill}" fill-opacity="0.3"><title>{escape(tip)}</title></rect>')
        stroke = f' stroke="{FAILED}" stroke-width="2"' if failed else ""
        cls = ' class="running"' if current else ""
        out.append(f'<rect{cls} x="{_f(x(start))}" y="{y}" width="{_f(max(x(end) - x(start), 2))}" height="{h}" '
                   f'rx="2" fill="{fill}"{stroke}><title>{escape(tip)}</title></rect>')
    ly = top + row_h * len(rows) + 18
    lx = label_w
    for name in step_names:
        out.append(f'<rect x="{lx}" y="{ly - 10}" width="12" height="12" fill="{colour[name]}"/>')
        out.append(f'<text x="{lx + 16}" y="{ly}" font-size="12" fill="#222">{escape(name)}</text>')
        lx += 26 + 8 * len(name)
    out.append(f'<rect x="{lx}" y="{ly - 10}" width="12" height="12" fill="#fff" stroke="{FAILED}" stroke-width="2"/>')
    out.append(f'<text x="{lx + 16}" y="{ly}" font-size="12" fill="#222">failed attempt</text>')
    out.append("</svg>")
    return Markup("".join(out))


def gpu_sparkline(points: list[dict], *, since: float, until: float, memory_total: Optional[int],
                  width: int = 320, height: int = 48) -> Markup:
    """Utilisation (line) and memory use (area) of one GPU over time; allocated periods shaded."""
    if len(points) < 2:
        return Markup('<span class="muted">no history yet</span>')
    span = max(until - since, 1.0)

    def x(t: float) -> float:
        return (t - since) / span * width

    def y(fraction: float) -> float:
        return height - 2 - max(0.0, min(1.0, fraction)) * (height - 4)

    out = [f'<svg class="spark" viewBox="0 0 {width} {height}" width="{width}" height="{height}" '
           f'xmlns="http://www.w3.org/2000/svg"><rect width="{width}" height="{height}" fill="#f6f7f9"/>']
    for a, b in zip(points, points[1:]):
        if a["allocated"]:
            out.append(f'<rect x="{_f(x(a["at"]))}" y="0" width="{_f(max(x(b["at"]) - x(a["at"]), 1))}" '
                       f'height="{height}" fill="#59a14f" fill-opacity="0.15"/>')
    if memory_total:
        mem = [(x(p["at"]), y((p["memory_used_mb"] or 0) / memory_total)) for p in points if p["memory_used_mb"] is not None]
        if mem:
            path = " ".join(f"{_f(px)},{_f(py)}" for px, py in mem)
            out.append(f'<polygon points="{_f(mem[0][0])},{height} {path} {_f(mem[-1][0])},{height}" '
                       f'fill="#4e79a7" fill-opacity="0.25"><title>memory used</title></polygon>')
    util = [(x(p["at"]), y(p["utilization_pct"] / 100)) for p in points if p["utilization_pct"] is not None]
    if util:
        out.append('<polyline fill="none" stroke="#f28e2b" stroke-width="1.5" points="'
                   + " ".join(f"{_f(px)},{_f(py)}" for px, py in util) + '"><title>utilization</title></polyline>')
    out.append("</svg>")
    return Markup("".join(out))


def throughput_bars(throughput: dict, *, width: int = 480, height: int = 80) -> Markup:
    """Finished cases per hour over the last 24 hours: done (green) under failed (red)."""
    hourly = throughput["hourly"]
    peak = max([h["done"] + h["failed"] for h in hourly] + [1])
    bar_w = width / len(hourly)
    out = [f'<svg class="bars" viewBox="0 0 {width} {height + 14}" width="100%" '
           f'xmlns="http://www.w3.org/2000/svg">']
    for i, (h, start) in enumerate(zip(hourly, throughput["hour_starts"])):
        done_h = h["done"] / peak * height
        failed_h = h["failed"] / peak * height
        bx = i * bar_w + 1
        tip = f"{time.strftime('%H:00', time.localtime(start))}: {h['done']} done, {h['failed']} failed"
        out.append(f'<g><title>{escape(tip)}</title>'
                   f'<rect x="{_f(bx)}" y="0" width="{_f(bar_w - 2)}" height="{height}" fill="#fff" fill-opacity="0"/>'
                   f'<rect x="{_f(bx)}" y="{_f(height - done_h)}" width="{_f(bar_w - 2)}" height="{_f(done_h)}" '
                   f'fill="#59a14f"/>'
                   f'<rect x="{_f(bx)}" y="{_f(height - done_h - failed_h)}" width="{_f(bar_w - 2)}" '
                   f'height="{_f(failed_h)}" fill="{FAILED}"/></g>')
    out.append(f'<text x="0" y="{height + 12}" font-size="10" fill="#555">24 h ago</text>')
    out.append(f'<text x="{width}" y="{height + 12}" font-size="10" fill="#555" text-anchor="end">now</text>')
    out.append("</svg>")
    return Markup("".join(out))
