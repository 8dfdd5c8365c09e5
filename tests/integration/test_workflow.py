"""End to end: `mqi-host run` in real subprocesses over generated cases, on real SQLite files.

Each test runs its own workspace and host; the host is always stopped, and detached jobs
are killed, when the test ends.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mqi_framework.workspace import fast_config, merge, wait_until
from mqi_framework.testing import Workspace

pytestmark = pytest.mark.integration

mqi_moqui_samples = pytest.importorskip("mqi_moqui.samples")
generate_case = mqi_moqui_samples.generate_case

FINAL = {"done", "failed", "rejected", "cancelled"}


class RunningHost:
    """`mqi-host run` as a subprocess in its own session."""

    def __init__(self, ws: Workspace, env: dict | None = None) -> None:
        self.ws = ws
        self.env = {**os.environ, "MQI_STANDIN_SECONDS": "0.5", **(env or {})}
        self.proc: subprocess.Popen | None = None

    def start(self) -> "RunningHost":
        self.log = open(self.ws.folder / "host-stdout.log", "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "mqi_framework.cli", "run", "-c", str(self.ws.config_path)],
                                     stdout=self.log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True)
        return self

    def stop(self, timeout: float = 30) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()
        return self.proc.returncode

    def kill_everything(self) -> None:
        """SIGKILL the host and every worker process, as a power cut of the host would (jobs survive)."""
        assert self.proc is not None
        conn = self.ws.state()
        pids = [r["pid"] for r in conn.execute("SELECT pid FROM workers WHERE pid IS NOT NULL")]
        conn.close()
        for pid in [self.proc.pid, *pids]:
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        self.proc.wait()
        self.log.close()


def kill_jobs(ws: Workspace) -> None:
    jobs = ws.folder / "jobs"
    if not jobs.is_dir():
        return
    for pid_file in jobs.glob("*/pid"):
        try:
            data = pid_file.read_text().split()
            os.killpg(int(data[1] if len(data) > 1 else data[0]), signal.SIGKILL)
        except (ValueError, IndexError, ProcessLookupError, PermissionError, OSError):
            pass


@pytest.fixture
def ws(tmp_path):
    workspace = Workspace(tmp_path / "ws", fast_config())
    yield workspace
    kill_jobs(workspace)


@pytest.fixture
def host_factory(ws):
    hosts: list[RunningHost] = []

    def make(env: dict | None = None, workspace: Workspace | None = None) -> RunningHost:
        h = RunningHost(workspace or ws, env).start()
        hosts.append(h)
        return h

    yield make
    for h in hosts:
        if h.proc is not None and h.proc.poll() is None:
            h.stop()


def cases_by_name(ws: Workspace) -> dict[str, dict]:
    return {c["name"]: c for c in json.loads(ws.cli("cases", "--json", "--names", check=True).stdout)}


def wait_final(ws: Workspace, count: int, timeout: float = 90) -> dict[str, dict]:
    result: dict[str, dict] = {}

    def done() -> bool:
        nonlocal result
        if not (ws.folder / "state.db").exists():
            return False
        result = cases_by_name(ws)
        return len(result) >= count and all(c["state"] in FINAL for c in result.values())

    assert wait_until(done, timeout, 0.3), f"cases not final after {timeout}s: {result}\n{host_logs(ws)}"
    return result


def host_logs(ws: Workspace) -> str:
    out = []
    for log in sorted((ws.folder / "logs").glob("*.log")):
        out.append(f"--- {log.name}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-15:]))
    return "\n".join(out)


def delivery_dir_of(case_dir: Path, beam: int) -> Path:
    for planinfo in case_dir.glob("*/PlanInfo.txt"):
        for line in planinfo.read_text().splitlines():
            key, _, value = line.partition(",")
            if key.strip() == "DICOM_BEAM_NUMBER" and value.strip() == str(beam):
                return planinfo.parent
    raise AssertionError(f"no delivery folder for beam {beam}")


def assert_outputs(ws: Workspace, case: dict) -> None:
    for beam in case["beams"]:
        out = ws.folder / "results" / case["id"] / "beams" / str(beam["number"]) / "output"
        assert list(out.glob("*.raw")), f"{case['id']} beam {beam['number']} has no dose"
        assert (out / "summary.json").is_file()


def gpu_allocations(ws: Workspace) -> list:
    conn = ws.state()
    try:
        return [dict(r) for r in conn.execute("SELECT idx, allocated_step FROM resources WHERE allocated_step IS NOT NULL")]
    finally:
        conn.close()


def simulate_attempts(ws: Workspace) -> list[int]:
    conn = ws.state()
    try:
        return [r[0] for r in conn.execute("SELECT attempt FROM steps WHERE name = 'simulate'")]
    finally:
        conn.close()


# ------------------------------------------------------------------------------------- tests


def test_three_cases_end_to_end(ws, host_factory):
    for i in range(3):
        generate_case(ws.inbox, f"CASE-{i}", seed=i)
    host = host_factory()
    cases = wait_final(ws, 3)
    for case in cases.values():
        assert case["state"] == "done", case
        assert [b["state"] for b in case["beams"]] == ["done"] * 3  # the setup beam is not simulated
        assert_outputs(ws, case)
    assert host.stop() == 0
    assert gpu_allocations(ws) == []
    assert simulate_attempts(ws) == [1] * 9
    conn = ws.state()
    workers = {r["name"]: r["state"] for r in conn.execute("SELECT name, state FROM workers")}
    conn.close()
    assert workers["conductor"] == "stopped" and workers["execute"] == "stopped"


def test_worker_killed_mid_beam_reattaches(ws, host_factory):
    generate_case(ws.inbox, "KILLED", seed=7)
    host = host_factory(env={"MQI_STANDIN_SECONDS": "4"})

    def running_job() -> bool:
        if not (ws.folder / "state.db").exists():
            return False
        conn = ws.state()
        try:
            return conn.execute("SELECT COUNT(*) FROM steps WHERE name='simulate' AND state='running'").fetchone()[0] > 0
        finally:
            conn.close()

    assert wait_until(running_job, 60), host_logs(ws)
    conn = ws.state()
    pid = conn.execute("SELECT pid FROM workers WHERE name = 'execute'").fetchone()[0]
    conn.close()
    os.kill(pid, signal.SIGKILL)
    case = wait_final(ws, 1)["KILLED"]
    assert case["state"] == "done", case
    assert_outputs(ws, case)
    assert simulate_attempts(ws) == [1, 1, 1]  # re-attached: no beam ran twice
    conn = ws.state()
    restarts = conn.execute("SELECT restarts FROM workers WHERE name = 'execute'").fetchone()[0]
    events = [r[0] for r in conn.execute("SELECT message FROM events WHERE kind = 'worker.restart'")]
    conn.close()
    assert restarts >= 1 and any("execute" in e for e in events)
    assert host.stop() == 0
    assert gpu_allocations(ws) == []


def test_host_killed_and_restarted_does_not_rerun_beams(ws, host_factory):
    generate_case(ws.inbox, "RESTART", seed=8)
    host = host_factory(env={"MQI_STANDIN_SECONDS": "4"})

    def all_running() -> bool:
        if not (ws.folder / "state.db").exists():
            return False
        conn = ws.state()
        try:
            return conn.execute("SELECT COUNT(*) FROM steps WHERE name='simulate' AND state='running'").fetchone()[0] >= 2
        finally:
            conn.close()

    assert wait_until(all_running, 60), host_logs(ws)
    host.kill_everything()
    host_factory(env={"MQI_STANDIN_SECONDS": "4"})
    case = wait_final(ws, 1)["RESTART"]
    assert case["state"] == "done", case
    assert_outputs(ws, case)
    assert simulate_attempts(ws) == [1, 1, 1]
    started = [p for p in (ws.folder / "jobs").iterdir() if "simulate" in p.name]
    assert len(started) == 3


def test_hostile_case_name_is_data(ws, host_factory, tmp_path):
    name = "it's a \"case\"; $(touch PWNED) `touch PWNED2` & echo"
    generate_case(ws.inbox, name, seed=3)
    host_factory()
    case = wait_final(ws, 1)[name]
    assert case["state"] == "done", case
    assert_outputs(ws, case)
    for root in (ws.folder, tmp_path, Path.cwd()):
        assert not list(root.rglob("PWNED*"))
    # the folder name (possibly a patient id) stays out of the logs and remote paths
    for log in (ws.folder / "logs").glob("*.log"):
        assert "touch PWNED" not in log.read_text(errors="replace")
    assert not any("PWNED" in str(p) for p in (ws.folder / "remote").rglob("*"))


def test_incomplete_case_is_flagged_and_not_run_then_completes(tmp_path, host_factory):
    config = fast_config(overrides={"cases": {"incomplete_flag_after_seconds": 1.0, "incomplete_recheck_seconds": 0.5}})
    workspace = Workspace(tmp_path / "ws", config)
    case_dir = generate_case(workspace.inbox, "PARTIAL", seed=5, missing_beams=(2,))
    host = host_factory(workspace=workspace)

    def flagged() -> bool:
        if not (workspace.folder / "state.db").exists():
            return False
        case = cases_by_name(workspace).get("PARTIAL")
        return bool(case and case["state"] == "incomplete" and case["attention"])

    assert wait_until(flagged, 30), host_logs(workspace)
    case = cases_by_name(workspace)["PARTIAL"]
    assert {b["number"]: b["state"] for b in case["beams"]}[2] == "missing"
    assert simulate_attempts(workspace) == []  # never half-run
    # the missing delivery arrives: the case goes on by itself
    full = generate_case(tmp_path / "other", "PARTIAL", seed=5)
    src = delivery_dir_of(full, 2)
    shutil.copytree(src, case_dir / src.name)
    case = wait_final(workspace, 1)["PARTIAL"]
    assert case["state"] == "done", case
    assert_outputs(workspace, case)
    host.stop()
    kill_jobs(workspace)


def test_nonzero_exit_with_success_log_fails_the_case(ws, host_factory):
    case_dir = generate_case(ws.inbox, "LIAR", seed=4)
    (delivery_dir_of(case_dir, 2) / "STANDIN_MODE").write_text("lying")
    host_factory()
    case = wait_final(ws, 1)["LIAR"]
    assert case["state"] == "failed", case
    beams = {b["number"]: b for b in case["beams"]}
    assert beams[2]["state"] == "failed" and "exit code 3" in beams[2]["message"]
    assert case["attention"]
    detail = json.loads(ws.cli("case", case["id"], "--json", check=True).stdout)
    sim2 = [s for s in detail["steps"] if s["step"] == "simulate" and s["beam"] == 2][0]
    assert sim2["attempt"] == 2 and len(sim2["attempts"]) == 2  # retried per policy, then failed
    assert gpu_allocations(ws) == []
    # retry after fixing the input runs only the failed beam again
    (delivery_dir_of(case_dir, 2) / "STANDIN_MODE").unlink()
    staged = ws.folder / "staging" / case["id"] / "beams" / "2" / "logs" / "STANDIN_MODE"
    staged.unlink()
    (ws.folder / "remote" / case["id"] / "beams" / "2" / "logs" / "STANDIN_MODE").unlink()
    assert ws.cli("retry", case["id"]).returncode == 0
    case = wait_final(ws, 1)["LIAR"]
    assert case["state"] == "done", case


def test_cancel_kills_running_jobs_and_releases_gpus(ws, host_factory):
    case_dir = generate_case(ws.inbox, "HANGS", seed=6)
    for beam in (1, 2, 3):
        (delivery_dir_of(case_dir, beam) / "STANDIN_MODE").write_text("hang")
    host_factory()

    def running() -> bool:
        if not (ws.folder / "state.db").exists():
            return False
        conn = ws.state()
        try:
            return conn.execute("SELECT COUNT(*) FROM steps WHERE name='simulate' AND state='running'").fetchone()[0] >= 2
        finally:
            conn.close()

    assert wait_until(running, 60), host_logs(ws)
    proc = ws.cli("cancel", "HANGS", "--json")
    assert proc.returncode == 0, proc.stderr
    case = wait_final(ws, 1)["HANGS"]
    assert case["state"] == "cancelled"
    assert {b["state"] for b in case["beams"]} == {"cancelled"}
    assert gpu_allocations(ws) == []
    for pid_file in (ws.folder / "jobs").glob("*/pid"):
        assert (pid_file.parent / "exit_code").exists(), f"{pid_file.parent.name} still running"
