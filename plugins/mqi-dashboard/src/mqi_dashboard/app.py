"""The Flask application: pages, JSON API, actions, /metrics, /healthz.

Presentation only: reads go to the read models of :mod:`mqi_framework.api` (``views``)
through a read-only connection opened for one request (``PRAGMA query_only``; WAL readers
never block the conductor); actions (retry, cancel, DLQ replay and purge) are the
:class:`mqi_framework.api.Host` operations, which audit and notify them exactly as for the CLI.
"""

from __future__ import annotations

import hashlib
import logging
import re
import secrets
import sqlite3
import threading
import time
from typing import Any, Callable, Optional
from urllib.parse import urlsplit

from flask import Flask, Response, abort, flash, g, jsonify, redirect, render_template, request, session, url_for
from markupsafe import Markup
from werkzeug.exceptions import HTTPException

from mqi_framework.api import RETRYABLE_CASE_STATES, ActionRefused, CaseNotFound, Host, StoreError, load_config, views
from mqi_framework.protocols import PluginContext

from mqi_dashboard import auth, charts, metrics
from mqi_dashboard.settings import DashboardSettings, is_loopback

log = logging.getLogger(__name__)

PARTIAL_HEADER = "X-MQI-Partial"
QUEUE_STATS_TTL = 1.0
METRICS_TTL = 5.0  # /metrics reads every attempt (tens of ms with 100,000): scrapers share one rendering
MAX_QUERY_LENGTH = 100
_STATE = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
_IDENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class BadParam(Exception):
    """A query or form parameter of the wrong shape (answered with 400)."""


class Unavailable(Exception):
    """The state database or the config cannot be used right now (answered with 503)."""


# --------------------------------------------------------------------------- the dashboard's state


class Dashboard:
    """What the request handlers share: settings, context, config, the host API, extra pages."""

    def __init__(self, settings: DashboardSettings, context: PluginContext, *, loaded: Any = None,
                 plugin_host: Any = None) -> None:
        self.settings = settings
        self.context = context
        self._loaded = loaded
        self.plugin_host = plugin_host
        self.throttle = auth.LoginThrottle()
        self.extra_pages: list[tuple[str, str, str]] = []  # (path, title, endpoint)
        self._broker_host: Optional[Host] = None
        self._broker_lock = threading.Lock()
        self._queue_cache: tuple[float, Optional[list]] = (0.0, None)
        self.metrics_cache: tuple[float, str] = (0.0, "")
        self.started_at = time.time()
        material = "\0".join([str(settings.token or "")] + [f"{u}:{h}" for u, h in sorted(settings.accounts().items())])
        self.credentials_version = hashlib.sha256(material.encode()).hexdigest()[:16]

    # -- config, state and broker (all through the host API)

    @property
    def loaded(self) -> Any:
        if self._loaded is None and self.context.config_path is not None:
            self._loaded = load_config(self.context.config_path)
        return self._loaded

    def host(self, actor: str = "dashboard") -> Host:
        """A host API object for one action (it opens its own connections)."""
        if self.loaded is None:
            raise Unavailable("the dashboard does not know the host's config")
        return Host(self.loaded, actor=actor, plugin_host=self.plugin_host)

    def read_db(self) -> sqlite3.Connection:
        """The request's read-only connection (opened on first use, closed at teardown)."""
        conn = g.get("mqi_db")
        if conn is None:
            try:
                conn = self.host().new_reader()
            except StoreError as exc:
                raise Unavailable(str(exc)) from exc
            g.mqi_db = conn
        return conn

    def workflow_states(self) -> list[str]:
        return self.host().workflow_states() if self.loaded is not None else []

    def queue_stats(self) -> Optional[list]:
        """The host's queues (cached for a second: many open pages poll), None when unreadable.
        One broker connection serves every request thread, one at a time."""
        at, cached = self._queue_cache
        if cached is not None and time.monotonic() - at < QUEUE_STATS_TTL:
            return cached
        try:
            with self._broker_lock:
                if self._broker_host is None:
                    self._broker_host = self.host()
                stats = self._broker_host.queues()
        except Exception as exc:  # the pages still show the state database
            log.warning("dashboard: cannot read the broker: %s", exc)
            return None
        self._queue_cache = (time.monotonic(), stats)
        return stats

    def dead_letters(self) -> list:
        with self._broker_lock:
            if self._broker_host is None:
                self._broker_host = self.host()
            return self._broker_host.dead_letters()

    def forget_queue_stats(self) -> None:
        self._queue_cache = (0.0, None)

    def close(self) -> None:
        with self._broker_lock:
            if self._broker_host is not None:
                self._broker_host.close()
                self._broker_host = None


