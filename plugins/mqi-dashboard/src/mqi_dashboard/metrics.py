"""``/metrics`` in the Prometheus text exposition format (version 0.0.4)."""

from __future__ import annotations

import sqlite3
import time
from typing import Iterable, Optional

from mqi_framework.api import views

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _escape(value: object) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: dict) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items()) + "}"


def _num(value: float) -> str:
    if value == float("inf"):
        return "+Inf"
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(value) if isinstance(value, float) else str(value)


class Exposition:
    """Collects metric families; :meth:`text` renders them."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help_text: str, samples: Iterable[tuple[dict, float]],
               suffix: str = "") -> None:
        self.lines.append(f"# HELP {name} {help_text}")
        self.lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            self.lines.append(f"{name}{suffix}{_labels(labels)} {_num(value)}")

    def histogram(self, name: str, help_text: str, series: list[dict], label_names: tuple[str, ...]) -> None:
        self.lines.append(f"# HELP {name} {help_text}")
        self.lines.append(f"# TYPE {name} histogram")
        for item in series:
            labels = {k: item[k] for k in label_names}
            for bound, count in item["buckets"]:
                self.lines.append(f"{name}_bucket{_labels({**labels, 'le': _num(float(bound))})} {count}")
            self.lines.append(f"{name}_bucket{_labels({**labels, 'le': '+Inf'})} {item['count']}")
            self.lines.append(f"{name}_sum{_labels(labels)} {_num(float(item['sum']))}")
            self.lines.append(f"{name}_count{_labels(labels)} {item['count']}")

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def render(conn: sqlite3.Connection, queue_stats: Optional[list], *, now: Optional[float] = None,
           known_case_states: Iterable[str] = ()) -> str:
    """Every metric the dashboard exports. ``queue_stats`` are the broker's QueueStats (None when
    the broker could not be read: ``mqi_broker_up`` is then 0)."""
    now = time.time() if now is None else now
    out = Exposition()
    cases = views.counts_by_state(conn, "cases")
    for state in known_case_states:
        cases.setdefault(state, 0)
    out.family("mqi_cases", "gauge", "Cases by state.", [({"state": s}, n) for s, n in sorted(cases.items())])
    attention = conn.execute("SELECT COUNT(*) FROM cases WHERE attention = 1").fetchone()[0]
    out.family("mqi_cases_attention", "gauge", "Cases flagged for a person (failed, rejected, incomplete too long).",
               [({}, attention)])
    beams = views.counts_by_state(conn, "beams")
    out.family("mqi_beams", "gauge", "Treatment beams by state.", [({"state": s}, n) for s, n in sorted(beams.items())])
    steps = views.counts_by_state(conn, "steps")
    out.family("mqi_steps", "gauge", "Workflow steps (per case and per beam) by state.",
               [({"state": s}, n) for s, n in sorted(steps.items())])
    out.histogram("mqi_step_duration_seconds", "Run time of finished step attempts (started to finished).",
                  views.step_durations(conn), ("step", "outcome"))
    gpus = views.gpus(conn)
    out.family("mqi_gpu_allocated", "gauge", "1 when the GPU is allocated to a beam.",
               [({"host": g["host"], "index": g["index"]}, int(g["allocated"] is not None)) for g in gpus])
    out.family("mqi_gpu_healthy", "gauge", "1 when the GPU is healthy.",
               [({"host": g["host"], "index": g["index"]}, int(g["healthy"])) for g in gpus])
    out.family("mqi_gpu_eligible", "gauge", "1 when the GPU may take a beam now.",
               [({"host": g["host"], "index": g["index"]}, int(g["eligible"])) for g in gpus])
    out.family("mqi_gpu_memory_used_bytes", "gauge", "GPU memory in use.",
               [({"host": g["host"], "index": g["index"]}, g["memory_used_mb"] * 1048576) for g in gpus
                if g["memory_used_mb"] is not None])
    out.family("mqi_gpu_memory_total_bytes", "gauge", "GPU memory.",
               [({"host": g["host"], "index": g["index"]}, g["memory_total_mb"] * 1048576) for g in gpus
                if g["memory_total_mb"] is not None])
    out.family("mqi_gpu_utilization_ratio", "gauge", "GPU utilization (0..1).",
               [({"host": g["host"], "index": g["index"]}, g["utilization_pct"] / 100) for g in gpus
                if g["utilization_pct"] is not None])
    queued = conn.execute("SELECT COUNT(*) FROM steps WHERE state = 'queued'").fetchone()[0]
    out.family("mqi_gpu_queue_beams", "gauge", "Beams waiting for a GPU.", [({}, queued)])
    out.family("mqi_broker_up", "gauge", "1 when the broker could be read.", [({}, int(queue_stats is not None))])
    stats = queue_stats or []
    out.family("mqi_queue_depth", "gauge", "Messages not yet acknowledged, by queue.",
               [({"queue": q.queue}, q.depth) for q in stats])
    out.family("mqi_queue_ready", "gauge", "Messages ready for a consumer now, by queue.",
               [({"queue": q.queue}, q.ready) for q in stats])
    out.family("mqi_queue_leased", "gauge", "Messages held by a consumer, by queue.",
               [({"queue": q.queue}, q.leased) for q in stats])
    out.family("mqi_dead_letters", "gauge", "Dead-lettered messages, by queue.",
               [({"queue": q.queue}, q.dead) for q in stats])
    workers = views.workers(conn, now=now)
    out.family("mqi_worker_restarts_total", "counter", "Restarts of each supervised process.",
               [({"worker": w["name"]}, w["restarts"]) for w in workers], suffix="")
    out.family("mqi_worker_running", "gauge", "1 when the process reports itself running.",
               [({"worker": w["name"]}, int(w["state"] == "running")) for w in workers])
    out.family("mqi_worker_heartbeat_age_seconds", "gauge", "Seconds since the process last heart-beat.",
               [({"worker": w["name"]}, round(w["heartbeat_age"], 3)) for w in workers
                if w["heartbeat_age"] is not None])
    return out.text()
