"""The detached job wrapper the local executor starts::

    python -m mqi_framework.jobrunner JOB_DIR --workdir DIR [--timeout S] [--grace S] [--env K=V]... -- COMMAND

It runs COMMAND (ONE string, rendered by the caller with every value shell-quoted) with
``/bin/sh -c`` in DIR, in a session and process group of its own, and appends its stdout
and stderr to ``JOB_DIR/output.log``. Files in JOB_DIR:

``runner``     claimed first, exclusively (``O_EXCL``): a second runner for the same
               JOB_DIR exits at once without running anything, so a job never runs twice
``pid``        ``RUNNER_PID CHILD_PGID RUNNER_START CHILD_START`` written atomically once
               the command started; the start times (field 22 of ``/proc/PID/stat``)
               guard against pid reuse
``exit_code``  written atomically (``.part`` then rename) when the command ended and its
               process group is empty
``timed_out``  the command ran past ``--timeout``: its process group was killed and the
               exit code is 124
``killed``     the runner got SIGTERM/SIGINT/SIGHUP (a kill): it stopped the process group
               and recorded the command's exit code

Stopping the group means SIGTERM, then SIGKILL to whatever is left after ``--grace``
seconds. Processes the command leaves behind in its group after it exits are stopped the
same way, so a finished job holds no GPU. The runner is a child subreaper (Linux), so
orphaned grandchildren are reaped by it rather than lingering as zombies.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from mqi_framework.files import write_atomic

TIMEOUT_EXIT_CODE = 124
WORKDIR_MISSING_EXIT_CODE = 126
CLAIM_FILE = "runner"
PID_FILE = "pid"
EXIT_FILE = "exit_code"
TIMED_OUT_FILE = "timed_out"
KILLED_FILE = "killed"
LOG_FILE = "output.log"

_PR_SET_CHILD_SUBREAPER = 36


def process_start_time(pid: int) -> Optional[str]:
    """The kernel's start time of ``pid`` (field 22 of /proc/PID/stat), or None if gone."""
    if pid <= 0:
        return None
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        # the command name (field 2) may contain spaces and parentheses: split after the last ')'
        fields = stat[stat.rindex(")") + 2:].split()
    except (OSError, ValueError):
        return None
    return fields[19] if len(fields) > 19 else None


def read_pid_file(job_dir: Path) -> Optional[dict]:
    """``{"pid", "pgid", "start_time", "child_start_time"}`` from ``JOB_DIR/pid`` or the
    ``runner`` claim (pgid 0 there: the command may not have started), None if neither."""
    for name in (PID_FILE, CLAIM_FILE):
        try:
            fields = (Path(job_dir) / name).read_text().split()
        except OSError:
            continue
        if len(fields) < 2 and name == CLAIM_FILE:
            continue  # claimed a moment ago, not written yet
        if name == CLAIM_FILE:
            fields = [fields[0], "0", fields[1]]
        if len(fields) < 3:
            continue
        return {"pid": int(fields[0]), "pgid": int(fields[1]), "start_time": fields[2],
                "child_start_time": fields[3] if len(fields) > 3 else None, "source": name}
    return None


def _become_subreaper() -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: orphans go to init as usual
        pass


