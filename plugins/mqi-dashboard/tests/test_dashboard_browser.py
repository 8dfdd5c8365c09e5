"""A real run seen through a real browser: ``mqi-host run`` with the dashboard worker enabled
processes a generated case; headless Chromium then loads the overview and the case page
from waitress, the rendered DOM must show the run's data, and screenshots are kept under
``test-artifacts/dashboard/`` (gitignored)."""

from __future__ import annotations

import json
import re
import subprocess
import urllib.request
from pathlib import Path

import pytest

from mqi_framework.testing import HostProcess, Workspace, wait_final
from mqi_framework.workspace import fast_config, wait_until

pytestmark = pytest.mark.integration

samples = pytest.importorskip("mqi_moqui.samples")


def browse(chromium: str, profile: Path, url: str, *args: str) -> str:
    """Run headless Chromium on ``url`` with ``args``; return its standard output (the DOM for --dump-dom)."""
    command = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--disable-dev-shm-usage", "--hide-scrollbars", f"--user-data-dir={profile}", *args, url]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=90)
    assert proc.returncode == 0, f"chromium exited {proc.returncode}: {proc.stderr[-2000:]}"
    return proc.stdout


def healthy(base: str) -> bool:
    try:
        with urllib.request.urlopen(base + "/healthz", timeout=2) as response:
            return json.load(response)["status"] == "ok"
    except OSError:
        return False


def test_overview_and_case_page_of_a_real_run_in_chromium(tmp_path, chromium, artifacts, free_port):
    port = free_port()
    ws = Workspace(tmp_path / "ws", fast_config(overrides={"workers": {"dashboard": {
        "plugin": "dashboard", "kind": "service", "settings": {"port": port, "refresh_seconds": 1}}}}))
    samples.generate_case(ws.inbox, "PAT-BROWSER-7", seed=11)
    host = HostProcess(ws, {"MQI_STANDIN_SECONDS": "0.5"}).start()
    base = f"http://127.0.0.1:{port}"
    try:
        case = wait_final(ws, 1)["PAT-BROWSER-7"]
        assert case["state"] == "done", case
        uid = case["id"]
        assert wait_until(lambda: healthy(base), 30, 0.3), ws.logs()

        overview = browse(chromium, tmp_path / "profile", base + "/", "--dump-dom", "--virtual-time-budget=4000")
        assert "<h1>Overview</h1>" in overview
        assert re.search(r'href="/cases\?state=done"><span class="pill st-done">done</span></a></td><td class="num">1<',
                         overview), overview[:3000]
        assert "dashboard" in overview and "conductor" in overview  # the workers table, with the dashboard itself
        assert "live: updated" in overview  # the page's own script refreshed it (CSP let the inline script run)
        browse(chromium, tmp_path / "profile", base + "/", f"--screenshot={artifacts / 'overview.png'}",
               "--window-size=1400,1400")

        page = browse(chromium, tmp_path / "profile", f"{base}/cases/{uid}", "--dump-dom")
        assert f"<h1>{uid} " in page and 'class="pill st-done">done</span>' in page
        assert page.count('<svg class="gantt"') == 1 and page.count("<rect") > 10
        for beam in (1, 2, 3):
            assert f"simulate beam {beam} attempt 1" in page  # a timeline bar per beam, with its tooltip
        for step in ("prepare", "upload", "simulate", "download", "postprocess"):
            assert f"<td>{step}</td>" in page
        assert "Time taken by MC engine" in page  # a log tail of the stand-in simulator
        assert "case.state" in page and "conductor" in page  # the case's audit log
        assert "PAT-BROWSER-7" not in page and "PAT-BROWSER-7" not in overview  # no folder names by default
        browse(chromium, tmp_path / "profile", f"{base}/cases/{uid}", f"--screenshot={artifacts / 'case.png'}",
               "--window-size=1400,2200")
        for shot in ("overview.png", "case.png"):
            assert (artifacts / shot).stat().st_size > 10_000
    finally:
        host.stop()
        ws.kill_jobs()
    workers = {r["name"]: r["state"] for r in ws.query("SELECT name, state FROM workers")}
    assert workers["dashboard"] == "stopped"
    assert not healthy(base)


