"""Retention: the copies of a finished case (its tree on the execution side, the staged
copy and the downloaded results on the host) are removed once their time has come
(``retention:`` in mqi.yaml, docs/privacy.md), and the remote root is swept for orphans.

The conductor decides (it owns the state): :func:`due` finds the finished cases whose
copies are due and :func:`clean_command` is what it sends to the transfer worker, which
owns the connection to the execution side; the worker answers with a ``case.cleaned``
event, applied by :func:`apply_cleaned`. Removal is asked for again when no answer came
(``REQUEST_AGAIN_SECONDS``). The orphan sweep (:func:`sweep_command`) tells the worker
which case folders it must keep; only folders named like a case id are ever removed.
"""

from __future__ import annotations

import json
import re
import sqlite3
from typing import Any, Optional

from mqi_framework.config import LoadedConfig, RetentionConfig

#: the copies retention removes, in the order it removes them
COPIES = ("remote", "staging", "results")
#: a removal asked for and not answered is asked for again after this long
REQUEST_AGAIN_SECONDS = 600.0
#: cases looked at per conductor check
BATCH = 100
#: names the orphan sweep may remove: this host's case ids, nothing else
CASE_UID = re.compile(r"^case-\d{6,}$")
#: a copy the transfer cannot remove (its plugin has no ``remove``): never asked for again
UNSUPPORTED = "unsupported"


def ages(rules: RetentionConfig) -> dict[str, float]:
    """Seconds after a case finished that each copy is removed (copies kept for ever left out)."""
    out = {}
    if rules.remote_after_hours is not None:
        out["remote"] = rules.remote_after_hours * 3600
    if rules.staging_after_days is not None:
        out["staging"] = rules.staging_after_days * 86400
    if rules.results_after_days is not None:
        out["results"] = rules.results_after_days * 86400
    return out


def cleaned_of(row: Any) -> dict[str, Any]:
    try:
        value = json.loads(row["cleaned"] or "{}")
    except (ValueError, TypeError):
        return {}
    return value if isinstance(value, dict) else {}


def removed_copies(row: Any) -> list[str]:
    """The copies of the case that retention removed or may be removing right now (asked
    for, not answered yet): a retry must then start from the beginning."""
    cleaned = cleaned_of(row)
    if "requested" in cleaned:
        return [c for c in COPIES if c != "results"]
    return [c for c in COPIES if isinstance(cleaned.get(c), (int, float))]


def due(conn: sqlite3.Connection, rules: RetentionConfig, final_states: tuple[str, ...],
        now: float) -> list[tuple[sqlite3.Row, list[str]]]:
    """Finished cases with copies due for removal, oldest first, and which copies."""
    limits = ages(rules)
    if not limits:
        return []
    oldest = min(limits.values())
    rows = conn.execute(
        f"SELECT id, uid, finished_at, cleaned FROM cases WHERE state IN ({','.join('?' * len(final_states))}) "
        "AND finished_at IS NOT NULL AND finished_at <= ? "
        "AND (json_extract(cleaned, '$.requested') IS NULL OR json_extract(cleaned, '$.requested') <= ?) "
        "AND (" + " OR ".join(f"json_extract(cleaned, '$.{c}') IS NULL" for c in limits) + ") "
        "ORDER BY finished_at LIMIT ?",
        (*final_states, now - oldest, now - REQUEST_AGAIN_SECONDS, BATCH),
    ).fetchall()
    out = []
    for row in rows:
        cleaned = cleaned_of(row)
        copies = [c for c in COPIES if c in limits and c not in cleaned and row["finished_at"] <= now - limits[c]]
        if copies:
            out.append((row, copies))
    return out


def clean_command(loaded: LoadedConfig, row: Any, copies: list[str]) -> dict:
    """The ``clean_case`` body: which copies of case ``row`` to remove, and where they are."""
    from mqi_framework.command_render import template_values

    values = template_values(loaded, row["uid"], 0)
    return {"type": "clean_case", "case": row["uid"], "case_id": row["id"], "remove": copies,
            "remote_dir": values["case_dir"], "staging_dir": values["staging_dir"],
            "results_dir": values["results_dir"]}


def mark_requested(conn: sqlite3.Connection, row: Any, now: float) -> None:
    cleaned = cleaned_of(row)
    cleaned["requested"] = now
    conn.execute("UPDATE cases SET cleaned = ? WHERE id = ?", (json.dumps(cleaned), row["id"]))


def apply_cleaned(conn: sqlite3.Connection, body: dict, now: float,
                  final_states: tuple[str, ...]) -> Optional[str]:
    """Record a ``case.cleaned`` answer; return the line for the case's events (None when
    the case is unknown)."""
    row = conn.execute("SELECT id, uid, state, cleaned FROM cases WHERE id = ?", (body.get("case_id"),)).fetchone()
    if row is None:
        return None
    if row["state"] not in final_states:
        # retried meanwhile: it runs from its first step again, so it re-creates what was removed
        return "removal answered after the case was retried; nothing recorded"
    cleaned = cleaned_of(row)
    cleaned.pop("requested", None)
    removed, missing = list(body.get("removed") or []), list(body.get("missing") or [])
    for copy in removed + missing:
        if copy in COPIES:
            cleaned[copy] = now
    for copy in body.get("unsupported") or []:
        if copy in COPIES:
            cleaned[copy] = UNSUPPORTED
    conn.execute("UPDATE cases SET cleaned = ? WHERE id = ?", (json.dumps(cleaned), row["id"]))
    parts = []
    if removed:
        parts.append("removed " + ", ".join(f"the {c} copy" for c in removed))
    if missing:
        parts.append("already gone: " + ", ".join(missing))
    if body.get("unsupported"):
        parts.append("kept (the transfer cannot remove them): " + ", ".join(body["unsupported"]))
    if body.get("problems"):
        parts.append("not removed, asked again later: " + "; ".join(body["problems"]))
    return "; ".join(parts) or "nothing to remove"


def sweep_command(loaded: LoadedConfig, conn: sqlite3.Connection, now: float) -> Optional[dict]:
    """The ``sweep_remote`` body, or None when no sweep is configured: the remote root, the
    case folders to keep (every case whose remote copy was not removed) and the age a
    folder must have before it may go."""
    rules = loaded.config.retention
    if rules.orphan_sweep_hours is None or rules.remote_after_hours is None:
        return None
    keep = [r[0] for r in conn.execute(
        "SELECT uid FROM cases WHERE json_extract(cleaned, '$.remote') IS NULL "
        "OR json_extract(cleaned, '$.remote') = ?", (UNSUPPORTED,))]
    return {"type": "sweep_remote", "remote_root": loaded.remote_root, "keep": keep,
            "older_than": now - rules.remote_after_hours * 3600}
