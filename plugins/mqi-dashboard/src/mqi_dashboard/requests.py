"""What every request handler shares: the dashboard object of the running app, parameter
parsing with errors for people, who is asking, and which kind of answer they want."""

from __future__ import annotations

import re
from typing import Any, Optional
from urllib.parse import urlsplit

from flask import current_app, g, request, session

from mqi_dashboard import auth

PARTIAL_HEADER = "X-MQI-Partial"
_IDENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class BadParam(Exception):
    """A query or form parameter of the wrong shape (answered with 400)."""


class Unavailable(Exception):
    """The state database or the config cannot be used right now (answered with 503)."""


def dashboard() -> Any:
    """The :class:`~mqi_dashboard.app.Dashboard` of the application serving this request."""
    return current_app.extensions["mqi_dashboard"]


def int_arg(source: Any, name: str, default: Optional[int], lo: int, hi: int) -> Optional[int]:
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


def bool_arg(source: Any, name: str) -> bool:
    raw = str(source.get(name) or "").strip().lower()
    if raw in ("", "0", "false", "no", "off"):
        return False
    if raw in ("1", "true", "yes", "on"):
        return True
    raise BadParam(f"{name} must be 1 or 0, got {raw[:40]!r}")


def case_ident(ident: str) -> str:
    if not _IDENT.match(ident):
        raise BadParam("a case is named case-000042 (or 42)")
    return ident


def action_params() -> Any:
    """The parameters of an action: a JSON object, or the form fields."""
    if not request.is_json:
        return request.form
    data = request.get_json(silent=True)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise BadParam("send a JSON object (or form fields)")
    return data


def safe_next(target: Optional[str], default: str) -> str:
    """A redirect target on this site only (no scheme, no host, no //)."""
    if not target:
        return default
    parts = urlsplit(target)
    if parts.scheme or parts.netloc or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return default
    return target


def request_actor() -> str:
    """Who the audit log names for this request's actions."""
    if g.via == "token":
        return auth.TOKEN_ACTOR
    if g.via == "local":
        return auth.LOCAL_ACTOR
    return f"dashboard:{g.user}"


def csrf_token() -> str:
    """The session's CSRF token (made on first use); forms and scripts send it with POSTs."""
    token = session.get("csrf")
    if not token:
        token = session["csrf"] = auth.new_csrf_token()
    return token


def wants_json() -> bool:
    """A request of the JSON API or /metrics (errors are answered in JSON, auth with 401)."""
    return request.path.startswith("/api/") or request.path == "/metrics"
