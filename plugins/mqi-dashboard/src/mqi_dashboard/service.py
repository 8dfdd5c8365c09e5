"""The ``dashboard`` service: the Flask application served by waitress until ``stop`` is set."""

from __future__ import annotations

import logging
import threading
from typing import Any, Optional

from mqi_framework.protocols import PluginContext, Service

from mqi_dashboard.settings import DashboardSettings, bind_problem

log = logging.getLogger(__name__)

#: how long one turn of the server loop waits for socket activity before looking at ``stop``
LOOP_SECONDS = 0.5


class DashboardRefused(RuntimeError):
    """The dashboard must not start with these settings (the message says why and what to do)."""


class DashboardService(Service):
    """Web dashboard: pages, JSON API, /metrics and /healthz over the host's state."""

    name = "dashboard"
    settings_class = DashboardSettings

    def __init__(self, settings: Optional[DashboardSettings], context: PluginContext) -> None:
        super().__init__(settings or DashboardSettings(), context)
        #: (host, port) pairs the server listens on, once it serves (port 0 picks a free port)
        self.listening: list[tuple[str, int]] = []
        self.ready = threading.Event()

    @property
    def config_key(self) -> str:
        return f"workers.{self.context.worker or 'dashboard'}.settings"

    def check(self) -> list[str]:
        from mqi_dashboard.auth import hash_problem

        problems = []
        refused = bind_problem(self.settings, self.config_key)
        if refused:
            problems.append(refused)
        for user, hashed in self.settings.accounts().items():
            problem = hash_problem(hashed)
            if problem:
                problems.append(f"{self.config_key}: password hash of user {user!r} {problem}")
        if self.context.state_db is None:
            problems.append("no state database in the plugin context (run the dashboard as a worker of mqi-host)")
        for module in ("flask", "waitress"):
            try:
                __import__(module)
            except ImportError as exc:
                problems.append(f"{module} is not installed ({exc}): pip install mqi-dashboard again")
        return problems

    def make_app(self) -> Any:
        from mqi_dashboard.app import create_app

        return create_app(self.settings, self.context)

    def serve(self, stop: threading.Event) -> None:
        refused = bind_problem(self.settings, self.config_key)
        if refused:
            raise DashboardRefused("the dashboard refuses to start: " + refused)
        from waitress import create_server, wasyncore

        from mqi_dashboard.connections import guarded_channel_class

        app = self.make_app()
        socket_map: dict = {}
        s = self.settings
        server = create_server(app, map=socket_map, host=s.host, port=s.port, threads=s.threads,
                               ident="mqi-dashboard", expose_tracebacks=False, clear_untrusted_proxy_headers=True,
                               # waitress rejects with 413 on `>=` and would spool above inbuf_overflow
                               max_request_body_size=s.max_body_bytes + 1, inbuf_overflow=s.max_body_bytes + 1,
                               max_request_header_size=64 * 1024, channel_timeout=s.idle_timeout_seconds,
                               # our policy keeps below max_connections; waitress's own stop only as a backstop
                               connection_limit=s.max_connections + 16)
        server.channel_class = guarded_channel_class(s.connections_per_client, s.max_connections)
        self.listening = list(getattr(server, "effective_listen", None)
                              or [(server.effective_host, server.effective_port)])
        for host, port in self.listening:
            shown = f"[{host}]" if ":" in str(host) else host
            log.info("dashboard serving on http://%s:%s/ (waitress, %d threads)", shown, port, self.settings.threads)
        self.ready.set()
        try:
            while not stop.is_set():
                wasyncore.loop(timeout=LOOP_SECONDS, map=socket_map, use_poll=True, count=1)
        finally:
            for dispatcher in list(socket_map.values()):  # listening sockets, trigger, open connections
                try:
                    dispatcher.close()
                except OSError:
                    pass
            server.task_dispatcher.shutdown(timeout=5)
            log.info("dashboard stopped")
