"""The dashboard as a service: settings from the host's config, the bind rule, and waitress
serving and stopping."""

from __future__ import annotations

import json
import sys
import threading
import urllib.error
import urllib.request

import pytest

from mqi_framework import plugins
from mqi_framework.config import load_config
from mqi_framework.configload import ConfigError
from mqi_framework.protocols import PluginContext
from mqi_framework.testing import Workspace
from mqi_framework.worker import build_worker_plugin, plugin_context
from mqi_framework.workspace import fast_config

from mqi_dashboard.service import DashboardRefused, DashboardService
from mqi_dashboard.settings import DashboardSettings, bind_problem, is_loopback


def dashboard_config(settings: dict) -> dict:
    return fast_config(overrides={"workers": {"dashboard": {"plugin": "dashboard", "settings": settings}}})


def test_the_plugin_is_registered_as_a_service():
    host = plugins.PluginHost()
    assert host.lookup("service", "dashboard") is DashboardService
    record = next(p for p in host.get_plugins() if p["name"] == "dashboard")
    assert record["distribution"] == "mqi-dashboard" and record["provides"] == ["service dashboard"]


@pytest.mark.parametrize("host, loopback", [("127.0.0.1", True), ("::1", True), ("[::1]", True),
                                            ("localhost", True), ("127.0.0.2", True), ("0.0.0.0", False),
                                            ("::", False), ("10.1.2.3", False), ("mqi.clinic.example", False)])
def test_loopback_addresses(host, loopback):
    assert is_loopback(host) is loopback


def test_non_local_bind_without_credentials_is_refused(tmp_path):
    settings = DashboardSettings(host="0.0.0.0")
    problem = bind_problem(settings, "workers.dashboard.settings")
    assert "0.0.0.0" in problem and "token" in problem and "password_hash" in problem
    service = DashboardService(settings, PluginContext(workspace=tmp_path, worker="dashboard",
                                                       state_db=tmp_path / "state.db"))
    assert any("exposes the dashboard" in p for p in service.check())
    with pytest.raises(DashboardRefused, match="refuses to start.*workers.dashboard.settings.host"):
        service.serve(threading.Event())
    assert bind_problem(DashboardSettings(host="0.0.0.0", token="t"), "x") is None
    assert bind_problem(DashboardSettings(host="0.0.0.0", password_hash="scrypt:1$a$b"), "x") is None


def test_check_reports_a_bad_password_hash(tmp_path):
    service = DashboardService(DashboardSettings(password_hash="plain-text"),
                               PluginContext(workspace=tmp_path, state_db=tmp_path / "s.db"))
    assert any("not a password hash" in p for p in service.check())


def test_mqi_host_check_reports_the_refused_bind(tmp_path):
    ws = Workspace(tmp_path / "ws", dashboard_config({"host": "0.0.0.0", "port": 8089}))
    proc = ws.cli("check")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "workers.dashboard (dashboard): workers.dashboard.settings.host is '0.0.0.0'" in proc.stdout


def test_settings_come_from_the_worker_section_with_env_expansion(tmp_path, monkeypatch):
    monkeypatch.setenv("MQI_TEST_DASHBOARD_TOKEN", "from-the-environment")
    ws = Workspace(tmp_path / "ws", dashboard_config(
        {"host": "0.0.0.0", "port": 8090, "token": "${MQI_TEST_DASHBOARD_TOKEN}", "show_patient_names": True}))
    loaded = load_config(ws.config_path)
    assert loaded.worker_kind("dashboard") == "service"
    service = build_worker_plugin(loaded, "dashboard")
    assert isinstance(service, DashboardService)
    assert service.settings.token == "from-the-environment" and service.settings.port == 8090
    assert service.settings.show_patient_names is True
    assert service.check() == []
    assert service.context.state_db == loaded.database_path and service.context.broker_url == loaded.broker_url


@pytest.mark.parametrize("settings, path", [({"port": "80"}, "port"), ({"port": 70000}, "port"),
                                            ({"refresh_seconds": -1}, "refresh_seconds"), ({"colour": "red"}, "colour"),
                                            ({"token": ""}, "token"), ({"page_size": 0}, "page_size")])
def test_bad_settings_name_their_path(tmp_path, settings, path):
    ws = Workspace(tmp_path / "ws", dashboard_config(settings))
    loaded = load_config(ws.config_path)
    with pytest.raises(ConfigError) as caught:
        build_worker_plugin(loaded, "dashboard")
    message = str(caught.value)
    # cattrs reports a type error at its key's path; a validator's message names its key itself
    assert f"workers.dashboard.settings.{path}" in message or (
        "workers.dashboard.settings" in message and f"{path} must" in message or f"{path} is empty" in message), message


