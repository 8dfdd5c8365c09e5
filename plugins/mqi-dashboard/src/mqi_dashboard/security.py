"""Who may use the dashboard: the request guard (loopback Host check, authentication by
token or session, CSRF on every POST from a browser), the security headers, and the login
and logout pages."""

from __future__ import annotations

import logging
import secrets
import time
from typing import Any, Optional

from flask import Blueprint, Flask, Response, g, redirect, request, session, url_for

from mqi_dashboard import auth
from mqi_dashboard.requests import PARTIAL_HEADER, dashboard, safe_next, wants_json
from mqi_dashboard.settings import is_loopback

log = logging.getLogger(__name__)

blueprint = Blueprint("security", __name__)
#: endpoints anyone may reach (still behind the loopback Host check)
OPEN_ENDPOINTS = ("api.healthz", "static")


def install(app: Flask) -> None:
    """The guard before every request, the headers after it, the read connection closed."""
    app.before_request(guard)
    app.after_request(security_headers)
    app.teardown_request(_close_db)
    app.register_blueprint(blueprint)


def guard() -> Optional[Response]:
    from mqi_dashboard.rendering import error

    settings = dashboard().settings
    g.csp_nonce = secrets.token_urlsafe(16)
    if not settings.has_credentials and not _host_is_loopback(request.host):
        # no credentials (so bound to loopback): refuse Host names that point elsewhere (DNS rebinding)
        return error(403, "this dashboard answers only to localhost (it has no credentials configured)")
    if request.endpoint in OPEN_ENDPOINTS:
        return None
    g.user, g.via = _authenticate()
    if request.endpoint == "security.login":
        return None
    if g.user is None:
        if wants_json():
            response = error(401, "authentication required: send Authorization: Bearer <token>")
            response.headers["WWW-Authenticate"] = 'Bearer realm="mqi-dashboard"'
            return response
        return redirect(url_for("security.login", next=request.full_path.rstrip("?")))
    if request.method == "POST" and g.via != "token":
        given = request.headers.get(auth.CSRF_HEADER) or request.form.get(auth.CSRF_FIELD)
        if not auth.same_token(session.get("csrf"), given):
            return error(403, "the form is stale or did not come from this dashboard (CSRF check failed): "
                              "reload the page and try again")
    return None


def _authenticate() -> tuple[Optional[str], str]:
    dash = dashboard()
    settings = dash.settings
    header = request.headers.get("Authorization", "")
    if header.lower().startswith("bearer ") and settings.token:
        if auth.check_token(settings, header[7:].strip()):
            return "token", "token"
        return None, "token"
    if not settings.has_credentials:
        return "local", "local"
    user = session.get("user")
    if user and session.get("credentials") == dash.credentials_version and dash.sessions.alive(session.get("sid")):
        return user, "session"
    return None, "none"


def _host_is_loopback(host_header: str) -> bool:
    host = host_header.strip()
    if host.startswith("["):
        host = host[1:].split("]", 1)[0]
    elif host.count(":") == 1:
        host = host.split(":", 1)[0]
    return is_loopback(host)


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


def _close_db(_: Optional[BaseException]) -> None:
    conn = g.pop("mqi_db", None)
    if conn is not None:
        conn.close()


@blueprint.route("/login", methods=["GET", "POST"])
def login() -> Any:
    from mqi_dashboard.rendering import render_full

    dash = dashboard()
    settings = dash.settings
    target = safe_next(request.values.get("next"), url_for("pages.overview"))
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
                session.update(user=name, via=via, credentials=dash.credentials_version, sid=dash.sessions.start(),
                               csrf=auth.new_csrf_token(), since=time.time())
                log.info("dashboard: %s logged in (%s) from %s", name, via, client)
                return redirect(target)
            if not message:
                dash.throttle.failed(client)
                time.sleep(0.3)
                message, status = "Wrong name, password or token.", 401
    html = render_full("login.html", title="Log in", message=message, next=target,
                       passwords=bool(settings.accounts()), token=bool(settings.token))
    return Response(html, status=status, mimetype="text/html")


@blueprint.post("/logout")
def logout() -> Response:
    dashboard().sessions.end(session.get("sid"))  # a saved copy of the cookie is dead too
    session.clear()
    return redirect(url_for("security.login") if dashboard().settings.has_credentials else url_for("pages.overview"))
