"""Fixtures for the integration tests: a workspace and hosts that are always stopped."""

from __future__ import annotations

from typing import Optional

import pytest

from mqi_framework.testing import HostProcess, Workspace
from mqi_framework.workspace import fast_config

STANDIN_SECONDS = "0.5"


@pytest.fixture
def ws(tmp_path):
    workspace = Workspace(tmp_path / "ws", fast_config())
    yield workspace
    workspace.kill_jobs()


@pytest.fixture
def host_factory(ws):
    hosts: list[HostProcess] = []

    def make(env: Optional[dict] = None, workspace: Optional[Workspace] = None) -> HostProcess:
        host = HostProcess(workspace or ws, {"MQI_STANDIN_SECONDS": STANDIN_SECONDS, **(env or {})}).start()
        hosts.append(host)
        return host

    yield make
    for host in hosts:
        if host.running:
            host.stop()
        host.ws.kill_jobs()