def test_waitress_serves_until_stop_is_set(tmp_path):
    from mqi_framework.store import open_state

    from mqi_dashboard.sample_state import fill_state

    ws = Workspace(tmp_path / "ws", dashboard_config({"port": 0}))
    loaded = load_config(ws.config_path)
    fill_state(open_state(loaded.database_path), cases=3)
    service = DashboardService(DashboardSettings(port=0, threads=2), plugin_context(loaded, "dashboard"))
    stop = threading.Event()
    thread = threading.Thread(target=service.serve, args=(stop,), daemon=True)
    thread.start()
    try:
        assert service.ready.wait(10)
        host, port = service.listening[0]
        base = f"http://127.0.0.1:{port}"
        with urllib.request.urlopen(base + "/healthz", timeout=5) as response:
            assert json.load(response)["status"] == "ok"
            assert response.headers["Server"] == "mqi-dashboard"
        with urllib.request.urlopen(base + "/api/cases", timeout=5) as response:
            assert json.load(response)["total"] == 3
            assert response.headers["X-Frame-Options"] == "DENY"
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(urllib.request.Request(base + "/cases/case-000001/cancel", method="POST"), timeout=5)
        assert caught.value.code == 403  # no CSRF token
        keep_alive = urllib.request.urlopen(base + "/healthz", timeout=5)  # an open connection must not block stop
    finally:
        stop.set()
        thread.join(5)
    assert not thread.is_alive()
    keep_alive.close()
    with pytest.raises(OSError):
        urllib.request.urlopen(base + "/healthz", timeout=2)


@pytest.fixture
def serving(tmp_path):
    """A real waitress dashboard on a free port; yields its base URL and the service."""
    from mqi_framework.store import open_state

    from mqi_dashboard.sample_state import fill_state

    services = []

    def start(**settings):
        ws = Workspace(tmp_path / f"ws{len(services)}", dashboard_config({"port": 0}))
        loaded = load_config(ws.config_path)
        fill_state(open_state(loaded.database_path), cases=2)
        service = DashboardService(DashboardSettings(port=0, threads=2, **settings), plugin_context(loaded, "dashboard"))
        stop = threading.Event()
        thread = threading.Thread(target=service.serve, args=(stop,), daemon=True)
        thread.start()
        assert service.ready.wait(10)
        services.append((stop, thread))
        return f"http://127.0.0.1:{service.listening[0][1]}", service.listening[0][1]

    yield start
    for stop, thread in services:
        stop.set()
        thread.join(5)


def raw_request(port: int, data: bytes, timeout: float = 5) -> bytes:
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        chunks = []
        while True:
            try:
                chunk = sock.recv(65536)
            except (ConnectionResetError, TimeoutError):
                break
            if not chunk:
                break
            chunks.append(chunk)
    return b"".join(chunks)


def test_a_huge_body_is_refused_before_authentication_and_never_spooled(serving, tmp_path):
    import socket

    _, port = serving(host="127.0.0.1", token="s3cret-token")
    # announced as 1 GB: refused from the headers alone, with no credentials sent
    head = (b"POST /login HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/x-www-form-urlencoded\r\n"
            b"Content-Length: 1073741824\r\n\r\n")
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(head + b"x" * 65536)
        answer = sock.recv(4096)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    # chunked, no length given: cut off once past the limit
    chunked = (b"POST /api/cases/x/retry HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n"
               + b"".join(b"4000\r\n" + b"y" * 0x4000 + b"\r\n" for _ in range(8)) + b"0\r\n\r\n")
    assert raw_request(port, chunked).startswith(b"HTTP/1.1 413")
    # a body under the limit still reaches the application (here: its auth check)
    small = b"POST /api/cases/x/retry HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}"
    assert raw_request(port, small).startswith(b"HTTP/1.1 401")


def test_idle_connections_from_one_client_do_not_lock_out_healthz(serving):
    import socket

    base, port = serving(connections_per_client=8, max_connections=20)
    hoard = []
    try:
        for _ in range(110):  # more than waitress's own default limit of 100
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # never finished: a slow client
            hoard.append(sock)
        for _ in range(3):
            with urllib.request.urlopen(base + "/healthz", timeout=5) as response:
                assert json.load(response)["status"] == "ok"
        closed = 0
        for sock in hoard:
            sock.settimeout(0.5)
            try:
                closed += sock.recv(1) == b""
            except (TimeoutError, ConnectionResetError):
                closed += isinstance(sys.exc_info()[1], ConnectionResetError)
        assert closed >= 100  # the hoarder lost its oldest sockets, not the server its life
    finally:
        for sock in hoard:
            sock.close()
