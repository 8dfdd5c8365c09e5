"""The Flask application: settings, the shared :class:`Dashboard` object and the parts it is
made of, one module each: :mod:`~mqi_dashboard.security` (guard, headers, login),
:mod:`~mqi_dashboard.rendering` (pages, errors, filters), :mod:`~mqi_dashboard.pages` (HTML),
:mod:`~mqi_dashboard.jsonapi` (``/api/``, ``/metrics``, ``/healthz``),
:mod:`~mqi_dashboard.actions` (retry, cancel, dead letters) and
:mod:`~mqi_dashboard.extra_pages` (pages of other plugins).

Presentation only: reads go to the read models of :mod:`mqi_framework.api` (``views``)
through a read-only connection opened for one request (``PRAGMA query_only``; WAL readers
never block the conductor); actions are the :class:`mqi_framework.api.Host` operations,
which audit and notify them exactly as for the CLI.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import sqlite3
import threading
import time
from typing import Any, Optional

from flask import Flask, g

from mqi_framework.api import Host, StoreError, load_config
from mqi_framework.protocols import PluginContext

from mqi_dashboard import actions, auth, jsonapi, pages, rendering, security
from mqi_dashboard.extra_pages import register_extra_pages
from mqi_dashboard.requests import PARTIAL_HEADER, BadParam, Unavailable
from mqi_dashboard.settings import DashboardSettings

__all__ = ["BadParam", "Dashboard", "PARTIAL_HEADER", "Unavailable", "create_app"]

log = logging.getLogger(__name__)

QUEUE_STATS_TTL = 1.0


#: how long a browser session lasts after logging in
SESSION_HOURS = 12


class Dashboard:
    """What the request handlers share: settings, context, config, the host API, extra pages."""

    def __init__(self, settings: DashboardSettings, context: PluginContext, *, loaded: Any = None,
                 plugin_host: Any = None) -> None:
        self.settings = settings
        self.context = context
        self._loaded = loaded
        self.plugin_host = plugin_host
        self.throttle = auth.LoginThrottle()
        self.sessions = auth.SessionRegistry(SESSION_HOURS * 3600)
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
        PERMANENT_SESSION_LIFETIME=SESSION_HOURS * 3600,
        MAX_CONTENT_LENGTH=settings.max_body_bytes,
        TEMPLATES_AUTO_RELOAD=False,
    )
    app.json.sort_keys = False  # type: ignore[attr-defined]
    dash = Dashboard(settings, context, loaded=loaded, plugin_host=plugin_host)
    app.extensions["mqi_dashboard"] = dash

    rendering.install(app)
    security.install(app)
    for part in (pages, jsonapi, actions):
        app.register_blueprint(part.blueprint)
    register_extra_pages(app, dash)
    return app
