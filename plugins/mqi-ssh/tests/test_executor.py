"""The ``ssh`` executor against a real sshd: detached jobs, exit codes, re-attach, kill,
timeouts, lost jobs, hostile names, paths that would leave the root."""

from __future__ import annotations

import os
import shlex
import subprocess
import time
from pathlib import Path

import pytest

from mqi_framework.protocols import JobSpec, PermanentError
from mqi_framework.safepath import PathEscapeError
from mqi_framework.workspace import wait_until

HOSTILE = "O'Brien; rm -rf / $(touch PWNED) `id` \"q\" \\ *"


def finish(executor, handle, timeout: float = 20):
    status = executor.poll(handle)
    deadline = time.monotonic() + timeout
    while status.state == "running" and time.monotonic() < deadline:
        time.sleep(0.1)
        status = executor.poll(handle)
    return status


def processes_with(marker: str) -> list[str]:
    out = subprocess.run(["pgrep", "-af", marker], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if "pgrep" not in line]


def test_job_runs_detached_and_reports_its_exit_code(make_executor, remote_root):
    executor = make_executor()
    handle = executor.start(JobSpec("case-1-simulate-b1-a1", "echo hello; echo oops >&2; exit 3", str(remote_root)))
    assert handle.data["host"] == "gpu1" and handle.data["job_dir"].startswith(str(remote_root))
    status = finish(executor, handle)
    assert (status.state, status.exit_code, status.timed_out) == ("exited", 3, False)
    assert executor.read_log(handle) == "hello\noops\n"
    assert executor.read_log(handle, 5) == "oops\n"


def test_job_folders_and_what_the_engine_writes_are_private(make_executor, remote_root):
    executor = make_executor()
    handle = executor.start(JobSpec("case-1-simulate-b1-a2", "echo dose > dose.raw", str(remote_root)))
    assert finish(executor, handle).exit_code == 0
    job_dir = Path(handle.data["job_dir"])
    for path in [job_dir, *job_dir.iterdir(), remote_root / "dose.raw"]:
        assert path.stat().st_mode & 0o077 == 0, path


def test_second_start_of_a_job_key_reattaches_and_never_runs_twice(make_executor, remote_root):
    executor = make_executor()
    counter = remote_root / "runs"
    spec = JobSpec("k1", f"echo run >> {shlex.quote(str(counter))}; sleep 1", str(remote_root))
    first = executor.start(spec)
    again = make_executor().start(spec)  # another worker (process) after a restart
    assert again.data == first.data
    assert finish(executor, first).exit_code == 0
    make_executor().start(spec)  # even after it finished
    time.sleep(0.3)
    assert counter.read_text() == "run\n"


def test_a_start_whose_answer_is_cut_off_is_unconfirmed_and_the_same_key_reattaches(make_executor, remote_root,
                                                                                     sshd_running, mocker):
    """The fault campaign's finding: the connection dropped after the launch command was sent.
    The job may run there; the start must say "unconfirmed" (not "unreachable", which made the
    host run the beam again beside it), and asking again with the same key re-attaches to it
    or starts it: either way it runs once."""
    import paramiko

    from mqi_framework.protocols import StartUnconfirmed

    executor = make_executor()
    counter = remote_root / "runs"
    spec = JobSpec("cut-off", f"echo run >> {shlex.quote(str(counter))}; sleep 1", str(remote_root))
    original = paramiko.Channel.exec_command

    def sent_then_dropped(channel, command):
        original(channel, command)
        # cut the link before the answer can come (the remote shell alone takes ~0.1 s to start)
        sshd_running.drop_connections()
        assert wait_until(lambda: not channel.get_transport().is_active(), 10, 0.01)

    patched = mocker.patch.object(paramiko.Channel, "exec_command", sent_then_dropped)
    with pytest.raises(StartUnconfirmed):
        executor.start(spec)
    mocker.stop(patched)
    handle = executor.start(spec)
    assert finish(executor, handle).exit_code == 0
    assert counter.read_text() == "run\n"


