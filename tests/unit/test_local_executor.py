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


def test_kill_escalates_to_sigkill_for_a_group_that_ignores_sigterm(make_executor, tmp_path):
    ex = make_executor()  # grace 1 s
    pidfile = tmp_path / "stubborn.pid"
    command = f"trap '' TERM; sleep 300 & echo $! > {shlex.quote(str(pidfile))}; wait"
    h = ex.start(JobSpec(job_key="stubborn", command=command, workdir=str(tmp_path)))
    assert wait_until(lambda: pidfile.exists() and pidfile.read_text().strip(), 10, 0.05)
    grandchild = int(pidfile.read_text())
    ex.kill(h)
    status = ex.poll(h)
    assert status.state == "exited" and status.exit_code == 128 + signal.SIGKILL
    assert "killed" in status.message
    assert wait_until(lambda: not _alive(grandchild), 5, 0.05)
    ex.kill(h)  # a finished job is left alone


def test_processes_left_behind_are_stopped_when_the_command_ends(make_executor, tmp_path):
    ex = make_executor()
    pidfile = tmp_path / "bg.pid"
    h = ex.start(JobSpec(job_key="bg", command=f"sleep 300 & echo $! > {shlex.quote(str(pidfile))}; exit 0",
                         workdir=str(tmp_path)))
    status = wait_exit(ex, h)
    assert status.exit_code == 0
    assert not _alive(int(pidfile.read_text()))
    assert "left processes behind" in ex.read_log(h)


def test_concurrent_starts_run_the_job_once(make_executor, tmp_path):
    import threading

    counter = tmp_path / "runs.txt"
    spec = JobSpec(job_key="race", command=f"echo run >> {shlex.quote(str(counter))}", workdir=str(tmp_path))
    handles = []
    threads = [threading.Thread(target=lambda: handles.append(make_executor().start(spec))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(handles) == 4 and all(h == handles[0] for h in handles)
    assert wait_exit(make_executor(), handles[0]).exit_code == 0
    assert counter.read_text().count("run") == 1


def _dead_pid() -> int:
    import subprocess

    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_pid_file_pointing_at_a_dead_process_is_lost(make_executor, tmp_path):
    ex = make_executor()
    job_dir = ex.jobs_dir / "ghost"
    job_dir.mkdir(parents=True)
    dead = _dead_pid()
    (job_dir / "runner").write_text(f"{dead} 12345\n")
    (job_dir / "pid").write_text(f"{dead} 0 12345 -\n")
    counter = tmp_path / "runs.txt"
    h = ex.start(JobSpec(job_key="ghost", command=f"echo run >> {shlex.quote(str(counter))}", workdir=str(tmp_path)))
    assert h.data["pid"] == dead  # re-attached, not started again
    status = ex.poll(h)
    assert status.state == "lost" and "exit code" in status.message
    assert not counter.exists()


def test_pid_reuse_is_not_mistaken_for_the_job(make_executor, tmp_path):
    ex = make_executor()
    job_dir = ex.jobs_dir / "reused"
    job_dir.mkdir(parents=True)
    (job_dir / "pid").write_text(f"{os.getpid()} 0 1 -\n")  # a live pid, but another start time
    h = ex.start(JobSpec(job_key="reused", command="true", workdir=str(tmp_path)))
    assert ex.poll(h).state == "lost"


def test_runner_that_died_after_claiming_is_never_started_again(make_executor, tmp_path):
    ex = make_executor()
    job_dir = ex.jobs_dir / "claimed"
    job_dir.mkdir(parents=True)
    (job_dir / "runner").write_text(f"{_dead_pid()} 12345\n")  # crashed before recording the command's pid
    counter = tmp_path / "runs.txt"
    h = ex.start(JobSpec(job_key="claimed", command=f"echo run >> {shlex.quote(str(counter))}",
                         workdir=str(tmp_path)))
    assert ex.poll(h).state == "lost"
    assert not counter.exists()


def test_lost_job_leftovers_are_killed(make_executor, tmp_path):
    ex = make_executor()
    h = ex.start(JobSpec(job_key="orphan", command="sleep 300", workdir=str(tmp_path)))
    os.kill(h.data["pid"], signal.SIGKILL)  # only the runner dies; the command keeps running
    assert wait_until(lambda: ex.poll(h).state == "lost", 5, 0.05)
    assert wait_until(lambda: not _alive(h.data["pgid"]), 5, 0.05)


def test_env_and_hostile_env_values(make_executor, tmp_path):
    ex = make_executor()
    evil = "a b'; touch PWNED; $(touch PWNED2) \"q\""
    h = ex.start(JobSpec(job_key="env", command='printf "%s|%s" "$MQI_X" "$MQI_EMPTY"', workdir=str(tmp_path),
                         env={"MQI_X": evil, "MQI_EMPTY": ""}))
    assert wait_exit(ex, h).exit_code == 0
    assert ex.read_log(h) == f"{evil}|"
    assert not list(tmp_path.rglob("PWNED*"))


def test_handle_is_json_and_read_log_tails(make_executor, tmp_path):
    import json

    from mqi_framework.protocols import JobHandle

    ex = make_executor()
    h = ex.start(JobSpec(job_key="tail", command="printf 'héllo wörld'", workdir=str(tmp_path)))
    wait_exit(ex, h)
    again = JobHandle(**json.loads(json.dumps({"executor": h.executor, "job_key": h.job_key, "data": h.data})))
    assert again == h
    assert ex.read_log(again) == "héllo wörld"
    assert ex.read_log(again, max_bytes=3) == "rld"
    assert ex.read_log(again, max_bytes=len("llo wörld".encode()) + 1) == "\ufffdllo wörld"  # cut inside "é"


def test_no_zombie_runners(make_executor, tmp_path):
    ex = make_executor()
    handles = [ex.start(JobSpec(job_key=f"z{i}", command="true", workdir=str(tmp_path))) for i in range(3)]
    for h in handles:
        wait_exit(ex, h)
    assert wait_until(lambda: (ex.poll(handles[0]), not ex._children)[1], 5, 0.05)


def test_registered_through_the_hook():
    from mqi_framework.builtin import local_executor

    seen = []
    local_executor.mqi_register_executors(seen.append)
    assert seen == [LocalExecutor] and LocalExecutor.name == "core.local"
