"""Reads and small writes on the state database for the conductor, workers and supervision
(what people see is :mod:`mqi_framework.store.views`). Functions that write expect to run inside :func:`mqi_framework.store.transaction`
unless they say otherwise."""

from __future__ import annotations

import json
import sqlite3
import time
from typing import Any, Iterable, Optional

from mqi_framework.protocols import GpuReading

FINAL_CASE_STATES = ("done", "failed", "rejected", "cancelled")
IN_FLIGHT_STEP_STATES = ("dispatched", "running", "cancelling")


def case_uid(case_id: int) -> str:
    return f"case-{case_id:06d}"


def add_event(
    conn: sqlite3.Connection, kind: str, message: str = "", *, case_id: Optional[int] = None,
    beam: Optional[int] = None, step: Optional[str] = None, actor: str = "conductor",
    data: Optional[dict] = None,
) -> None:
    """Append to the audit log (never PHI: case folder names stay out of ``message``)."""
    conn.execute(
        "INSERT INTO events(at, case_id, beam, step, kind, message, actor, data) VALUES (?,?,?,?,?,?,?,?)",
        (time.time(), case_id, beam, step, kind, message, actor, json.dumps(data or {})),
    )


def find_case(conn: sqlite3.Connection, ident: str) -> Optional[sqlite3.Row]:
    """A case by host id (``case-000042`` or ``42``) or by folder name."""
    row = conn.execute("SELECT * FROM cases WHERE uid = ? OR name = ?", (ident, ident)).fetchone()
    if row is None and ident.isdigit():
        row = conn.execute("SELECT * FROM cases WHERE id = ?", (int(ident),)).fetchone()
    return row


# --------------------------------------------------------------------------- resources


def record_gpu_readings(conn: sqlite3.Connection, curator: str, readings: Iterable[GpuReading], *,
                        history_spacing: float = 60.0, history_keep: float = 7 * 86400.0) -> None:
    """Upsert what a curator saw; GPUs of this curator that vanished become unhealthy.

    Also appends to ``gpu_history`` (at most one row per GPU every ``history_spacing``
    seconds) and prunes history older than ``history_keep`` seconds.
    """
    now = time.time()
    seen = []
    history = []
    for r in readings:
        conn.execute(
            """INSERT INTO resources(kind, host, idx, uuid, name, memory_total_mb, memory_used_mb, memory_free_mb,
                   utilization_pct, temperature_c, healthy, eligible, note, curator, seen_at)
               VALUES ('gpu',?,?,?,?,?,?,?,?,?,?,?,?,?,?)
               ON CONFLICT(kind, host, idx) DO UPDATE SET uuid=excluded.uuid, name=excluded.name,
                   memory_total_mb=excluded.memory_total_mb, memory_used_mb=excluded.memory_used_mb,
                   memory_free_mb=excluded.memory_free_mb, utilization_pct=excluded.utilization_pct,
                   temperature_c=excluded.temperature_c, healthy=excluded.healthy, eligible=excluded.eligible,
                   note=excluded.note, curator=excluded.curator, seen_at=excluded.seen_at""",
            (r.host, r.index, r.uuid, r.name, r.memory_total_mb, r.memory_used_mb, r.memory_free_mb,
             r.utilization_pct, r.temperature_c, int(r.healthy), int(r.eligible), r.note[:500], curator, now),
        )
        seen.append((r.host, r.index))
        last = conn.execute("SELECT MAX(at) FROM gpu_history WHERE host = ? AND idx = ?", (r.host, r.index)).fetchone()[0]
        if last is None or now - last >= history_spacing:
            history.append(r)
    for row in conn.execute("SELECT id, host, idx FROM resources WHERE curator = ? AND healthy = 1", (curator,)).fetchall():
        if (row["host"], row["idx"]) not in seen:
            conn.execute("UPDATE resources SET healthy = 0, note = ? WHERE id = ?",
                         (f"not reported by {curator} since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(now))}",
                          row["id"]))
    if history:
        for r in history:
            conn.execute(
                "INSERT INTO gpu_history(at, host, idx, memory_used_mb, memory_free_mb, utilization_pct, temperature_c, "
                "healthy, eligible, allocated) VALUES (?,?,?,?,?,?,?,?,?, "
                "(SELECT allocated_step IS NOT NULL FROM resources WHERE kind = 'gpu' AND host = ? AND idx = ?))",
                (now, r.host, r.index, r.memory_used_mb, r.memory_free_mb, r.utilization_pct, r.temperature_c,
                 int(r.healthy), int(r.eligible), r.host, r.index),
            )
        conn.execute("DELETE FROM gpu_history WHERE at < ?", (now - history_keep,))


def allocate_gpu(conn: sqlite3.Connection, step_id: int) -> Optional[sqlite3.Row]:
    """Give a free, healthy, eligible GPU to ``step_id`` (inside the caller's transaction), or None."""
    held = conn.execute("SELECT * FROM resources WHERE allocated_step = ?", (step_id,)).fetchone()
    if held is not None:
        return held
    row = conn.execute(
        "SELECT * FROM resources WHERE kind = 'gpu' AND healthy = 1 AND eligible = 1 AND allocated_step IS NULL "
        "ORDER BY host, idx LIMIT 1"
    ).fetchone()
    if row is None:
        return None
    conn.execute("UPDATE resources SET allocated_step = ?, allocated_at = ? WHERE id = ? AND allocated_step IS NULL",
                 (step_id, time.time(), row["id"]))
    conn.execute("UPDATE steps SET gpu_id = ? WHERE id = ?", (row["id"], step_id))
    return row