def test_hostile_values_are_data_not_shell(make_executor, remote_root):
    executor = make_executor()
    workdir = remote_root / HOSTILE.replace("/", "_")
    workdir.mkdir()
    command = f"printf '%s' {shlex.quote(HOSTILE)} > out.txt"
    handle = executor.start(JobSpec(HOSTILE, command, str(workdir), env={"CASE_NAME": HOSTILE}))
    assert finish(executor, handle).exit_code == 0
    assert (workdir / "out.txt").read_text() == HOSTILE
    job_dir = Path(handle.data["job_dir"])
    assert job_dir.parent == remote_root / ".mqi-jobs" and "'" not in job_dir.name and " " not in job_dir.name
    assert not list(remote_root.rglob("PWNED")) and not Path("PWNED").exists()
    env_job = executor.start(JobSpec("env", "printf '%s' \"$CASE_NAME\" > env.txt", str(workdir),
                                     env={"CASE_NAME": HOSTILE}))
    assert finish(executor, env_job).exit_code == 0
    assert (workdir / "env.txt").read_text() == HOSTILE
    with pytest.raises(PermanentError, match="not a valid shell name"):
        executor.start(JobSpec("env2", "true", str(workdir), env={"A;B": "x"}))


def test_paths_outside_the_root_are_refused(make_executor, remote_root):
    executor = make_executor()
    for workdir in ("/etc", str(remote_root / ".." / "elsewhere"), "../up"):
        with pytest.raises(PermanentError, match="outside"):
            executor.start(JobSpec("escape", "true", workdir))
    executor = make_executor(jobs_dir="../jobs-elsewhere")
    with pytest.raises(PathEscapeError):
        executor.start(JobSpec("escape", "true", str(remote_root)))


def test_timeout_kills_the_process_group(make_executor, remote_root):
    executor = make_executor()
    marker = f"sleep 3{int(time.time() * 1000) % 100000}"
    handle = executor.start(JobSpec("slow", f"{marker} & {marker}", str(remote_root), timeout=1))
    status = finish(executor, handle)
    assert (status.state, status.exit_code, status.timed_out) == ("exited", 124, True)
    assert "timed out" in executor.read_log(handle)
    assert wait_until(lambda: not processes_with(marker), 5), processes_with(marker)


def test_kill_stops_the_whole_group_and_leaves_finished_jobs_alone(make_executor, remote_root):
    executor = make_executor()
    marker = f"sleep 4{int(time.time() * 1000) % 100000}"
    handle = executor.start(JobSpec("cancel-me", f"trap '' TERM; {marker} & {marker}", str(remote_root)))
    assert executor.poll(handle).state == "running"
    executor.kill(handle)
    status = finish(executor, handle)
    assert status.state == "exited" and status.exit_code != 0 and status.message == "killed on request"
    assert not processes_with(marker)
    done = executor.start(JobSpec("done", "exit 0", str(remote_root)))
    assert finish(executor, done).exit_code == 0
    executor.kill(done)  # a finished job is left alone
    assert executor.poll(done).exit_code == 0 and not (Path(done.data["job_dir"]) / "killed").exists()


def test_leftover_background_processes_are_stopped(make_executor, remote_root):
    executor = make_executor()
    marker = f"sleep 5{int(time.time() * 1000) % 100000}"
    handle = executor.start(JobSpec("leaves", f"{marker} & exit 0", str(remote_root)))
    assert finish(executor, handle).exit_code == 0
    assert not processes_with(marker)


def test_missing_workdir_fails_with_a_message(make_executor, remote_root):
    executor = make_executor()
    handle = executor.start(JobSpec("nowhere", "true", str(remote_root / "missing")))
    assert finish(executor, handle).exit_code == 126
    assert "does not exist" in executor.read_log(handle)


def test_reboot_and_vanished_jobs_are_lost(make_executor, remote_root):
    executor = make_executor()
    handle = executor.start(JobSpec("rebooted", "sleep 30", str(remote_root)))
    pid_file = Path(handle.data["job_dir"]) / "pid"
    fields = pid_file.read_text().split()
    pid_file.write_text(" ".join(fields[:4] + ["another-boot-id"]) + "\n")  # what a reboot looks like
    status = executor.poll(handle)
    assert status.state == "lost" and "rebooted" in status.message
    executor.kill(handle)  # refuses to signal a group recorded before the "reboot"
    pid_file.write_text(" ".join(fields) + "\n")
    assert executor.poll(handle).state == "running"
    import os
    import signal

    os.kill(int(fields[0]), signal.SIGKILL)  # the supervisor and the job die without an exit code
    os.killpg(int(fields[2]), signal.SIGKILL)
    status = finish(executor, handle)
    assert status.state == "lost" and "no exit code" in status.message
    subprocess.run(["rm", "-rf", handle.data["job_dir"]], check=True)
    assert "gone" in executor.poll(handle).message


