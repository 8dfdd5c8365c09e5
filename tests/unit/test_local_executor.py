"""core.local executor and its job runner: real detached processes."""

from __future__ import annotations

import os
import shlex
import signal
from pathlib import Path

import pytest

from mqi_framework.builtin.local_executor import LocalExecutor, LocalExecutorSettings
from mqi_framework.protocols import JobSpec, PluginContext
from mqi_framework.workspace import wait_until


@pytest.fixture
def make_executor(tmp_path):
    def make() -> LocalExecutor:
        return LocalExecutor(LocalExecutorSettings(kill_grace_seconds=1.0), PluginContext(workspace=tmp_path))
    return make


def wait_exit(executor, handle, timeout=20):
    assert wait_until(lambda: executor.poll(handle).state != "running", timeout, 0.05)
    return executor.poll(handle)


def test_success_and_log(make_executor, tmp_path):
    ex = make_executor()
    h = ex.start(JobSpec(job_key="ok", command="echo hello; echo err >&2", workdir=str(tmp_path)))
    status = wait_exit(ex, h)
    assert status.state == "exited" and status.exit_code == 0 and not status.timed_out
    assert "hello" in ex.read_log(h) and "err" in ex.read_log(h)


def test_nonzero_exit_and_signal_codes(make_executor, tmp_path):
    ex = make_executor()
    h = ex.start(JobSpec(job_key="bad", command="exit 3", workdir=str(tmp_path)))
    assert wait_exit(ex, h).exit_code == 3
    h = ex.start(JobSpec(job_key="segv", command="kill -SEGV $$", workdir=str(tmp_path)))
    assert wait_exit(ex, h).exit_code == 128 + signal.SIGSEGV


def test_missing_workdir_fails_cleanly(make_executor, tmp_path):
    ex = make_executor()
    h = ex.start(JobSpec(job_key="nowhere", command="true", workdir=str(tmp_path / "missing")))
    status = wait_exit(ex, h)
    assert status.exit_code == 126 and "does not exist" in ex.read_log(h)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"


def test_timeout_kills_the_whole_process_group(make_executor, tmp_path):
    ex = make_executor()
    pidfile = tmp_path / "grandchild.pid"
    command = f"sleep 300 & echo $! > {shlex.quote(str(pidfile))}; wait"
    h = ex.start(JobSpec(job_key="slow", command=command, workdir=str(tmp_path), timeout=1.0))
    assert wait_until(pidfile.exists, 10)
    grandchild = int(pidfile.read_text())
    status = wait_exit(ex, h)
    assert status.timed_out and status.exit_code == 124
    assert wait_until(lambda: not _alive(grandchild), 5), "the grandchild survived the timeout"


def test_kill_stops_the_job(make_executor, tmp_path):
    ex = make_executor()
    h = ex.start(JobSpec(job_key="forever", command="sleep 300", workdir=str(tmp_path)))
    assert ex.poll(h).state == "running"
    ex.kill(h)
    status = ex.poll(h)
    assert status.state == "exited" and status.exit_code != 0


def test_restart_reattaches_and_never_runs_twice(make_executor, tmp_path):
    counter = tmp_path / "runs.txt"
    spec = JobSpec(job_key="case-000001-simulate-b1-a1",
                   command=f"echo run >> {shlex.quote(str(counter))}; sleep 1", workdir=str(tmp_path))
    first = make_executor()
    h1 = first.start(spec)
    second = make_executor()  # as after a worker restart: nothing in memory
    h2 = second.start(spec)
    assert h2 == h1
    assert wait_exit(second, h2).exit_code == 0
    third = make_executor()
    assert third.poll(third.start(spec)).state == "exited"
    assert counter.read_text().count("run") == 1


def test_lost_job_is_reported(make_executor, tmp_path):
    ex = make_executor()
    h = ex.start(JobSpec(job_key="vanish", command="sleep 300", workdir=str(tmp_path)))
    os.kill(h.data["pid"], signal.SIGKILL)  # the runner dies without writing an exit code
    os.killpg(h.data["pgid"], signal.SIGKILL)
    assert wait_until(lambda: ex.poll(h).state == "lost", 5)
    assert "exit code" in ex.poll(h).message


def test_hostile_values_stay_data(make_executor, tmp_path):
    ex = make_executor()
    evil = "x'; touch PWNED; echo '$(touch PWNED2)"
    out = tmp_path / "out.txt"
    h = ex.start(JobSpec(job_key=evil, command=f"printf %s {shlex.quote(evil)} > {shlex.quote(str(out))}",
                         workdir=str(tmp_path)))
    assert wait_exit(ex, h).exit_code == 0
    assert out.read_text() == evil
    assert not list(tmp_path.rglob("PWNED*"))


def test_missing_outputs(make_executor, tmp_path):
    ex = make_executor()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "dose.raw").write_bytes(b"1234")
    assert ex.missing_outputs([str(tmp_path / "out" / "*.raw"), str(tmp_path / "none" / "*")]) == [
        str(tmp_path / "none" / "*")]
