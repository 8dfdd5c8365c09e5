"""Supervision, timeouts, rejected input, a worker alone and the DLQ through the CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from mqi_framework.broker import open_broker
from mqi_framework.testing import Workspace, wait_final
from mqi_framework.workspace import fast_config, wait_until

pytestmark = pytest.mark.integration
samples = pytest.importorskip("mqi_moqui.samples")
generate_case, delivery_dir_of = samples.generate_case, samples.delivery_dir_of


def worker_row(ws: Workspace, name: str) -> dict:
    rows = ws.query("SELECT * FROM workers WHERE name = ?", name)
    return dict(rows[0]) if rows else {}


def test_hung_worker_is_killed_and_restarted(tmp_path, host_factory):
    workspace = Workspace(tmp_path / "ws", fast_config(overrides={"supervision": {"hung_after_seconds": 3}}))
    host = host_factory(workspace=workspace)
    assert wait_until(lambda: worker_row(workspace, "scan").get("state") == "running", 30)
    pid = worker_row(workspace, "scan")["pid"]
    os.kill(pid, signal.SIGSTOP)  # alive but silent: only the heartbeat shows it
    assert wait_until(lambda: worker_row(workspace, "scan").get("restarts", 0) >= 1, 30), workspace.logs()
    assert wait_until(lambda: worker_row(workspace, "scan").get("pid") not in (None, pid)
                      and worker_row(workspace, "scan").get("state") == "running", 30)
    events = [r[0] for r in workspace.query("SELECT message FROM events WHERE kind = 'worker.restart'")]
    assert any("hung" in e for e in events)
    # the restarted scanner works: a case still goes through
    generate_case(workspace.inbox, "AFTER-HANG", seed=2)
    assert wait_final(workspace, 1)["AFTER-HANG"]["state"] == "done"
    assert host.stop() == 0


def test_timeout_kills_the_job_fails_the_beam_and_frees_the_gpu(tmp_path, host_factory):
    config = fast_config()
    simulate = config["workflow"]["steps"][2]
    simulate["timeout_seconds"] = 1.5
    simulate["retry"]["max_attempts"] = 1
    workspace = Workspace(tmp_path / "ws", config)
    case_dir = generate_case(workspace.inbox, "SLOW", seed=9)
    (delivery_dir_of(case_dir, 1) / "STANDIN_MODE").write_text("hang")
    host_factory(workspace=workspace)
    case = wait_final(workspace, 1)["SLOW"]
    workspace.kill_jobs()
    assert case["state"] == "failed"
    beam1 = {b["number"]: b for b in case["beams"]}[1]
    assert beam1["state"] == "failed" and "timed out" in beam1["message"]
    assert workspace.gpu_allocations() == []


def test_unusable_plan_is_rejected_and_never_run(ws, host_factory):
    bad = ws.inbox / "BROKEN PLAN"
    bad.mkdir(parents=True)
    (bad / "RP.broken.dcm").write_bytes(b"not dicom at all")
    (bad / "_CASE_READY").touch()
    empty = ws.inbox / "NO PLAN"
    empty.mkdir()
    (empty / "_CASE_READY").touch()
    host_factory()
    cases = wait_final(ws, 2)
    for name in ("BROKEN PLAN", "NO PLAN"):
        assert cases[name]["state"] == "rejected", cases[name]
        assert cases[name]["attention"]
    assert "RT Ion Plan" in cases["NO PLAN"]["message"]
    assert not (ws.folder / "remote").exists() or not any((ws.folder / "remote").iterdir())


def test_hostile_folder_names_are_rejected_visibly_and_never_stop_the_scan(ws, host_factory):
    """Issue 15.4: a Latin-1 folder name made every scan tick raise, and the cases sorting
    after it stayed undetected; a newline or ANSI escape in a name forged log lines."""
    inbox = os.fsencode(ws.inbox)
    os.mkdir(inbox + b"/A-M\xdcLLER")  # sorts before the healthy ones
    (ws.inbox / "B\nINFO forged line").mkdir()
    (ws.inbox / "C\x1b[31mRED").mkdir()
    for bad in (b"/A-M\xdcLLER", "/B\nINFO forged line".encode(), "/C\x1b[31mRED".encode()):
        open(inbox + bad + b"/_CASE_READY", "wb").close()
    generate_case(ws.inbox, "D-HEALTHY", seed=5)
    generate_case(ws.inbox, "Z-HEALTHY", seed=6)
    host_factory()
    cases = wait_final(ws, 5)
    assert cases["D-HEALTHY"]["state"] == "done" and cases["Z-HEALTHY"]["state"] == "done"
    latin1 = cases["A-M\\xdcLLER"]
    assert latin1["state"] == "rejected" and "UTF-8" in latin1["message"] and latin1["attention"]
    for name in ("B\\x0aINFO forged line", "C\\x1b[31mRED"):
        assert cases[name]["state"] == "rejected" and "control characters" in cases[name]["message"]
    for log in (ws.folder / "logs").glob("*.log"):
        text = log.read_text(errors="replace")
        assert "\x1b" not in text and not any(line.startswith("INFO forged") for line in text.splitlines()), log
    assert "Traceback" not in (ws.folder / "logs" / "scan.log").read_text()
    # issue 15.3: what the host writes is its user's alone
    written = [ws.folder / "state.db", *(ws.folder / "logs").glob("*.log"), *(ws.folder / "results").rglob("*"),
               *(ws.folder / "staging").rglob("*")]
    assert len(written) > 10
    assert [str(p) for p in written if p.stat().st_mode & 0o077] == []


def test_a_case_over_the_size_limit_is_rejected_before_anything_is_copied(ws, host_factory):
    """Issue 15.5: a 24 KB case holding a sparse 5 GiB log filled 15.6 GB (staging, remote, results)."""
    sparse = generate_case(ws.inbox, "SPARSE", seed=3)
    with open(delivery_dir_of(sparse, 1) / "999.ptn", "wb") as fh:
        fh.truncate(5 * 1024**3)
    generate_case(ws.inbox, "FINE", seed=4)
    host_factory()
    cases = wait_final(ws, 2)
    assert cases["FINE"]["state"] == "done"
    rejected = cases["SPARSE"]
    assert rejected["state"] == "rejected" and "more than 2.0 GiB (cases.max_case_bytes" in rejected["message"]
    staged = ws.folder / "staging" / rejected["id"]
    assert not staged.exists() or not [p for p in staged.rglob("*") if p.is_file()]
    assert not (ws.folder / "results" / rejected["id"]).exists()


def test_one_worker_alone_drains_on_sigterm(ws):
    proc = subprocess.Popen([sys.executable, "-m", "mqi_framework.cli", "worker", "scan", "-c", str(ws.config_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert wait_until(lambda: worker_row(ws, "scan").get("state") == "running", 30)
        generate_case(ws.inbox, "ALONE", seed=1)
        broker = open_broker(f"sqlite:///{ws.folder / 'queue.db'}")
        assert wait_until(lambda: broker.depth("mqi.events") >= 1, 20)  # it announced the case
        broker.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert worker_row(ws, "scan")["state"] == "stopped"
    unknown = ws.cli("worker", "nobody")
    assert unknown.returncode == 2 and "nobody" in unknown.stderr


def test_dlq_list_shows_no_case_folder_name_unless_asked(ws, host_factory):
    generate_case(ws.inbox, "John Doe 1957", seed=1)
    host = host_factory()
    assert wait_final(ws, 1)["John Doe 1957"]["state"] == "done"
    host.stop()  # no worker may take the message below first
    broker = open_broker(f"sqlite:///{ws.folder / 'queue.db'}")
    path = str(ws.inbox / "John Doe 1957")
    broker.publish("mqi.prepare", {"type": "run_step", "case": "case-000001", "step": "prepare", "case_path": path})
    delivery = broker.get("mqi.prepare", timeout=5)
    assert broker.nack(delivery, reason=f"OSError: [Errno 5] Input/output error: '{path}/RN1.dcm'", retry=False) is False
    broker.close()
    for args in (("dlq", "list"), ("dlq", "list", "--json")):
        shown = ws.cli(*args, check=True).stdout
        assert "John" not in shown and "[case folder]" in shown, shown
    assert "John Doe 1957" in ws.cli("dlq", "list", "--json", "--names", check=True).stdout


def test_dlq_list_replay_purge_through_the_cli(ws):
    assert ws.cli("check").returncode == 0
    broker = open_broker(f"sqlite:///{ws.folder / 'queue.db'}")
    broker.publish("mqi.execute", {"type": "run_step", "case": "case-000009", "step": "simulate"})
    delivery = broker.get("mqi.execute", timeout=1)
    assert broker.nack(delivery, reason="RuntimeError: boom", retry=False) is False
    listed = json.loads(ws.cli("dlq", "list", "--json", check=True).stdout)
    assert len(listed) == 1 and listed[0]["reason"] == "RuntimeError: boom" and listed[0]["queue"] == "mqi.execute"
    assert "case-000009" in ws.cli("dlq", "list", check=True).stdout
    assert "replayed 1" in ws.cli("dlq", "replay", listed[0]["id"], check=True).stdout
    assert broker.depth("mqi.execute") == 1
    delivery = broker.get("mqi.execute", timeout=1)
    assert delivery.message_id == listed[0]["message_id"]
    broker.nack(delivery, reason="again", retry=False)
    assert "purged 1" in ws.cli("dlq", "purge", "--all", check=True).stdout
    assert json.loads(ws.cli("dlq", "list", "--json", check=True).stdout) == []
    broker.close()


def test_a_second_host_on_the_same_workspace_is_refused(ws, host_factory):
    host_factory()
    assert wait_until(lambda: worker_row(ws, "conductor").get("state") == "running", 30)
    second = ws.cli("run", timeout=30)
    assert second.returncode == 2 and "another mqi-host run" in second.stderr


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie waiting for its reaper is gone for our purposes
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _worker_pids(ws: Workspace) -> dict[str, int]:
    return {r["name"]: r["pid"] for r in ws.query("SELECT name, pid FROM workers WHERE state = 'running'")}


def test_workers_stop_when_their_host_is_sigkilled(tmp_path, host_factory):
    """Issue 13.2: no worker outlives its host (parent-death signal)."""
    workspace = Workspace(tmp_path / "ws", fast_config())
    host = host_factory(workspace=workspace)
    expected = {"conductor", "scan", "prepare", "transfer", "execute", "postprocess", "curate"}
    assert wait_until(lambda: expected <= set(_worker_pids(workspace)), 30), workspace.logs()
    pids = _worker_pids(workspace)
    os.kill(host.proc.pid, signal.SIGKILL)  # the host alone, as the OOM killer would
    host.proc.wait()
    assert wait_until(lambda: not any(_alive(p) for p in pids.values()), 40), \
        {n: p for n, p in pids.items() if _alive(p)}


def test_a_new_host_stops_the_workers_a_previous_host_left(tmp_path, host_factory):
    """Issue 13.2: a worker that outlived its host (here started by hand, in its own session,
    and recorded as the previous host's) is stopped before the new host starts its own, so
    two scanners never share the workspace."""
    from mqi_framework.jobrunner import process_start_time

    workspace = Workspace(tmp_path / "ws", fast_config())
    stray = subprocess.Popen([sys.executable, "-m", "mqi_framework.cli", "worker", "scan", "-c",
                              str(workspace.config_path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    try:
        assert wait_until(lambda: process_start_time(stray.pid) is not None
                          and worker_row(workspace, "scan").get("pid") == stray.pid, 30)
        (workspace.folder / "host-children.json").write_text(json.dumps(
            {"host": 1, "children": {"scan": {"pid": stray.pid, "start_time": process_start_time(stray.pid)}}}))
        host = host_factory(workspace=workspace)
        stray.wait(timeout=30)  # stopped by the new host
        assert wait_until(lambda: worker_row(workspace, "scan").get("pid") not in (None, stray.pid)
                          and worker_row(workspace, "scan").get("state") == "running", 30)
        events = [r[0] for r in workspace.query("SELECT message FROM events WHERE kind = 'host.leftovers_stopped'")]
        assert events and f"scan (pid {stray.pid})" in events[0]
        generate_case(workspace.inbox, "AFTER-LEFTOVER", seed=4)
        assert wait_final(workspace, 1)["AFTER-LEFTOVER"]["state"] == "done"
        assert host.stop() == 0
    finally:
        if stray.poll() is None:
            os.killpg(stray.pid, signal.SIGKILL)


def test_status_says_whether_the_host_runs(tmp_path, host_factory):
    """Issue 19: `status` with the host stopped said nothing about it."""
    workspace = Workspace(tmp_path / "ws", fast_config())
    host = host_factory(workspace=workspace)
    assert wait_until(lambda: worker_row(workspace, "scan").get("state") == "running", 30)
    running = json.loads(workspace.cli("status", "--json", check=True).stdout)["host"]
    assert running == {"running": True, "pid": host.proc.pid}
    assert f"host:    running (pid {host.proc.pid})" in workspace.cli("status", check=True).stdout
    assert host.stop() == 0
    assert json.loads(workspace.cli("status", "--json", check=True).stdout)["host"] == {"running": False, "pid": None}
    assert "host:    NOT RUNNING" in workspace.cli("status", check=True).stdout


def test_a_worker_that_cannot_run_for_a_configuration_reason_stops_the_host(ws, host_factory):
    """Issue 19: a typo under a plugin's settings made that worker exit 2 and restart forever,
    the reason only in its own log. Here the config is broken after the host started (the
    restarted worker reads it again): the host stops, exit 2, and says which worker and why."""
    host = host_factory()
    assert wait_until(lambda: worker_row(ws, "scan").get("state") == "running", 30)
    text = ws.config_path.read_text()
    ws.config_path.write_text(text.replace("settle_seconds:", "settle_secnds:", 1))
    os.kill(worker_row(ws, "scan")["pid"], signal.SIGKILL)
    assert wait_until(lambda: not host.running, 60), ws.logs()
    assert host.stop() == 2
    output = (ws.folder / "host-stdout.log").read_text()
    assert "error: scan cannot run:" in output and "settle_secnds" in output and "the host stopped" in output
    assert output.count("restarting in") <= 1  # the SIGKILL's restart, then no loop
    events = [r[0] for r in ws.query("SELECT message FROM events WHERE kind = 'host.stopped'")]
    assert events and "scan cannot run" in events[0] and "settle_secnds" in events[0]


def test_run_refuses_to_start_without_its_inbox(tmp_path):
    """Issue 19: a missing inbox only warned in the log every 2 s while the host looked healthy."""
    workspace = Workspace(tmp_path / "ws", fast_config())
    workspace.inbox.rmdir()
    proc = workspace.cli("run", timeout=30)
    assert proc.returncode == 2
    assert "the host was not started" in proc.stderr and f"inbox {workspace.inbox} does not exist" in proc.stderr