def test_connection_drop_while_running_reattaches(make_executor, remote_root, sshd_running):
    executor = make_executor()
    counter = remote_root / "runs"
    handle = executor.start(JobSpec("drop", f"echo run >> {shlex.quote(str(counter))}; sleep 2", str(remote_root)))
    sshd_running.restart()  # every connection dropped, the server back
    status = finish(executor, handle)
    assert (status.state, status.exit_code) == ("exited", 0)
    assert counter.read_text() == "run\n"


def test_unreachable_host_keeps_polling_then_gives_up(make_executor, remote_root, sshd_running):
    executor = make_executor(unreachable_lost_after_seconds=1.0)
    handle = executor.start(JobSpec("away", "sleep 20", str(remote_root)))
    sshd_running.stop()
    try:
        status = executor.poll(handle)
        assert status.state == "running" and "unreachable" in status.message
        time.sleep(1.1)
        status = executor.poll(handle)
        assert status.state == "lost" and "unreachable" in status.message
    finally:
        sshd_running.start()
    # the job was only cut off: once the host answers again it is killed (its GPU goes to the retry)
    other = executor.start(JobSpec("after", "sleep 1", str(remote_root)))
    executor.poll(other)
    status = finish(executor, handle)
    assert status.state == "exited" and status.message == "killed on request"


def test_missing_outputs_globs_over_sftp(make_executor, remote_root):
    executor = make_executor()
    (remote_root / "case" / "beam 1" / "output").mkdir(parents=True)
    (remote_root / "case" / "beam 1" / "output" / "dose.raw").write_bytes(b"x")
    (remote_root / "case" / ".hidden.raw").write_bytes(b"x")
    base = str(remote_root / "case")
    patterns = [f"{base}/beam 1/output/*.raw", f"{base}/*/output/dose.raw", f"{base}/**/dose.raw",
                f"{base}/beam [0-9]/output/*", f"{base}/*.raw", f"{base}/beam 2/output/*", f"{base}/**/*.mhd"]
    assert executor.missing_outputs(patterns) == [f"{base}/*.raw", f"{base}/beam 2/output/*", f"{base}/**/*.mhd"]


def test_routes_by_gpu_host_and_check_reports_fingerprints(make_executor, remote_root, sshd_running):
    executor = make_executor()
    handle = executor.start(JobSpec("gpu", "true", str(remote_root), gpu={"host": "gpu1", "index": 0, "uuid": ""}))
    assert handle.data["host"] == "gpu1"
    assert executor.check() == []
    info = executor.check_info()
    assert any(sshd_running.fingerprint() in line and "gpu1" in line for line in info)
    broken = make_executor(host={"root": str(remote_root / "absent")})
    assert any("does not exist" in p for p in broken.check())
    relative = make_executor(host={"root": "relative/root"})
    assert any("absolute" in p for p in relative.check())
    escaping = make_executor(jobs_dir="../../elsewhere")
    assert any("jobs_dir" in p and "outside" in p for p in escaping.check())


def test_one_status_command_per_host_for_all_running_jobs(make_executor, remote_root, mocker):
    executor = make_executor(poll_interval_seconds=30)
    handles = [executor.start(JobSpec(f"many-{i}", "sleep 20", str(remote_root))) for i in range(4)]
    for handle in handles:  # each job is asked about once: that makes the host's watch list
        executor.poll(handle)
    executor._forget_status("gpu1")
    conn = executor._conn("gpu1")
    spy = mocker.spy(conn, "run")
    assert [executor.poll(h).state for h in handles] == ["running"] * 4
    assert spy.call_count == 1  # one round trip for all four
    executor.kill(handles[0])  # a kill forgets the cached answer
    assert executor.poll(handles[0]).state == "exited"
    for handle in handles[1:]:
        executor.kill(handle)


def test_a_program_missing_on_the_host_is_found_before_any_job(make_executor):
    """Issue 19: `mqi-host check` asks the executor whether the step's program runs there."""
    executor = make_executor()
    assert executor.program_problem("sh") is None
    problem = executor.program_problem("tps_env_not_installed_here")
    assert problem is not None and "tps_env_not_installed_here: command not found on" in problem
    assert executor.program_problem("$(touch /tmp/pwned-by-program-probe)") is not None  # data, not shell
    assert not os.path.exists("/tmp/pwned-by-program-probe")
