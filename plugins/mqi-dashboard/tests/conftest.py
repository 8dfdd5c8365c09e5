"""Fixtures: a workspace whose state database holds synthetic cases, the dashboard app on it,
and helpers for the browser tests (headless Chromium)."""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path
from typing import Any, Callable, Optional

import pytest

from mqi_framework.config import load_config
from mqi_framework.store import open_state
from mqi_framework.workspace import fast_config, write_workspace

from mqi_dashboard.app import create_app
from mqi_dashboard.sample_state import fill_state
from mqi_dashboard.settings import DashboardSettings

REPO_ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture
def state_ws(tmp_path: Path) -> Any:
    """A workspace (config, state database with 30 synthetic cases, empty broker)."""
    config_path = write_workspace(tmp_path / "ws", fast_config())
    loaded = load_config(config_path)
    conn = open_state(loaded.database_path)
    facts = fill_state(conn, cases=30, beams_per_case=4)
    conn.close()

    class StateWorkspace:
        pass

    ws = StateWorkspace()
    ws.loaded = loaded
    ws.facts = facts
    ws.db = loaded.database_path
    return ws


@pytest.fixture
def make_app(state_ws: Any, mqi_pm: Any) -> Callable[..., Any]:
    """Build the app on ``state_ws`` with the given settings (keyword arguments of DashboardSettings)."""
    apps = []

    def make(plugin_host: Optional[Any] = None, **settings: Any) -> Any:
        app = create_app(DashboardSettings(**settings), loaded=state_ws.loaded, plugin_host=plugin_host or mqi_pm)
        app.config["TESTING"] = True
        apps.append(app)
        return app

    yield make
    for app in apps:
        app.extensions["mqi_dashboard"].close()


@pytest.fixture
def client(make_app: Callable[..., Any]) -> Any:
    return make_app().test_client()


@pytest.fixture
def csrf_of() -> Callable[[Any], str]:
    """``csrf_of(client)``: the CSRF token of the client's session (as the pages embed it)."""

    def get(client: Any) -> str:
        return client.get("/api/session").get_json()["csrf_token"]

    return get


@pytest.fixture
def free_port() -> Callable[[], int]:
    def pick() -> int:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            return sock.getsockname()[1]

    return pick


@pytest.fixture
def chromium() -> str:
    """The headless browser; a missing Chromium fails the test on CI (CI=true) and skips it elsewhere."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    message = "Chromium is not installed (Debian: apt-get install chromium; scripts/test installs it)"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message + " - required on CI")
    pytest.skip(message)


@pytest.fixture
def artifacts() -> Path:
    """Where screenshots go: $MQI_TEST_ARTIFACTS/dashboard or <repo>/test-artifacts/dashboard (gitignored)."""
    folder = Path(os.environ.get("MQI_TEST_ARTIFACTS") or REPO_ROOT / "test-artifacts") / "dashboard"
    folder.mkdir(parents=True, exist_ok=True)
    return folder
