"""Pages other plugins add through ``mqi_register_dashboard_pages``: ``register(path, title,
view)``; ``view`` returns the HTML shown inside the dashboard's frame (refreshed live). A view
that takes one argument gets a :class:`mqi_framework.api.Host` for the request (read models,
status, actions in the name of the person logged in)."""

from __future__ import annotations

import inspect
import logging
import re
from typing import Any, Callable

from flask import Flask, Response
from markupsafe import Markup

from mqi_dashboard.rendering import page
from mqi_dashboard.requests import dashboard, request_actor

log = logging.getLogger(__name__)

_PATH = re.compile(r"/[a-z0-9][a-z0-9/_-]{0,63}")


def register_extra_pages(app: Flask, dash: Any) -> None:
    """Ask every plugin for its pages (each plugin on its own: one that fails spares the others)."""
    plugin_host = dash.plugin_host if dash.plugin_host is not None else dash.host().plugin_host
    taken = {rule.rule for rule in app.url_map.iter_rules()}

    def register(path: str, title: str, view: Callable[..., str]) -> None:
        if not isinstance(path, str) or not _PATH.fullmatch(path) or path.startswith(("/api/", "/static")) \
                or path in taken or not callable(view):
            log.warning("dashboard: extra page %r refused (a path like /site/report that no page uses, "
                        "a title and a callable are needed)", path)
            return
        endpoint = f"extra_{len(dash.extra_pages)}"
        wants_host = _takes_one_argument(view)

        def show() -> Response:
            if not wants_host:
                return page("extra.html", title=str(title), content=Markup(view()))
            with dashboard().host(request_actor()) as host:
                return page("extra.html", title=str(title), content=Markup(view(host)))

        app.add_url_rule(path, endpoint, show, methods=["GET"])
        taken.add(path)
        dash.extra_pages.append((path, str(title), endpoint))

    plugin_host.call_each("mqi_register_dashboard_pages", register=register)


def _takes_one_argument(view: Callable[..., str]) -> bool:
    try:
        params = [p for p in inspect.signature(view).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty]
    except (TypeError, ValueError):
        return False
    return len(params) == 1