# --------------------------------------------------------------------------- helpers


def _int_arg(source: Any, name: str, default: Optional[int], lo: int, hi: int) -> Optional[int]:
    raw = source.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(str(raw).strip())
    except ValueError:
        raise BadParam(f"{name} must be a whole number, got {str(raw)[:40]!r}") from None
    if not lo <= value <= hi:
        raise BadParam(f"{name} must be between {lo} and {hi}, got {value}")
    return value


def _bool_arg(source: Any, name: str) -> bool:
    raw = str(source.get(name) or "").strip().lower()
    if raw in ("", "0", "false", "no", "off"):
        return False
    if raw in ("1", "true", "yes", "on"):
        return True
    raise BadParam(f"{name} must be 1 or 0, got {raw[:40]!r}")


def _ident(ident: str) -> str:
    if not _IDENT.match(ident):
        raise BadParam("a case is named case-000042 (or 42)")
    return ident


def _action_params() -> Any:
    """The parameters of an action: a JSON object, or the form fields."""
    if not request.is_json:
        return request.form
    data = request.get_json(silent=True)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise BadParam("send a JSON object (or form fields)")
    return data


def _safe_next(target: Optional[str], default: str) -> str:
    """A redirect target on this site only (no scheme, no host, no //)."""
    if not target:
        return default
    parts = urlsplit(target)
    if parts.scheme or parts.netloc or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return default
    return target


def _host_is_loopback(host_header: str) -> bool:
    host = host_header.strip()
    if host.startswith("["):
        host = host[1:].split("]", 1)[0]
    elif host.count(":") == 1:
        host = host.split(":", 1)[0]
    return is_loopback(host)


def _request_actor() -> str:
    """Who the audit log names for this request's actions."""
    if g.via == "token":
        return auth.TOKEN_ACTOR
    if g.via == "local":
        return auth.LOCAL_ACTOR
    return f"dashboard:{g.user}"


def _api() -> bool:
    return request.path.startswith("/api/") or request.path == "/metrics"


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
    if state in ("incomplete", "retrying", "waiting", "queued", "restarting", "draining", "starting"):
        return "st-wait"
    return "st-active"


# --------------------------------------------------------------------------- the application


