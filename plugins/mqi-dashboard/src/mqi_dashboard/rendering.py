"""Pages and errors: the template context every page gets, a page or only its live part,
errors as JSON or HTML, and the template filters."""

from __future__ import annotations

import logging
import sqlite3
import time
from typing import Any, Optional

from flask import Flask, Response, current_app, g, jsonify, render_template, request
from werkzeug.exceptions import HTTPException

from mqi_dashboard import charts
from mqi_dashboard.requests import PARTIAL_HEADER, BadParam, Unavailable, csrf_token, dashboard, wants_json

log = logging.getLogger(__name__)


def common_context() -> dict:
    dash = dashboard()
    settings = dash.settings
    return {
        "csp_nonce": g.get("csp_nonce", ""),
        "user": g.get("user"),
        "via": g.get("via"),
        "csrf_token": csrf_token,
        "refresh_seconds": settings.refresh_seconds,
        "has_credentials": settings.has_credentials,
        "show_names": settings.show_patient_names,
        "page_size": settings.page_size,
        "extra_pages": dash.extra_pages,
        "now": time.time(),
    }


def render_full(template: str, **context: Any) -> str:
    return render_template(template, **common_context(), **context)


def page(template: str, **context: Any) -> Response:
    """The page, or only its live part when the page's own script asks for a refresh."""
    if request.headers.get(PARTIAL_HEADER) == "1":
        values = {**common_context(), **context}
        current_app.update_template_context(values)
        tmpl = current_app.jinja_env.get_or_select_template(template)
        html = "".join(tmpl.blocks["live"](tmpl.new_context(values)))
        return Response(html, mimetype="text/html")
    return Response(render_full(template, **context), mimetype="text/html")


def error(status: int, message: str) -> Response:
    """An error as JSON (API, live refreshes, JSON clients) or as the error page."""
    if wants_json() or request.headers.get(PARTIAL_HEADER) or request.accept_mimetypes.best == "application/json":
        response = jsonify({"error": message, "status": status})
    else:
        response = Response(render_full("error.html", title=f"Error {status}", status=status, message=message),
                            mimetype="text/html")
    response.status_code = status
    return response


def install(app: Flask) -> None:
    """Template filters and globals, and the error handlers."""
    from mqi_framework.api import RETRYABLE_CASE_STATES, views

    app.jinja_env.filters.update(ts=_ts, ago=_ago, dur=charts.duration, stclass=_state_class)
    app.jinja_env.globals.update(gantt=charts.gantt, sparkline=charts.gpu_sparkline,
                                 throughput_bars=charts.throughput_bars, RETRYABLE=RETRYABLE_CASE_STATES,
                                 FINAL=views.FINAL_CASE_STATES)

    @app.errorhandler(BadParam)
    def bad_param(exc: BadParam) -> Response:
        return error(400, str(exc))

    @app.errorhandler(Unavailable)
    def unavailable(exc: Unavailable) -> Response:
        return error(503, str(exc))

    @app.errorhandler(sqlite3.OperationalError)
    def db_busy(exc: sqlite3.OperationalError) -> Response:
        log.warning("dashboard: %s %s: state database error: %s", request.method, request.path, exc)
        return error(503, f"the state database cannot be used right now ({exc}); try again shortly")

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> Response:
        return error(exc.code or 500, exc.description or exc.name)

    @app.errorhandler(Exception)
    def internal_error(exc: Exception) -> Response:
        log.exception("dashboard: %s %s failed", request.method, request.path)
        return error(500, "internal error (logged in the dashboard worker's log)")


def _ts(value: Optional[float]) -> str:
    if value is None:
        return "–"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(value))


def _ago(value: Optional[float]) -> str:
    if value is None:
        return "never"
    seconds = time.time() - value
    if seconds < 0:
        return "in " + charts.duration(-seconds)
    return charts.duration(seconds) + " ago"


def _state_class(state: Optional[str]) -> str:
    state = state or ""
    if state == "done":
        return "st-done"
    if state in ("failed", "rejected", "crashed"):
        return "st-failed"
    if state in ("cancelled", "cancelling", "stopped", "missing"):
        return "st-muted"
    # "waiting": a beam finished a step and waits for its siblings, which is progress
    if state in ("incomplete", "retrying", "queued", "restarting", "draining", "starting"):
        return "st-wait"
    return "st-active"