def test_incomplete_failed_and_running_cases_read_right_in_chromium(tmp_path, chromium, artifacts, free_port):
    """Issue 19: screenshots of a case waiting for a delivery, a case with one failed beam and a
    running case with per-beam progress, each page checked for the words a physicist reads."""
    port = free_port()
    config = fast_config(gpus=4, overrides={"workers": {"dashboard": {
        "plugin": "dashboard", "kind": "service", "settings": {"port": port, "refresh_seconds": 1}}}})
    config["workflow"]["steps"][2]["retry"]["max_attempts"] = 1
    ws = Workspace(tmp_path / "ws", config)
    samples.generate_case(ws.inbox, "WAITS", seed=21, missing_beams=[2])
    failing = samples.generate_case(ws.inbox, "ONE-FAILS", seed=22)
    (samples.delivery_dir_of(failing, 2) / "STANDIN_MODE").write_text("fail")
    running = samples.generate_case(ws.inbox, "RUNS", seed=23, treatment_beams=1)
    (samples.delivery_dir_of(running, 1) / "STANDIN_MODE").write_text("hang")
    host = HostProcess(ws, {"MQI_STANDIN_SECONDS": "0.5"}).start()
    base = f"http://127.0.0.1:{port}"

    def by_name() -> dict:
        return {c["name"]: c for c in json.loads(ws.cli("cases", "--json", "--names").stdout or "[]")}

    def ready() -> bool:
        cases = by_name()
        progress = ws.query("SELECT s.progress FROM steps s JOIN cases c ON c.id = s.case_id WHERE c.name = 'RUNS' "
                            "AND s.name = 'simulate'")
        return (cases.get("WAITS", {}).get("state") == "incomplete" and cases.get("ONE-FAILS", {}).get("state")
                == "failed" and bool(progress) and (progress[0]["progress"] or 0) > 0)

    try:
        assert wait_until(ready, 90, 0.5), ws.logs()
        assert wait_until(lambda: healthy(base), 30, 0.3), ws.logs()
        cases = by_name()
        pages = {"incomplete": cases["WAITS"]["id"], "failed-beam": cases["ONE-FAILS"]["id"],
                 "running": cases["RUNS"]["id"]}
        overview = browse(chromium, tmp_path / "profile", base + "/", "--dump-dom", "--virtual-time-budget=3000")
        assert "Waiting for deliveries" in overview and "waiting for delivery of beam(s) 2" in overview
        listing = browse(chromium, tmp_path / "profile", base + "/cases", "--dump-dom")
        assert "waiting for a GPU, a retry or a delivery" in listing and "0/3 done" in listing  # legend, progress
        waits = browse(chromium, tmp_path / "profile", f"{base}/cases/{pages['incomplete']}", "--dump-dom")
        assert "waiting for delivery of beam(s) 2" in waits and "pill st-failed" not in waits  # waiting is not failing
        failed = browse(chromium, tmp_path / "profile", f"{base}/cases/{pages['failed-beam']}", "--dump-dom")
        assert "step simulate failed for beam 2" in failed
        assert "stopped after simulate (done)" in failed or "not run: step simulate failed" in failed
        live = browse(chromium, tmp_path / "profile", f"{base}/cases/{pages['running']}", "--dump-dom")
        assert "<progress" in live and "simulate: running" in live, live[live.find("<h1>"):][:3000]
        browse(chromium, tmp_path / "profile", base + "/cases", f"--screenshot={artifacts / 'cases.png'}",
               "--window-size=1400,1000")
        for name, uid in pages.items():
            browse(chromium, tmp_path / "profile", f"{base}/cases/{uid}",
                   f"--screenshot={artifacts / f'case-{name}.png'}", "--window-size=1400,2000")
            assert (artifacts / f"case-{name}.png").stat().st_size > 10_000
    finally:
        host.stop()
        ws.kill_jobs()