def create_app(settings: Optional[DashboardSettings] = None, context: Optional[PluginContext] = None, *,
               loaded: Any = None, plugin_host: Any = None) -> Flask:
    """Build the dashboard application.

    ``context`` locates the state database, broker and config (``PluginContext`` of the
    worker); ``loaded`` (a LoadedConfig) may be given instead of ``context.config_path``;
    ``plugin_host`` supplies extra pages (``mqi_register_dashboard_pages``), default the
    process-wide one.
    """
    settings = settings or DashboardSettings()
    if context is None:
        if loaded is None:
            raise ValueError("create_app needs a PluginContext or a loaded config")
        context = Host(loaded).plugin_context("dashboard")
    app = Flask("mqi_dashboard", static_folder=None)  # everything is inline: no files to serve
    app.config.update(
        SECRET_KEY=settings.secret_key or secrets.token_bytes(32),
        SESSION_COOKIE_NAME="mqi_dashboard",
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Strict",
        SESSION_COOKIE_SECURE=settings.secure_cookies,
        PERMANENT_SESSION_LIFETIME=12 * 3600,
        MAX_CONTENT_LENGTH=64 * 1024,
        TEMPLATES_AUTO_RELOAD=False,
    )
    app.json.sort_keys = False  # type: ignore[attr-defined]
    dash = Dashboard(settings, context, loaded=loaded, plugin_host=plugin_host)
    app.extensions["mqi_dashboard"] = dash
    show_names = settings.show_patient_names

    app.jinja_env.filters.update(ts=_ts, ago=_ago, dur=charts.duration, stclass=_state_class)
    app.jinja_env.globals.update(gantt=charts.gantt, sparkline=charts.gpu_sparkline,
                                 throughput_bars=charts.throughput_bars, RETRYABLE=RETRYABLE_CASE_STATES,
                                 FINAL=views.FINAL_CASE_STATES)

    # ------------------------------------------------------------------ request guards

    @app.before_request
    def guard() -> Optional[Response]:
        g.csp_nonce = secrets.token_urlsafe(16)
        if not settings.has_credentials and not _host_is_loopback(request.host):
            # no credentials (so bound to loopback): refuse Host names that point elsewhere (DNS rebinding)
            return _error(403, "this dashboard answers only to localhost (it has no credentials configured)")
        if request.endpoint in ("healthz", "static"):
            return None
        g.user, g.via = _authenticate()
        if request.endpoint == "login":
            return None
        if g.user is None:
            if _api():
                response = _error(401, "authentication required: send Authorization: Bearer <token>")
                response.headers["WWW-Authenticate"] = 'Bearer realm="mqi-dashboard"'
                return response
            return redirect(url_for("login", next=request.full_path.rstrip("?")))
        if request.method == "POST" and g.via != "token":
            given = request.headers.get(auth.CSRF_HEADER) or request.form.get(auth.CSRF_FIELD)
            if not auth.same_token(session.get("csrf"), given):
                return _error(403, "the form is stale or did not come from this dashboard (CSRF check failed): "
                                   "reload the page and try again")
        return None

    def _authenticate() -> tuple[Optional[str], str]:
        header = request.headers.get("Authorization", "")
        if header.lower().startswith("bearer ") and settings.token:
            if auth.check_token(settings, header[7:].strip()):
                return "token", "token"
            return None, "token"
        if not settings.has_credentials:
            return "local", "local"
        user = session.get("user")
        if user and session.get("credentials") == dash.credentials_version:
            return user, "session"
        return None, "none"

    actor = _request_actor

    def csrf_token() -> str:
        token = session.get("csrf")
        if not token:
            token = session["csrf"] = auth.new_csrf_token()
        return token

    @app.after_request
    def security_headers(response: Response) -> Response:
        nonce = g.get("csp_nonce", "")
        response.headers["Content-Security-Policy"] = (
            f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; img-src 'self' data:; "
            f"connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["X-Frame-Options"] = "DENY"
        response.headers["Referrer-Policy"] = "same-origin"
        response.headers["Cross-Origin-Opener-Policy"] = "same-origin"
        response.headers["Cross-Origin-Resource-Policy"] = "same-origin"
        response.headers.setdefault("Cache-Control", "no-store")
        response.headers["Vary"] = "Cookie, Authorization, " + PARTIAL_HEADER
        return response

    @app.teardown_request
    def close_db(_: Optional[BaseException]) -> None:
        conn = g.pop("mqi_db", None)
        if conn is not None:
            conn.close()

    # ------------------------------------------------------------------ errors

    def _error(status: int, message: str) -> Response:
        if _api() or request.headers.get(PARTIAL_HEADER) or request.accept_mimetypes.best == "application/json":
            response = jsonify({"error": message, "status": status})
        else:
            response = Response(_render_full("error.html", title=f"Error {status}", status=status, message=message),
                                mimetype="text/html")
        response.status_code = status
        return response

    @app.errorhandler(BadParam)
    def bad_param(exc: BadParam) -> Response:
        return _error(400, str(exc))

    @app.errorhandler(Unavailable)
    def unavailable(exc: Unavailable) -> Response:
        return _error(503, str(exc))

    @app.errorhandler(sqlite3.OperationalError)
    def db_busy(exc: sqlite3.OperationalError) -> Response:
        log.warning("dashboard: %s %s: state database error: %s", request.method, request.path, exc)
        return _error(503, f"the state database cannot be used right now ({exc}); try again shortly")

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> Response:
        return _error(exc.code or 500, exc.description or exc.name)

    @app.errorhandler(Exception)
    def internal_error(exc: Exception) -> Response:
        log.exception("dashboard: %s %s failed", request.method, request.path)
        return _error(500, "internal error (logged in the dashboard worker's log)")

    # ------------------------------------------------------------------ rendering

    def _common() -> dict:
        return {
            "csp_nonce": g.get("csp_nonce", ""),
            "user": g.get("user"),
            "via": g.get("via"),
            "csrf_token": csrf_token,
            "refresh_seconds": settings.refresh_seconds,
            "has_credentials": settings.has_credentials,
            "show_names": show_names,
            "page_size": settings.page_size,
            "extra_pages": dash.extra_pages,
            "now": time.time(),
        }

    def _render_full(template: str, **context: Any) -> str:
        return render_template(template, **_common(), **context)

    def page(template: str, **context: Any) -> Response:
        """The page, or only its live part when the page's own script asks for a refresh."""
        if request.headers.get(PARTIAL_HEADER) == "1":
            values = {**_common(), **context}
            app.update_template_context(values)
            tmpl = app.jinja_env.get_or_select_template(template)
            html = "".join(tmpl.blocks["live"](tmpl.new_context(values)))
            return Response(html, mimetype="text/html")
        return Response(_render_full(template, **context), mimetype="text/html")

    # ------------------------------------------------------------------ health, login

    @app.get("/healthz")
    def healthz() -> Response:
        try:
            conn = dash.host().new_reader()
            try:
                conn.execute("SELECT 1 FROM cases LIMIT 1").fetchall()
            finally:
                conn.close()
        except Exception as exc:
            return jsonify({"status": "unavailable", "error": f"state database: {type(exc).__name__}"}), 503
        return jsonify({"status": "ok", "uptime_seconds": round(time.time() - dash.started_at, 1)})

    @app.route("/login", methods=["GET", "POST"])
    def login() -> Any:
        target = _safe_next(request.values.get("next"), url_for("overview"))
        if not settings.has_credentials or g.get("via") == "session":
            return redirect(target)
        message = ""
        status = 200
        if request.method == "POST":
            client = request.remote_addr or "?"
            if not auth.same_token(session.get("csrf"), request.form.get(auth.CSRF_FIELD)):
                message, status = "The login form expired; try again.", 400
            elif dash.throttle.blocked(client):
                message, status = "Too many failed logins from this address; wait a few minutes.", 429
            else:
                name = (request.form.get("user") or "").strip()
                secret = request.form.get("password") or ""
                via = None
                if name and not auth.valid_name(name):
                    message, status = "Names are letters, digits, space, . _ @ - (up to 64).", 400
                elif name in settings.accounts() and auth.check_password(settings, name, secret):
                    via = "password"
                elif settings.token and auth.check_token(settings, secret):
                    via = "token"
                    name = name or "token"
                if via is not None and not message:
                    dash.throttle.succeeded(client)
                    session.clear()
                    session.permanent = True
                    session.update(user=name, via=via, credentials=dash.credentials_version,
                                   csrf=auth.new_csrf_token(), since=time.time())
                    log.info("dashboard: %s logged in (%s) from %s", name, via, client)
                    return redirect(target)
                if not message:
                    dash.throttle.failed(client)
                    time.sleep(0.3)
                    message, status = "Wrong name, password or token.", 401
        html = _render_full("login.html", title="Log in", message=message, next=target,
                            passwords=bool(settings.accounts()), token=bool(settings.token))
        return Response(html, status=status, mimetype="text/html")

    @app.post("/logout")
    def logout() -> Response:
        session.clear()
        return redirect(url_for("login") if settings.has_credentials else url_for("overview"))

    # ------------------------------------------------------------------ data

    def overview_data() -> dict:
        data = views.overview(dash.read_db(), show_names=show_names)
        stats = dash.queue_stats()
        data["broker_up"] = stats is not None
        data["queues"] = [_queue_dict(q) for q in stats or []]
        data["dead_letters"] = sum(q.dead for q in stats or [])
        data["stale_after_seconds"] = _stale_after()
        return data

    def _stale_after() -> float:
        loaded = dash.loaded
        beat = loaded.config.supervision.heartbeat_seconds if loaded is not None else 2.0
        return max(3 * beat, 10.0)

    def _queue_dict(q: Any) -> dict:
        return {"queue": q.queue, "depth": q.depth, "ready": q.ready, "delayed": q.delayed, "leased": q.leased,
                "dead": q.dead}

    def cases_data() -> dict:
        args = request.args
        q = (args.get("q") or "").strip()
        if len(q) > MAX_QUERY_LENGTH:
            raise BadParam(f"q is limited to {MAX_QUERY_LENGTH} characters")
        state = (args.get("state") or "").strip()
        if state and not _STATE.match(state):
            raise BadParam(f"state must be a case state such as done or failed, got {state[:40]!r}")
        attention = _bool_arg(args, "attention")
        page_no = _int_arg(args, "page", 1, 1, 1_000_000)
        per_page = _int_arg(args, "per_page", settings.page_size, 1, 500)
        conn = dash.read_db()
        data = views.case_page(conn, q=q, state=state or None, attention=attention, page=page_no,
                                 per_page=per_page, show_names=show_names)
        data["filters"] = {"q": q, "state": state, "attention": attention}
        data["states"] = views.case_states(conn, dash.workflow_states())
        return data

    def case_row(ident: str) -> sqlite3.Row:
        row = views.find_case_row(dash.read_db(), _ident(ident), show_names=show_names)
        if row is None:
            abort(404, description=f"no case {ident!r} (cases are named case-000042)")
        return row

    def case_data(ident: str) -> dict:
        return views.case_detail(dash.read_db(), case_row(ident), show_names=show_names)

    def gpus_data() -> dict:
        now = time.time()
        since = now - settings.gpu_history_hours * 3600
        conn = dash.read_db()
        return {"gpus": views.gpus(conn), "history": views.gpu_history(conn, since=since),
                "history_since": since, "now": now,
                "queued_beams": conn.execute("SELECT COUNT(*) FROM steps WHERE state = 'queued'").fetchone()[0]}

    def workers_data() -> dict:
        stats = dash.queue_stats()
        return {"workers": views.workers(dash.read_db()), "broker_up": stats is not None,
                "queues": [_queue_dict(q) for q in stats or []], "stale_after_seconds": _stale_after()}

    def dlq_data() -> dict:
        try:
            letters = dash.dead_letters()
        except Unavailable:
            raise
        except Exception as exc:
            raise Unavailable(f"the broker cannot be read: {exc}") from exc
        reasons = [d.reason for d in letters]
        if not show_names:  # exception texts often carry a case folder's path
            reasons = views.redact_known_names(dash.read_db(), reasons)
        out = []
        for d, reason in zip(letters, reasons):
            body = d.body if isinstance(d.body, dict) else {}
            case = body.get("case") if isinstance(body.get("case"), str) else None
            item = {"id": d.id, "queue": d.queue, "message_id": d.message_id, "type": body.get("type"),
                    "case": case, "beam": body.get("beam"), "step": body.get("step"), "attempt": body.get("attempt"),
                    "attempts": d.attempts, "dead_at": d.dead_at, "reason": reason}
            if show_names:
                item["body"] = body
            out.append(item)
        return {"dead_letters": out}

    def events_data() -> dict:
        before = _int_arg(request.args, "before", None, 1, 2**62)
        limit = _int_arg(request.args, "limit", 100, 1, 1000)
        people = _bool_arg(request.args, "people")
        items = views.events(dash.read_db(), limit=limit, before=before, people_only=people, show_names=show_names)
        return {"events": items, "people_only": people, "limit": limit,
                "next_before": items[-1]["id"] if len(items) == limit else None}

    # ------------------------------------------------------------------ pages

    @app.get("/")
    def overview() -> Response:
        return page("overview.html", title="Overview", d=overview_data())

    @app.get("/cases")
    def cases() -> Response:
        return page("cases.html", title="Cases", d=cases_data())

    @app.get("/cases/<ident>")
    def case(ident: str) -> Response:
        d = case_data(ident)
        return page("case.html", title=d["id"], d=d)

    @app.get("/gpus")
    def gpus() -> Response:
        return page("gpus.html", title="GPUs", d=gpus_data())

    @app.get("/workers")
    def workers() -> Response:
        return page("workers.html", title="Workers", d=workers_data())

    @app.get("/dlq")
    def dlq() -> Response:
        return page("dlq.html", title="Dead letters", d=dlq_data())

    @app.get("/audit")
    def audit() -> Response:
        return page("audit.html", title="Audit log", d=events_data())

    # ------------------------------------------------------------------ JSON API

    @app.get("/api/overview")
    def api_overview() -> Response:
        return jsonify(overview_data())

    @app.get("/api/cases")
    def api_cases() -> Response:
        return jsonify(cases_data())

    @app.get("/api/cases/<ident>")
    def api_case(ident: str) -> Response:
        return jsonify(case_data(ident))

    @app.get("/api/gpus")
    def api_gpus() -> Response:
        return jsonify(gpus_data())

    @app.get("/api/workers")
    def api_workers() -> Response:
        return jsonify(workers_data())

    @app.get("/api/queues")
    def api_queues() -> Response:
        stats = dash.queue_stats()
        if stats is None:
            raise Unavailable("the broker cannot be read")
        return jsonify({"queues": [_queue_dict(q) for q in stats]})

    @app.get("/api/dlq")
    def api_dlq() -> Response:
        return jsonify(dlq_data())

    @app.get("/api/events")
    def api_events() -> Response:
        return jsonify(events_data())

    @app.get("/api/session")
    def api_session() -> Response:
        """Who the caller is and the CSRF token a script must send with POSTs."""
        return jsonify({"user": g.user, "actor": actor(), "csrf_token": csrf_token() if g.via != "token" else None})

    @app.get("/metrics")
    def prometheus() -> Response:
        at, text = dash.metrics_cache
        if not text or time.monotonic() - at >= METRICS_TTL:
            text = metrics.render(dash.read_db(), dash.queue_stats(),
                                  known_case_states=views.BASE_CASE_STATES + tuple(dash.workflow_states()))
            dash.metrics_cache = (time.monotonic(), text)
        return Response(text, mimetype=None, content_type=metrics.CONTENT_TYPE)

    # ------------------------------------------------------------------ actions

    def _done(message: str, status: int = 200, *, back: str, **data: Any) -> Response:
        if _api():
            payload = {"ok": status < 400, "message": message, **data}
            if status >= 400:
                payload["error"] = message
            response = jsonify(payload)
            response.status_code = status
            return response
        flash(message, "error" if status >= 400 else "ok")
        return redirect(_safe_next(request.form.get("next"), back), code=303)

    def _steer(ident: str, what: str, call: Callable[[Host, str], str]) -> Response:
        row = case_row(ident)
        uid = row["uid"]
        back = url_for("case", ident=uid)
        with dash.host(actor()) as host:
            try:
                state = call(host, uid)
            except (ActionRefused, CaseNotFound) as exc:
                return _done(views.redact(str(exc), None if show_names else row["name"]), 409, back=back, case=uid)
        log.info("dashboard: %s %s by %s -> %s", what, uid, actor(), state)
        return _done(f"{uid}: {what} requested, now {state}", back=back, case=uid, state=state)

    @app.post("/cases/<ident>/retry")
    @app.post("/api/cases/<ident>/retry", endpoint="api_retry")
    def retry(ident: str) -> Response:
        beam = _int_arg(_action_params(), "beam", None, 1, 10_000)
        what = f"retry of beam {beam}" if beam else "retry"
        return _steer(ident, what, lambda host, uid: host.retry(uid, beam=beam))

    @app.post("/cases/<ident>/cancel")
    @app.post("/api/cases/<ident>/cancel", endpoint="api_cancel")
    def cancel(ident: str) -> Response:
        return _steer(ident, "cancel", lambda host, uid: host.cancel(uid))

    def _dlq_action(action: str) -> Response:
        source = _action_params()
        every = _bool_arg(source, "all") if not isinstance(source.get("all"), bool) else source["all"]
        raw = source.getlist("id") if hasattr(source, "getlist") else source.get("ids", [])
        if not isinstance(raw, list) or any(not re.fullmatch(r"\d{1,18}", str(i)) for i in raw):
            raise BadParam("id must be dead-letter ids (numbers)")
        ids = [str(i) for i in raw]
        if not every and not ids:
            raise BadParam(f"name the dead letters to {action} (id=...) or send all=1")
        who = actor()
        with dash.host(who) as host:
            target_ids = (host.replay_dead_letters if action == "replay" else host.purge_dead_letters)(
                None if every else ids)
        dash.forget_queue_stats()
        if not target_ids:
            return _done(f"no such dead letter(s): nothing to {action}", 404, back=url_for("dlq"))
        count = len(target_ids)
        log.info("dashboard: %s %d dead letter(s) %s by %s", action, count, target_ids, who)
        verb = "replayed" if action == "replay" else "purged"
        return _done(f"{verb} {count} dead letter(s)", back=url_for("dlq"), count=count, ids=target_ids)

    @app.post("/dlq/replay")
    @app.post("/api/dlq/replay", endpoint="api_dlq_replay")
    def dlq_replay() -> Response:
        return _dlq_action("replay")

    @app.post("/dlq/purge")
    @app.post("/api/dlq/purge", endpoint="api_dlq_purge")
    def dlq_purge() -> Response:
        return _dlq_action("purge")

    # ------------------------------------------------------------------ pages from other plugins

    _register_extra_pages(app, dash, page)
    return app


def _register_extra_pages(app: Flask, dash: Dashboard, page: Callable[..., Response]) -> None:
    """Pages other plugins add through ``mqi_register_dashboard_pages``: ``register(path, title,
    view)``; ``view`` returns the HTML shown inside the dashboard's frame (refreshed live). A
    view that takes one argument gets a :class:`mqi_framework.api.Host` for the request (read
    models, status, actions in the name of the person logged in)."""
    host = dash.plugin_host if dash.plugin_host is not None else dash.host().plugin_host
    taken = {rule.rule for rule in app.url_map.iter_rules()}

    def register(path: str, title: str, view: Callable[..., str]) -> None:
        if not isinstance(path, str) or not re.fullmatch(r"/[a-z0-9][a-z0-9/_-]{0,63}", path) \
                or path.startswith(("/api/", "/static")) or path in taken or not callable(view):
            log.warning("dashboard: extra page %r refused (a path like /site/report that no page uses, "
                        "a title and a callable are needed)", path)
            return
        endpoint = f"extra_{len(dash.extra_pages)}"
        wants_host = _takes_an_argument(view)

        def show() -> Response:
            if not wants_host:
                return page("extra.html", title=str(title), content=Markup(view()))
            with dash.host(_request_actor()) as api_host:
                return page("extra.html", title=str(title), content=Markup(view(api_host)))

        app.add_url_rule(path, endpoint, show, methods=["GET"])
        taken.add(path)
        dash.extra_pages.append((path, str(title), endpoint))

    host.call_each("mqi_register_dashboard_pages", register=register)  # one plugin's failure spares the others


def _takes_an_argument(view: Callable[..., str]) -> bool:
    import inspect

    try:
        params = [p for p in inspect.signature(view).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty]
    except (TypeError, ValueError):
        return False
    return len(params) == 1
