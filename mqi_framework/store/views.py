"""Read models of the state database: what the CLI, the dashboard's pages, its JSON API and
/metrics show (through :mod:`mqi_framework.api`, which is how plugins reach them).

Every function takes an open (read-only) connection and returns plain, JSON-ready data.
Queries stay index-backed so that pages are fast with 10,000+ cases (migration
``003_dashboard_indexes.sql``). Case folder names (``cases.name``, which may be patient
ids) are only returned when ``show_names`` is true; free texts (messages, log tails,
events) of a case have its folder name replaced by ``[case folder]`` otherwise.

One module on purpose, though over 400 lines: every read model applies that redaction
rule, and keeping them together keeps the rule (and the index-backed queries that
migration 003 serves) in one place.
"""

from __future__ import annotations

import json
import re
import sqlite3
import time
from typing import Any, Iterable, Optional

from mqi_framework.store.records import FINAL_CASE_STATES, IN_FLIGHT_STEP_STATES as RUNNING_STEP_STATES

BASE_CASE_STATES = ("detected", "incomplete", "cancelling") + FINAL_CASE_STATES
REDACTED = "[case folder]"
#: upper bounds (seconds) of the step duration histogram in /metrics
DURATION_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600)
_UID = re.compile(r"^case-(\d{1,12})$")


def redact(text: Optional[str], name: Optional[str]) -> str:
    """``text`` with the case folder ``name`` replaced (no-op when ``name`` is None)."""
    text = text or ""
    if name and len(name) >= 3 and name in text:
        return text.replace(name, REDACTED)
    return text


_TOKEN = re.compile(r"[^\s/\\'\"`:,;()\[\]{}<>=]+")
_SEGMENT = re.compile(r"(?<=/)[^/'\"\n]+?(?=/|'|\"|: |$)")


def dead_letter_resolutions(conn: sqlite3.Connection, bodies: list[Any]) -> list[Optional[str]]:
    """For each dead-lettered message body, why it no longer matters, or None while it may:
    a command or event of a step whose case has ended (``resolved: case case-000042 is
    done``), whose attempt was superseded, or whose step finished. Such letters are left
    from a fault the pipeline recovered from (issue 13.4); replaying them changes nothing."""
    out: list[Optional[str]] = []
    for body in bodies:
        step_id = body.get("step_id") if isinstance(body, dict) else None
        if not isinstance(step_id, int):
            out.append(None)
            continue
        row = conn.execute("SELECT s.state, s.attempt, c.state AS case_state, c.uid FROM steps s "
                           "JOIN cases c ON c.id = s.case_id WHERE s.id = ?", (step_id,)).fetchone()
        attempt = body.get("attempt")
        if row is None:
            out.append("resolved: its step no longer exists")
        elif row["case_state"] in FINAL_CASE_STATES:
            out.append(f"resolved: case {row['uid']} is {row['case_state']}")
        elif isinstance(attempt, int) and row["attempt"] > attempt:
            out.append(f"resolved: attempt {attempt} was followed by attempt {row['attempt']}")
        elif row["state"] == "done":
            out.append("resolved: its step is done")
        else:
            out.append(None)
    return out


def redact_known_names(conn: sqlite3.Connection, texts: list[str]) -> list[str]:
    """``texts`` with every word that is some case's folder name replaced (for free texts that
    may mention any case: dead-letter reasons, the audit log)."""
    words = {t for text in texts for t in _TOKEN.findall(text or "") if len(t) >= 3}
    # names with spaces or punctuation show up as a segment of a path (".../John Doe/plan.dcm")
    words.update(t for text in texts for t in _SEGMENT.findall(text or "") if len(t) >= 3)
    tokens = sorted(words)
    found: set[str] = set()
    for i in range(0, len(tokens), 500):
        chunk = tokens[i:i + 500]
        found.update(r[0] for r in conn.execute(
            f"SELECT name FROM cases WHERE name IN ({','.join('?' * len(chunk))})", chunk))
    if not found:
        return [text or "" for text in texts]
    pattern = re.compile("|".join(re.escape(n) for n in sorted(found, key=len, reverse=True)))
    return [pattern.sub(REDACTED, text or "") for text in texts]