def release_gpu(conn: sqlite3.Connection, step_id: int) -> bool:
    """Free whatever GPU ``step_id`` holds; True if one was held."""
    cur = conn.execute("UPDATE resources SET allocated_step = NULL, allocated_at = NULL WHERE allocated_step = ?",
                       (step_id,))
    return cur.rowcount > 0


def has_free_gpu(conn: sqlite3.Connection) -> bool:
    """True when at least one GPU could be allocated now."""
    return conn.execute("SELECT 1 FROM resources WHERE kind = 'gpu' AND healthy = 1 AND eligible = 1 "
                        "AND allocated_step IS NULL LIMIT 1").fetchone() is not None


def gpu_queue(conn: sqlite3.Connection, *, limit: Optional[int] = None) -> list[dict]:
    """Beams waiting for a GPU (steps in state ``queued``), in the order they will get one.

    The rule (per-case fairness, then arrival): the next free GPU goes to the waiting beam
    whose case would then hold the fewest GPUs; among equals, the case that arrived first
    (lowest case id); within a case, the lowest step then beam number. So a case alone takes
    every GPU, several cases share them evenly, and a small case never waits for all
    beams of a big one that arrived before it.
    """
    sql = f"""
        WITH held AS (
            SELECT h.case_id, COUNT(*) AS n FROM resources r JOIN steps h ON h.id = r.allocated_step GROUP BY h.case_id
        ), waiting AS (
            SELECT s.id AS step_id, s.case_id, c.uid AS "case", s.beam_number AS beam, s.name AS step,
                   s.step_index, b.updated_at AS queued_since, COALESCE(held.n, 0) AS held,
                   ROW_NUMBER() OVER (PARTITION BY s.case_id ORDER BY s.step_index, s.beam_number) - 1 AS rank
            FROM steps s JOIN cases c ON c.id = s.case_id
            LEFT JOIN beams b ON b.case_id = s.case_id AND b.number = s.beam_number
            LEFT JOIN held ON held.case_id = s.case_id
            WHERE s.state = 'queued' AND c.state NOT IN ({','.join('?' * len(FINAL_CASE_STATES))}, 'cancelling')
              AND NOT EXISTS (SELECT 1 FROM steps f WHERE f.case_id = s.case_id AND f.step_index = s.step_index
                              AND f.state IN ('failed', 'cancelled'))  -- the case is failing: run no more
        )
        SELECT * FROM waiting ORDER BY held + rank, case_id, step_index, beam"""
    params: list[Any] = list(FINAL_CASE_STATES)
    if limit:
        sql += " LIMIT ?"
        params.append(limit)
    return [dict(r) for r in conn.execute(sql, params)]


def release_orphaned_gpus(conn: sqlite3.Connection, older_than: float) -> list[sqlite3.Row]:
    """Free GPUs held (since before ``older_than``) by a step that is no longer in flight or no
    longer exists; return the rows that were freed. Allocation and release share the step's
    transactions, so this only finds what a crash mid-upgrade or a hand edit left behind."""
    rows = conn.execute(
        f"SELECT r.* FROM resources r LEFT JOIN steps s ON s.id = r.allocated_step "
        f"WHERE r.allocated_step IS NOT NULL AND COALESCE(r.allocated_at, 0) < ? "
        f"AND (s.id IS NULL OR s.state NOT IN ({','.join('?' * len(IN_FLIGHT_STEP_STATES))}))",
        (older_than, *IN_FLIGHT_STEP_STATES),
    ).fetchall()
    for row in rows:
        conn.execute("UPDATE resources SET allocated_step = NULL, allocated_at = NULL WHERE id = ?", (row["id"],))
    return rows


def gpu_history(conn: sqlite3.Connection, *, since: float, host: Optional[str] = None,
                index: Optional[int] = None) -> list[dict]:
    """History rows since ``since`` (UNIX seconds), oldest first, optionally for one GPU."""
    sql, params = "SELECT * FROM gpu_history WHERE at >= ?", [since]
    if host is not None:
        sql += " AND host = ?"
        params.append(host)
    if index is not None:
        sql += " AND idx = ?"
        params.append(index)
    return [dict(r) for r in conn.execute(sql + " ORDER BY at, host, idx", params)]


def gpus(conn: sqlite3.Connection) -> list[dict]:
    return [dict(r) for r in conn.execute("SELECT * FROM resources WHERE kind = 'gpu' ORDER BY host, idx")]


# --------------------------------------------------------------------------- workers


def worker_state(conn: sqlite3.Connection, name: str, kind: str, *, pid: Optional[int], state: str,
                 message: str = "", heartbeat: bool = True, alive_at: Optional[float] = None) -> None:
    """Upsert a worker's row (autocommit: a single statement). ``alive_at``: when the
    worker last showed it is alive (default: now)."""
    now = time.time() if alive_at is None else alive_at
    conn.execute(
        """INSERT INTO workers(name, kind, pid, state, started_at, heartbeat_at, message)
           VALUES (?,?,?,?,?,?,?)
           ON CONFLICT(name) DO UPDATE SET kind=excluded.kind, pid=excluded.pid, state=excluded.state,
               heartbeat_at=CASE WHEN ? THEN excluded.heartbeat_at ELSE workers.heartbeat_at END,
               message=excluded.message""",
        (name, kind, pid, state, now, now if heartbeat else None, message, 1 if heartbeat else 0),
    )


def workers(conn: sqlite3.Connection) -> list[dict]:
    return [dict(r) for r in conn.execute("SELECT * FROM workers ORDER BY name")]
