"""The detached job runner on its own: files it writes, timeouts, signals, one run per job folder."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mqi_framework.jobrunner import process_start_time, read_pid_file, write_atomic
from mqi_framework.workspace import wait_until


def runner(job_dir: Path, command: str, *options: str) -> list[str]:
    return [sys.executable, "-m", "mqi_framework.jobrunner", str(job_dir), *options, "--", command]


def run(job_dir: Path, command: str, *options: str, workdir: Path) -> subprocess.CompletedProcess:
    return subprocess.run(runner(job_dir, command, "--workdir", str(workdir), *options),
                          capture_output=True, text=True, timeout=30)


def test_files_of_a_finished_job(tmp_path):
    job = tmp_path / "job"
    proc = run(job, "echo out; echo err >&2; pwd; exit 7", workdir=tmp_path)
    assert proc.returncode == 7
    assert (job / "exit_code").read_text() == "7\n"
    assert (job / "output.log").read_text() == f"out\nerr\n{tmp_path}\n"
    runner_pid, pgid, start, child_start = (job / "pid").read_text().split()
    assert int(runner_pid) > 0 and int(runner_pid) != int(pgid)
    assert int(pgid) > 0 and start.isdigit() and child_start.isdigit()
    info = read_pid_file(job)
    assert info["source"] == "pid" and info["pgid"] == int(pgid)
    assert not (job / "timed_out").exists() and not list(job.glob("*.part"))


def test_log_is_appended_and_a_second_runner_never_runs_the_command(tmp_path):
    job = tmp_path / "job"
    counter = tmp_path / "count"
    command = f"echo run >> {shlex.quote(str(counter))}; echo once"
    assert run(job, command, workdir=tmp_path).returncode == 0
    again = run(job, command, workdir=tmp_path)
    assert again.returncode == 0 and "claimed" in again.stderr
    assert counter.read_text() == "run\n"
    assert (job / "output.log").read_text() == "once\n"


def test_timeout_kills_the_group_and_records_124(tmp_path):
    job = tmp_path / "job"
    pidfile = tmp_path / "gc.pid"
    started = time.monotonic()
    proc = run(job, f"sleep 300 & echo $! > {shlex.quote(str(pidfile))}; wait", "--timeout", "0.5",
               "--grace", "0.5", workdir=tmp_path)
    assert time.monotonic() - started < 10
    assert proc.returncode == 124
    assert (job / "exit_code").read_text() == "124\n" and (job / "timed_out").exists()
    assert process_start_time(int(pidfile.read_text())) is None  # the grandchild is gone (and reaped)
    assert "timed out" in (job / "output.log").read_text()


def test_sigterm_is_forwarded_to_the_group(tmp_path):
    job = tmp_path / "job"
    proc = subprocess.Popen(runner(job, "sleep 300", "--workdir", str(tmp_path), "--grace", "1"),
                            start_new_session=True)
    try:
        assert wait_until(lambda: (job / "pid").exists(), 10, 0.02)
        pgid = int((job / "pid").read_text().split()[1])
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 128 + signal.SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert (job / "exit_code").read_text() == f"{128 + signal.SIGTERM}\n"
    assert (job / "killed").exists()
    with pytest.raises(ProcessLookupError):
        os.killpg(pgid, 0)


def test_env_workdir_and_quoted_values(tmp_path):
    job = tmp_path / "job"
    work = tmp_path / "a dir; with 'quotes'"
    work.mkdir()
    evil = "x'; touch PWNED; echo '$(touch PWNED2)"
    proc = run(job, f'printf "%s|%s|%s" {shlex.quote(evil)} "$MQI_V" "$(basename "$PWD")"',
               "--env", f"MQI_V={evil}", "--env", "MQI_W=a=b", workdir=work)
    assert proc.returncode == 0
    assert (job / "output.log").read_text() == f"{evil}|{evil}|{work.name}"
    assert not list(tmp_path.rglob("PWNED*"))


def test_missing_workdir_is_126(tmp_path):
    job = tmp_path / "job"
    assert run(job, "true", workdir=tmp_path / "missing").returncode == 126
    assert (job / "exit_code").read_text() == "126\n"
    assert "does not exist" in (job / "output.log").read_text()


@pytest.mark.parametrize("args", [["JOB", "--workdir", "/tmp", "true"],  # no --
                                  ["JOB", "--workdir", "/tmp", "--", "echo", "two"],  # not ONE string
                                  ["JOB", "--workdir", "/tmp", "--env", "NOEQUALS", "--", "true"]])
def test_usage_errors(tmp_path, args):
    args = [str(tmp_path / "job") if a == "JOB" else a for a in args]
    proc = subprocess.run([sys.executable, "-m", "mqi_framework.jobrunner", *args], capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode == 2
    assert not (tmp_path / "job" / "exit_code").exists()


def test_helpers(tmp_path):
    assert process_start_time(os.getpid()) is not None
    assert process_start_time(0) is None
    target = tmp_path / "f"
    write_atomic(target, "1\n")
    write_atomic(target, "2\n")
    assert target.read_text() == "2\n" and not (tmp_path / "f.part").exists()
    assert read_pid_file(tmp_path) is None
