"""What each page and its JSON twin show, read through the host API's read models with the
request's read-only connection. A page and ``/api/<page>`` return the same data."""

from __future__ import annotations

import re
import sqlite3
import time
from typing import Any

from flask import abort, request

from mqi_framework.api import views

from mqi_dashboard.requests import BadParam, Unavailable, bool_arg, case_ident, dashboard, int_arg

MAX_QUERY_LENGTH = 100
_STATE = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")


def _show_names() -> bool:
    return dashboard().settings.show_patient_names


def queue_dict(q: Any) -> dict:
    return {"queue": q.queue, "depth": q.depth, "ready": q.ready, "delayed": q.delayed, "leased": q.leased,
            "dead": q.dead}


def stale_after() -> float:
    """Seconds without a heartbeat after which a worker is drawn as stale."""
    loaded = dashboard().loaded
    beat = loaded.config.supervision.heartbeat_seconds if loaded is not None else 2.0
    return max(3 * beat, 10.0)


def overview_data() -> dict:
    dash = dashboard()
    data = views.overview(dash.read_db(), show_names=_show_names())
    stats = dash.queue_stats()
    data["broker_up"] = stats is not None
    data["queues"] = [queue_dict(q) for q in stats or []]
    data["dead_letters"] = sum(q.dead for q in stats or [])
    data["stale_after_seconds"] = stale_after()
    return data


def cases_data() -> dict:
    dash = dashboard()
    args = request.args
    q = (args.get("q") or "").strip()
    if len(q) > MAX_QUERY_LENGTH:
        raise BadParam(f"q is limited to {MAX_QUERY_LENGTH} characters")
    state = (args.get("state") or "").strip()
    if state and not _STATE.match(state):
        raise BadParam(f"state must be a case state such as done or failed, got {state[:40]!r}")
    attention = bool_arg(args, "attention")
    page_no = int_arg(args, "page", 1, 1, 1_000_000)
    per_page = int_arg(args, "per_page", dash.settings.page_size, 1, 500)
    conn = dash.read_db()
    data = views.case_page(conn, q=q, state=state or None, attention=attention, page=page_no,
                           per_page=per_page, show_names=_show_names())
    data["filters"] = {"q": q, "state": state, "attention": attention}
    data["states"] = views.case_states(conn, dash.workflow_states())
    return data


def case_row(ident: str) -> sqlite3.Row:
    row = views.find_case_row(dashboard().read_db(), case_ident(ident), show_names=_show_names())
    if row is None:
        abort(404, description=f"no case {ident!r} (cases are named case-000042)")
    return row


def case_data(ident: str) -> dict:
    return views.case_detail(dashboard().read_db(), case_row(ident), show_names=_show_names())


def gpus_data() -> dict:
    dash = dashboard()
    now = time.time()
    since = now - dash.settings.gpu_history_hours * 3600
    conn = dash.read_db()
    return {"gpus": views.gpus(conn), "history": views.gpu_history(conn, since=since),
            "history_since": since, "now": now, "queued_beams": views.beams_waiting_for_gpu(conn)}


def workers_data() -> dict:
    dash = dashboard()
    stats = dash.queue_stats()
    return {"workers": views.workers(dash.read_db()), "broker_up": stats is not None,
            "queues": [queue_dict(q) for q in stats or []], "stale_after_seconds": stale_after()}


def dlq_data() -> dict:
    dash = dashboard()
    show_names = _show_names()
    try:
        letters = dash.dead_letters()
    except Unavailable:
        raise
    except Exception as exc:
        raise Unavailable(f"the broker cannot be read: {exc}") from exc
    reasons = [d.reason for d in letters]
    if not show_names:  # exception texts often carry a case folder's path
        reasons = views.redact_known_names(dash.read_db(), reasons)
    resolutions = views.dead_letter_resolutions(dash.read_db(), [d.body for d in letters])
    out = []
    for d, reason, resolved in zip(letters, reasons, resolutions):
        body = d.body if isinstance(d.body, dict) else {}
        case = body.get("case") if isinstance(body.get("case"), str) else None
        item = {"id": d.id, "queue": d.queue, "message_id": d.message_id, "type": body.get("type"),
                "case": case, "beam": body.get("beam"), "step": body.get("step"), "attempt": body.get("attempt"),
                "attempts": d.attempts, "dead_at": d.dead_at, "reason": reason, "resolved": resolved}
        if show_names:
            item["body"] = body
        out.append(item)
    return {"dead_letters": out}


def events_data() -> dict:
    before = int_arg(request.args, "before", None, 1, 2**62)
    limit = int_arg(request.args, "limit", 100, 1, 1000)
    people = bool_arg(request.args, "people")
    items = views.events(dashboard().read_db(), limit=limit, before=before, people_only=people,
                         show_names=_show_names())
    return {"events": items, "people_only": people, "limit": limit,
            "next_before": items[-1]["id"] if len(items) == limit else None}
