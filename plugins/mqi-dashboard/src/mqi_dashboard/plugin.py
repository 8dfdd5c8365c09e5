"""Entry point of mqi-dashboard (group ``mqi_framework.plugins``, name ``dashboard``):
registers the ``dashboard`` service. Kept light: Flask and waitress load when it serves."""

from __future__ import annotations

from typing import Callable

from mqi_framework import hookimpl


@hookimpl
def mqi_register_services(register: Callable[[type], None]) -> None:
    from mqi_dashboard.service import DashboardService

    register(DashboardService)