def _kill_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _reap_orphans() -> None:
    """Collect exited orphans reparented to this (subreaper) runner. Only called once the
    command itself was reaped, so its exit status is never taken from Popen."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _group_alive(child: subprocess.Popen, pgid: int) -> bool:
    if child.returncode is None and child.poll() is None:
        return True
    _reap_orphans()
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _wait_group_empty(child: subprocess.Popen, pgid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while _group_alive(child, pgid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def stop_group(child: subprocess.Popen, pgid: int, grace: float) -> None:
    """SIGTERM the process group, SIGKILL what is left after ``grace`` seconds; returns
    once the command was reaped (and, as far as can be seen, the group is empty)."""
    _kill_group(pgid, signal.SIGTERM)
    if not _wait_group_empty(child, pgid, grace):
        _kill_group(pgid, signal.SIGKILL)
        _wait_group_empty(child, pgid, 5.0)
    child.wait()


def _claim(job_dir: Path) -> bool:
    try:
        fd = os.open(job_dir / CLAIM_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    with open(fd, "w", encoding="utf-8") as fh:
        fh.write(f"{os.getpid()} {process_start_time(os.getpid())}\n")
        fh.flush()
        os.fsync(fh.fileno())
    return True


def run(job_dir: Path, command: str, workdir: Path, timeout: Optional[float], grace: float, env: dict) -> int:
    """Run ``command`` as a job in ``job_dir``; returns the recorded exit code."""
    job_dir = Path(job_dir)
    job_dir.mkdir(parents=True, exist_ok=True)
    stop: dict = {"signal": None}

    def on_signal(signum: int, _frame: object) -> None:
        stop["signal"] = signum

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_signal)
    if not _claim(job_dir):
        print(f"job folder {job_dir} was claimed by another runner: not running the command again",
              file=sys.stderr)
        return 0
    _become_subreaper()
    me = f"{os.getpid()}"
    my_start = process_start_time(os.getpid())
    with open(job_dir / LOG_FILE, "ab", buffering=0) as log:
        if not Path(workdir).is_dir():
            log.write(f"[mqi] ERROR: working directory {workdir} does not exist\n".encode())
            write_atomic(job_dir / PID_FILE, f"{me} 0 {my_start} -\n")
            write_atomic(job_dir / EXIT_FILE, f"{WORKDIR_MISSING_EXIT_CODE}\n")
            return WORKDIR_MISSING_EXIT_CODE
        try:
            child = subprocess.Popen(["/bin/sh", "-c", command], cwd=workdir, stdin=subprocess.DEVNULL,
                                     stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                     env={**os.environ, **env})
        except OSError as exc:
            log.write(f"[mqi] ERROR: cannot start the command: {exc}\n".encode())
            write_atomic(job_dir / PID_FILE, f"{me} 0 {my_start} -\n")
            write_atomic(job_dir / EXIT_FILE, "127\n")
            return 127
        pgid = child.pid  # start_new_session: the child leads its own session and group
        write_atomic(job_dir / PID_FILE, f"{me} {pgid} {my_start} {process_start_time(child.pid) or '-'}\n")
        deadline = time.monotonic() + timeout if timeout and timeout > 0 else None
        timed_out = False
        while True:
            try:
                child.wait(timeout=0.1)
                break
            except subprocess.TimeoutExpired:
                pass
            if stop["signal"] is not None:
                log.write(f"\n[mqi] got signal {stop['signal']}: stopping the process group\n".encode())
                stop_group(child, pgid, grace)
                write_atomic(job_dir / KILLED_FILE, f"{stop['signal']}\n")
                break
            if deadline is not None and time.monotonic() >= deadline:
                timed_out = True
                log.write(f"\n[mqi] timed out after {timeout:g}s: stopping the process group\n".encode())
                stop_group(child, pgid, grace)
                break
        code = child.returncode
        if _group_alive(child, pgid):
            log.write(b"\n[mqi] the command left processes behind in its group: stopping them\n")
            stop_group(child, pgid, grace)
        if code < 0:  # killed by a signal: report it the way a shell does
            code = 128 - code
        if timed_out:
            code = TIMEOUT_EXIT_CODE
            write_atomic(job_dir / TIMED_OUT_FILE, f"{timeout}\n")
        write_atomic(job_dir / EXIT_FILE, f"{code}\n")
    return code


def _parse_env(items: list[str], parser: argparse.ArgumentParser) -> dict:
    env = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key or "\x00" in item:
            parser.error(f"--env wants KEY=VALUE, got {item!r}")
        env[key] = value
    return env


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mqi_framework.jobrunner",
                                     description="Run one shell command detached, as a job.")
    parser.add_argument("job_dir", type=Path)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--timeout", type=float, help="seconds; the process group is killed after that")
    parser.add_argument("--grace", type=float, default=5.0, help="seconds between SIGTERM and SIGKILL")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE")
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" not in argv:
        parser.error("give the command as ONE string after --")
    split = argv.index("--")
    args = parser.parse_args(argv[:split])
    command = argv[split + 1:]
    if len(command) != 1:
        parser.error("give the command as ONE string after --")
    env = _parse_env(args.env, parser)
    return run(args.job_dir, command[0], args.workdir, args.timeout, args.grace, env)


if __name__ == "__main__":
    sys.exit(main())
