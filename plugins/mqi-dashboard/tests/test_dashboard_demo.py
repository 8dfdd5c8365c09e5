"""``mqi-host demo --dashboard --port N``: the demo serves the dashboard, shows the run, and
keeps it up after the demo until Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

pytestmark = pytest.mark.integration

pytest.importorskip("mqi_moqui.demo")


def test_demo_with_dashboard(tmp_path, free_port):
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mqi_framework.cli", "demo", "--dashboard", "--port", str(port),
         "--workdir", str(tmp_path / "tour"), "--seconds", "0.3", "--timeout", "60"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=dict(os.environ))
    lines = []
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "press Ctrl-C" in line:
                break
        output = "".join(lines)
        assert f"dashboard: http://127.0.0.1:{port}/" in output, output
        assert "press Ctrl-C" in output, output
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/overview", timeout=10) as response:
            overview = json.load(response)
        assert overview["cases_by_state"] == {"done": 3}
        assert {w["name"] for w in overview["workers"] if w["state"] == "running"} >= {"conductor", "dashboard"}
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/cases", timeout=10) as response:
            assert b"case-000003" in response.read()
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, output + rest
    assert "demo passed: 3 case(s)" in rest


def test_demo_refuses_a_busy_port(tmp_path):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = subprocess.run([sys.executable, "-m", "mqi_framework.cli", "demo", "--dashboard", "--port", str(port),
                               "--workdir", str(tmp_path / "tour")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and f"port {port} on 127.0.0.1 is not free" in proc.stderr
