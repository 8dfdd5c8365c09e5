"""The JSON API under ``/api/`` (the same data as the pages), ``/metrics`` in Prometheus text
format and ``/healthz``."""

from __future__ import annotations

import time

from flask import Blueprint, Response, g, jsonify

from mqi_framework.api import views

from mqi_dashboard import data, metrics
from mqi_dashboard.requests import Unavailable, csrf_token, dashboard, request_actor

METRICS_TTL = 5.0  # /metrics reads every attempt (tens of ms with 100,000): scrapers share one rendering

blueprint = Blueprint("api", __name__)


@blueprint.get("/healthz")
def healthz() -> Response:
    dash = dashboard()
    try:
        conn = dash.host().new_reader()
        try:
            conn.execute("SELECT 1 FROM cases LIMIT 1").fetchall()
        finally:
            conn.close()
    except Exception as exc:
        return jsonify({"status": "unavailable", "error": f"state database: {type(exc).__name__}"}), 503
    return jsonify({"status": "ok", "uptime_seconds": round(time.time() - dash.started_at, 1)})


@blueprint.get("/api/overview")
def overview() -> Response:
    return jsonify(data.overview_data())


@blueprint.get("/api/cases")
def cases() -> Response:
    return jsonify(data.cases_data())


@blueprint.get("/api/cases/<ident>")
def case(ident: str) -> Response:
    return jsonify(data.case_data(ident))


@blueprint.get("/api/gpus")
def gpus() -> Response:
    return jsonify(data.gpus_data())


@blueprint.get("/api/workers")
def workers() -> Response:
    return jsonify(data.workers_data())


@blueprint.get("/api/queues")
def queues() -> Response:
    stats = dashboard().queue_stats()
    if stats is None:
        raise Unavailable("the broker cannot be read")
    return jsonify({"queues": [data.queue_dict(q) for q in stats]})


@blueprint.get("/api/dlq")
def dlq() -> Response:
    return jsonify(data.dlq_data())


@blueprint.get("/api/events")
def events() -> Response:
    return jsonify(data.events_data())


@blueprint.get("/api/session")
def session_info() -> Response:
    """Who the caller is and the CSRF token a script must send with POSTs."""
    return jsonify({"user": g.user, "actor": request_actor(),
                    "csrf_token": csrf_token() if g.via != "token" else None})


@blueprint.get("/metrics")
def prometheus() -> Response:
    dash = dashboard()
    at, text = dash.metrics_cache
    if not text or time.monotonic() - at >= METRICS_TTL:
        text = metrics.render(dash.read_db(), dash.queue_stats(),
                              known_case_states=views.BASE_CASE_STATES + tuple(dash.workflow_states()))
        dash.metrics_cache = (time.monotonic(), text)
    return Response(text, mimetype=None, content_type=metrics.CONTENT_TYPE)