def _json(text: Optional[str]) -> Any:
    try:
        return json.loads(text or "{}")
    except ValueError:
        return {}


def table_exists(conn: sqlite3.Connection, name: str) -> bool:
    return conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)).fetchone() is not None


def local_midnight(now: float) -> float:
    t = time.localtime(now)
    return time.mktime((t.tm_year, t.tm_mon, t.tm_mday, 0, 0, 0, 0, 0, -1))


# --------------------------------------------------------------------------- counts


def counts_by_state(conn: sqlite3.Connection, table: str) -> dict[str, int]:
    assert table in ("cases", "beams", "steps")
    return {r[0]: r[1] for r in conn.execute(f"SELECT state, COUNT(*) FROM {table} GROUP BY state ORDER BY state")}


def beams_waiting_for_gpu(conn: sqlite3.Connection) -> int:
    """How many beams wait for a free GPU."""
    return conn.execute("SELECT COUNT(*) FROM steps WHERE state = 'queued'").fetchone()[0]


def case_states(conn: sqlite3.Connection, extra: Iterable[str] = ()) -> list[str]:
    """Every case state worth offering as a filter: the fixed ones, the workflow's labels, and
    whatever the database holds."""
    found = {r[0] for r in conn.execute("SELECT DISTINCT state FROM cases")}
    ordered = ["detected", *extra, "incomplete", "cancelling", *FINAL_CASE_STATES]
    return list(dict.fromkeys(ordered + sorted(found - set(ordered))))


# --------------------------------------------------------------------------- overview


def overview(conn: sqlite3.Connection, *, now: Optional[float] = None, attention_limit: int = 15,
             show_names: bool = False) -> dict:
    now = time.time() if now is None else now
    midnight = local_midnight(now)
    cases = counts_by_state(conn, "cases")
    beams = counts_by_state(conn, "beams")
    day_ago = now - 86400
    # throughput: finished cases per hour over the last 24 hours (oldest hour first)
    hourly = [{"done": 0, "failed": 0} for _ in range(24)]
    finished_today = {"done": 0, "failed": 0, "other": 0}
    durations: list[float] = []
    for state, finished_at, detected_at in conn.execute(
        "SELECT state, finished_at, detected_at FROM cases WHERE finished_at >= ?", (min(day_ago, midnight),)
    ):
        # one classification for both windows, so that the cards and the chart agree:
        # done, failed (failed or rejected: no result), other (cancelled)
        key = "done" if state == "done" else "failed" if state in ("failed", "rejected") else "other"
        if finished_at >= day_ago:
            slot = min(23, int((finished_at - day_ago) // 3600))
            if key != "other":
                hourly[slot][key] += 1
            if state == "done":
                durations.append(finished_at - detected_at)
        if finished_at >= midnight:
            finished_today[key] += 1
    durations.sort()
    detected_today = conn.execute("SELECT COUNT(*) FROM cases WHERE detected_at >= ?", (midnight,)).fetchone()[0]
    attention_total = conn.execute("SELECT COUNT(*) FROM cases WHERE attention = 1").fetchone()[0]
    attention = [
        _case_row(r, show_names) for r in conn.execute(
            "SELECT id, uid, name, state, attention, message, info, detected_at, updated_at, finished_at "
            "FROM cases WHERE attention = 1 ORDER BY updated_at DESC LIMIT ?", (attention_limit,))
    ]
    waiting_for_delivery = [
        _case_row(r, show_names) for r in conn.execute(
            "SELECT id, uid, name, state, attention, message, info, detected_at, updated_at, finished_at "
            "FROM cases WHERE state = 'incomplete' AND attention = 0 ORDER BY detected_at LIMIT ?", (attention_limit,))
    ]
    steps_running = conn.execute(
        f"SELECT COUNT(*) FROM steps WHERE state IN ({','.join('?' * len(RUNNING_STEP_STATES))})",
        RUNNING_STEP_STATES).fetchone()[0]
    beams_waiting_gpu = beams_waiting_for_gpu(conn)
    gpu = conn.execute(
        "SELECT COUNT(*), COALESCE(SUM(healthy), 0), COALESCE(SUM(allocated_step IS NOT NULL), 0) "
        "FROM resources WHERE kind = 'gpu'").fetchone()
    return {
        "now": now,
        "cases_total": sum(cases.values()),
        "cases_by_state": cases,
        "cases_active": sum(n for s, n in cases.items() if s not in FINAL_CASE_STATES),
        "beams_by_state": beams,
        "today": {"detected": detected_today, "finished": finished_today, "since": midnight},
        "throughput": {
            "hourly": hourly,
            "hour_starts": [day_ago + 3600 * i for i in range(24)],
            "done_24h": sum(h["done"] for h in hourly),
            "failed_24h": sum(h["failed"] for h in hourly),
            "done_last_hour": hourly[-1]["done"],
            "median_case_seconds_24h": durations[len(durations) // 2] if durations else None,
        },
        "attention": {"total": attention_total, "cases": attention},
        # incomplete, not flagged yet: normal while a delivery is still being exported, but
        # a person should see them at once, not after incomplete_flag_after_seconds
        "waiting_for_delivery": waiting_for_delivery,
        "steps_running": steps_running,
        "beams_waiting_for_gpu": beams_waiting_gpu,
        "gpus": {"total": gpu[0], "healthy": gpu[1], "allocated": gpu[2]},
        "workers": workers(conn, now=now),
    }


# --------------------------------------------------------------------------- cases


def _case_row(row: sqlite3.Row, show_names: bool) -> dict:
    name = None if show_names else row["name"]
    out = {
        "id": row["uid"],
        "state": row["state"],
        "attention": bool(row["attention"]),
        "message": redact(row["message"], name),
        "info": _json(row["info"]),
        "detected_at": row["detected_at"],
        "updated_at": row["updated_at"],
        "finished_at": row["finished_at"],
    }
    if show_names:
        out["name"] = row["name"]
    return out


def _like(text: str) -> str:
    return "%" + text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


def case_page(conn: sqlite3.Connection, *, q: str = "", state: Optional[str] = None, attention: bool = False,
              page: int = 1, per_page: int = 50, show_names: bool = False) -> dict:
    """One page of cases, newest first, with their beams; ``total`` counts every match."""
    where, params = [], []
    if state:
        where.append("state = ?")
        params.append(state)
    if attention:
        where.append("attention = 1")
    if q:
        match = _UID.match(q.lower())
        terms = ["uid LIKE ? ESCAPE '\\'", "message LIKE ? ESCAPE '\\'", "info LIKE ? ESCAPE '\\'"]
        values: list[Any] = [_like(q)] * 3
        if show_names:
            terms.append("name LIKE ? ESCAPE '\\'")
            values.append(_like(q))
        if match or q.isdigit():
            terms.append("id = ?")
            values.append(int(match.group(1) if match else q))
        where.append("(" + " OR ".join(terms) + ")")
        params.extend(values)
    clause = (" WHERE " + " AND ".join(where)) if where else ""
    total = conn.execute(f"SELECT COUNT(*) FROM cases{clause}", params).fetchone()[0]
    rows = conn.execute(
        f"SELECT id, uid, name, state, attention, message, info, detected_at, updated_at, finished_at "
        f"FROM cases{clause} ORDER BY id DESC LIMIT ? OFFSET ?", params + [per_page, (page - 1) * per_page]
    ).fetchall()
    beams: dict[int, list[dict]] = {r["id"]: [] for r in rows}
    if rows:
        ids = list(beams)
        for b in conn.execute(
            f"SELECT case_id, number, state FROM beams WHERE case_id IN ({','.join('?' * len(ids))}) "
            f"ORDER BY case_id, number", ids
        ):
            beams[b["case_id"]].append({"number": b["number"], "state": b["state"]})
    cases = []
    for r in rows:
        item = _case_row(r, show_names)
        item["beams"] = beams[r["id"]]
        cases.append(item)
    pages = max(1, -(-total // per_page))
    return {"total": total, "page": page, "pages": pages, "per_page": per_page, "cases": cases}


def find_case_row(conn: sqlite3.Connection, ident: str, *, show_names: bool) -> Optional[sqlite3.Row]:
    """A case by ``case-000042`` (or ``42``); by folder name only when names may be shown, so
    that nobody can probe the dashboard for a patient id."""
    match = _UID.match(ident)
    if match or ident.isdigit():
        return conn.execute("SELECT * FROM cases WHERE id = ?", (int(match.group(1) if match else ident),)).fetchone()
    if show_names:
        return conn.execute("SELECT * FROM cases WHERE name = ?", (ident,)).fetchone()
    return None


def _beams_by_case(conn: sqlite3.Connection, ids: list[int], names: dict[int, Optional[str]]) -> dict[int, list[dict]]:
    beams: dict[int, list[dict]] = {i: [] for i in ids}
    for i in range(0, len(ids), 500):
        chunk = ids[i:i + 500]
        for b in conn.execute(f"SELECT case_id, number, state, message FROM beams WHERE case_id IN "
                              f"({','.join('?' * len(chunk))}) ORDER BY case_id, number", chunk):
            beams[b["case_id"]].append({"number": b["number"], "state": b["state"],
                                        "message": redact(b["message"], names.get(b["case_id"]))})
    return beams


def list_cases(conn: sqlite3.Connection, *, state: Optional[str] = None, show_names: bool = False) -> list[dict]:
    """Every case (oldest first), each with its beams (number, state, message)."""
    sql, params = ("SELECT id, uid, name, state, attention, message, info, detected_at, updated_at, finished_at "
                   "FROM cases"), []
    if state:
        sql += " WHERE state = ?"
        params.append(state)
    rows = conn.execute(sql + " ORDER BY id", params).fetchall()
    beams = _beams_by_case(conn, [r["id"] for r in rows], {r["id"]: None if show_names else r["name"] for r in rows})
    out = []
    for r in rows:
        item = _case_row(r, show_names)
        item["beams"] = beams[r["id"]]
        out.append(item)
    return out


def case_summary(conn: sqlite3.Connection, row: sqlite3.Row, *, show_names: bool) -> dict:
    """One case with its beams, as in :func:`list_cases`."""
    item = _case_row(row, show_names)
    item["beams"] = _beams_by_case(conn, [row["id"]], {row["id"]: None if show_names else row["name"]})[row["id"]]
    return item


def case_detail(conn: sqlite3.Connection, row: sqlite3.Row, *, show_names: bool, events_limit: Optional[int] = 300) -> dict:
    """Everything the case page shows: beams, steps with every attempt, GPU, events."""
    name = None if show_names else row["name"]
    out = _case_row(row, show_names)
    out["step_index"] = row["step_index"]
    out["incomplete_since"] = row["incomplete_since"]
    out["beams"] = [
        {"number": b["number"], "name": redact(b["name"], name), "state": b["state"],
         "message": redact(b["message"], name), "updated_at": b["updated_at"]}
        for b in conn.execute("SELECT number, name, state, message, updated_at FROM beams WHERE case_id = ? "
                              "ORDER BY number", (row["id"],))
    ]
    attempts: dict[int, list[dict]] = {}
    for a in conn.execute(
        "SELECT a.step_id, a.attempt, a.dispatched_at, a.started_at, a.finished_at, a.outcome, a.exit_code, "
        "a.message, a.log_tail FROM attempts a JOIN steps s ON s.id = a.step_id WHERE s.case_id = ? "
        "ORDER BY a.step_id, a.attempt", (row["id"],)
    ):
        attempts.setdefault(a["step_id"], []).append({
            "attempt": a["attempt"], "dispatched_at": a["dispatched_at"], "started_at": a["started_at"],
            "finished_at": a["finished_at"], "outcome": a["outcome"], "exit_code": a["exit_code"],
            "message": redact(a["message"], name), "log_tail": redact(a["log_tail"], name),
        })
    steps = []
    for s in conn.execute(
        "SELECT s.*, r.host AS gpu_host, r.idx AS gpu_index FROM steps s LEFT JOIN resources r ON r.id = s.gpu_id "
        "WHERE s.case_id = ? ORDER BY s.step_index, s.beam_number", (row["id"],)
    ):
        steps.append({
            "step": s["name"], "index": s["step_index"], "beam": s["beam_number"] or None, "worker": s["worker"],
            "state": s["state"], "attempt": s["attempt"], "max_attempt": s["max_attempt"],
            "next_attempt_at": s["next_attempt_at"], "progress": s["progress"],
            "progress_text": redact(s["progress_text"], name), "started_at": s["started_at"],
            "finished_at": s["finished_at"], "exit_code": s["exit_code"], "message": redact(s["message"], name),
            "gpu": None if s["gpu_host"] is None else {"host": s["gpu_host"], "index": s["gpu_index"]},
            "attempts": attempts.get(s["id"], []),
        })
    out["steps"] = steps
    out["events"] = [
        {"id": e["id"], "at": e["at"], "beam": e["beam"], "step": e["step"], "kind": e["kind"],
         "message": redact(e["message"], name), "actor": e["actor"]}
        for e in conn.execute("SELECT id, at, beam, step, kind, message, actor FROM events WHERE case_id = ? "
                              "ORDER BY id DESC LIMIT ?", (row["id"], -1 if events_limit is None else events_limit))
    ]
    return out


def case_id_of(conn: sqlite3.Connection, uid: Optional[str]) -> Optional[int]:
    match = _UID.match(uid or "")
    return int(match.group(1)) if match else None


# --------------------------------------------------------------------------- resources and workers


def gpus(conn: sqlite3.Connection) -> list[dict]:
    out = []
    for r in conn.execute(
        "SELECT r.*, s.name AS step_name, s.beam_number, c.uid AS case_uid FROM resources r "
        "LEFT JOIN steps s ON s.id = r.allocated_step LEFT JOIN cases c ON c.id = s.case_id "
        "WHERE r.kind = 'gpu' ORDER BY r.host, r.idx"
    ):
        row = dict(r)
        out.append({
            "host": row["host"], "index": row["idx"], "uuid": row["uuid"], "name": row["name"],
            "memory_total_mb": row["memory_total_mb"], "memory_used_mb": row["memory_used_mb"],
            "memory_free_mb": row["memory_free_mb"], "utilization_pct": row["utilization_pct"],
            "temperature_c": row["temperature_c"], "healthy": bool(row["healthy"]),
            "eligible": bool(row.get("eligible", 1)), "note": row.get("note", ""), "curator": row["curator"],
            "seen_at": row["seen_at"], "allocated_at": row["allocated_at"],
            "allocated": None if row["allocated_step"] is None else {
                "case": row["case_uid"], "beam": row["beam_number"], "step": row["step_name"]},
        })
    return out


def gpu_history(conn: sqlite3.Connection, *, since: float, max_points: int = 240) -> dict[str, list[dict]]:
    """``"host:index"`` -> readings since ``since``, oldest first, thinned to ``max_points``
    per GPU; empty when the database has no history table (older schema)."""
    if not table_exists(conn, "gpu_history"):
        return {}
    series: dict[str, list[dict]] = {}
    for r in conn.execute(
        "SELECT at, host, idx, memory_used_mb, utilization_pct, allocated FROM gpu_history WHERE at >= ? "
        "ORDER BY host, idx, at", (since,)
    ):
        series.setdefault(f"{r['host']}:{r['idx']}", []).append(
            {"at": r["at"], "memory_used_mb": r["memory_used_mb"], "utilization_pct": r["utilization_pct"],
             "allocated": bool(r["allocated"])})
    for key, points in series.items():
        if len(points) > max_points:
            step = len(points) / max_points
            series[key] = [points[int(i * step)] for i in range(max_points)] + [points[-1]]
    return series


def workers(conn: sqlite3.Connection, *, now: Optional[float] = None) -> list[dict]:
    now = time.time() if now is None else now
    out = []
    for r in conn.execute("SELECT * FROM workers ORDER BY name"):
        out.append({
            "name": r["name"], "kind": r["kind"], "pid": r["pid"], "state": r["state"],
            "started_at": r["started_at"], "heartbeat_at": r["heartbeat_at"],
            "heartbeat_age": None if r["heartbeat_at"] is None else max(0.0, now - r["heartbeat_at"]),
            "restarts": r["restarts"], "last_exit": r["last_exit"], "message": r["message"],
        })
    return out


def events(conn: sqlite3.Connection, *, limit: int = 100, before: Optional[int] = None,
           people_only: bool = False, show_names: bool = False) -> list[dict]:
    """The audit log, newest first; ``people_only`` keeps what people did (dashboard, CLI)."""
    where, params = [], []
    if before is not None:
        where.append("e.id < ?")
        params.append(before)
    if people_only:
        where.append("(e.actor LIKE 'dashboard:%' OR e.actor LIKE 'cli%')")
    clause = (" WHERE " + " AND ".join(where)) if where else ""
    rows = conn.execute(
        f"SELECT e.id, e.at, e.case_id, e.beam, e.step, e.kind, e.message, e.actor, c.uid FROM events e "
        f"LEFT JOIN cases c ON c.id = e.case_id{clause} ORDER BY e.id DESC LIMIT ?", params + [limit]).fetchall()
    messages = [r["message"] for r in rows]
    if not show_names:
        messages = redact_known_names(conn, messages)
    return [{"id": r["id"], "at": r["at"], "case": r["uid"], "beam": r["beam"], "step": r["step"], "kind": r["kind"],
             "message": message, "actor": r["actor"]} for r, message in zip(rows, messages)]


# --------------------------------------------------------------------------- metrics


def step_durations(conn: sqlite3.Connection, buckets: tuple = DURATION_BUCKETS) -> list[dict]:
    """Cumulative histogram of finished attempts' run time (started → finished) by step and
    outcome. SQLite puts each attempt into its bucket in one pass; the cumulative counts
    Prometheus wants are summed here."""
    bucket_of = "CASE " + " ".join(f"WHEN d <= {float(b)!r} THEN {i}" for i, b in enumerate(buckets)) + \
        f" ELSE {len(buckets)} END"
    rows = conn.execute(
        f"SELECT step, outcome, {bucket_of} AS bucket, COUNT(*), SUM(d) FROM ("
        f"  SELECT s.name AS step, COALESCE(a.outcome, '') AS outcome, a.finished_at - a.started_at AS d"
        f"  FROM attempts a JOIN steps s ON s.id = a.step_id"
        f"  WHERE a.finished_at IS NOT NULL AND a.started_at IS NOT NULL"
        f") GROUP BY step, outcome, bucket ORDER BY step, outcome").fetchall()
    series: dict[tuple[str, str], dict] = {}
    for step, outcome, bucket, count, total in rows:
        item = series.setdefault((step, outcome), {"step": step, "outcome": outcome, "count": 0, "sum": 0.0,
                                                   "per_bucket": [0] * (len(buckets) + 1)})
        item["count"] += count
        item["sum"] += total or 0.0
        item["per_bucket"][bucket] += count
    out = []
    for item in series.values():
        running, cumulative = 0, []
        for bound, count in zip(buckets, item.pop("per_bucket")):
            running += count
            cumulative.append((bound, running))
        item["buckets"] = cumulative
        out.append(item)
    return out


def worker_restarts(conn: sqlite3.Connection) -> dict[str, int]:
    return {r[0]: r[1] for r in conn.execute("SELECT name, restarts FROM workers ORDER BY name")}
