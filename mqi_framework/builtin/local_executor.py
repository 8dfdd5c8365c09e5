"""``core.local`` executor: runs jobs on this machine, detached through
:mod:`mqi_framework.jobrunner`, and finds them again after a restart.

A job lives in ``<jobs_dir>/<safe_component(job_key)>/`` (see the job runner for the
files there). Starting a key whose folder already holds a started job re-attaches to it;
the runner's exclusive claim makes sure a command never runs twice, even when two
workers race or one crashed halfway through ``start``. No shell is used anywhere but
the ``/bin/sh -c`` that runs the (already quoted) command itself.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator, Optional

import attrs

from mqi_framework import hookimpl
from mqi_framework.jobrunner import (
    CLAIM_FILE,
    EXIT_FILE,
    KILLED_FILE,
    LOG_FILE,
    TIMED_OUT_FILE,
    process_start_time,
    read_pid_file,
)
from mqi_framework.logfields import from_job_key
from mqi_framework.protocols import Executor, JobHandle, JobSpec, JobStatus, PluginContext
from mqi_framework.safepath import safe_component

log = logging.getLogger(__name__)

RUNNER_LOG = "runner.log"
START_LOCK = "start.lock"
#: how long ``start`` waits for a new runner to record its pid
START_TIMEOUT = 30.0


@attrs.frozen
class LocalExecutorSettings:
    """Settings of the ``core.local`` executor."""

    jobs_dir: Optional[str] = None  # default: <workspace>/jobs; relative: inside the workspace
    kill_grace_seconds: float = 5.0  # between SIGTERM and SIGKILL to a job's process group


def _alive(pid: int, start_time: Optional[str]) -> bool:
    """``pid`` runs and is the same process (same kernel start time) as recorded."""
    if pid <= 0 or not start_time:
        return False
    now = process_start_time(pid)
    if now != start_time:
        return False
    try:  # a zombie (exited, not yet reaped) is not alive
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _group_exists(pgid: int) -> bool:
    if pgid <= 0:
        return False
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class LocalExecutor(Executor):
    """Detached local jobs: own session, output.log, exit_code file; re-attach by job key."""

    name = "core.local"
    settings_class = LocalExecutorSettings

    def __init__(self, settings: Optional[LocalExecutorSettings], context: PluginContext) -> None:
        super().__init__(settings or LocalExecutorSettings(), context)
        base = Path(self.settings.jobs_dir) if self.settings.jobs_dir else Path("jobs")
        self.jobs_dir = base if base.is_absolute() else Path(context.workspace) / base
        self._children: list[subprocess.Popen] = []  # runners started here, reaped on every call

    def check(self) -> list[str]:
        try:
            self.jobs_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            return [f"jobs folder {self.jobs_dir} cannot be created: {exc}"]
        return [] if os.access(self.jobs_dir, os.W_OK) else [f"jobs folder {self.jobs_dir} is not writable"]

    def program_problem(self, program: str) -> Optional[str]:
        if "/" in program:
            ok = os.path.isfile(program) and os.access(program, os.X_OK)
            return None if ok else f"{program}: no such executable file on this machine"
        if shutil.which(program) is None:
            return f"{program}: command not found on this machine (not on PATH; give its full path in the command)"
        return None

    # ------------------------------------------------------------------ start

    def job_dir(self, job_key: str) -> Path:
        """The folder of the job ``job_key`` (its output, pid, exit code and any file a
        subclass keeps beside them)."""
        return self.jobs_dir / safe_component(job_key)

    def _handle(self, job_key: str, job_dir: Path, info: Optional[dict]) -> JobHandle:
        info = info or {"pid": 0, "pgid": 0, "start_time": None}
        return JobHandle(executor=self.name, job_key=job_key,
                         data={"job_dir": str(job_dir), "pid": info["pid"], "pgid": info["pgid"],
                               "start_time": info["start_time"]})

    @contextlib.contextmanager
    def _start_lock(self, job_dir: Path) -> Iterator[None]:
        with open(job_dir / START_LOCK, "a+b") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

    def start(self, spec: JobSpec) -> JobHandle:
        self._reap()
        job_dir = self.job_dir(spec.job_key)
        info = read_pid_file(job_dir)
        if info is not None and info["source"] == "pid":
            log.info("%s: started before: re-attaching", from_job_key(spec.job_key))
            return self._handle(spec.job_key, job_dir, info)
        job_dir.mkdir(parents=True, exist_ok=True)
        with self._start_lock(job_dir):
            if (job_dir / CLAIM_FILE).exists():  # started before (maybe by a worker that crashed)
                log.info("%s: started before: re-attaching", from_job_key(spec.job_key))
                return self._wait_started(spec.job_key, job_dir, None)
            argv = [sys.executable, "-m", "mqi_framework.jobrunner", str(job_dir), "--workdir", spec.workdir,
                    "--grace", repr(float(self.settings.kill_grace_seconds))]
            if spec.timeout:
                argv += ["--timeout", repr(float(spec.timeout))]
            for key, value in spec.env.items():
                argv += ["--env", f"{key}={value}"]
            argv += ["--", spec.command]
            with open(job_dir / RUNNER_LOG, "ab") as runner_log:
                proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=runner_log,
                                        stderr=subprocess.STDOUT, start_new_session=True, close_fds=True)
            self._children.append(proc)
            return self._wait_started(spec.job_key, job_dir, proc)

    def _wait_started(self, job_key: str, job_dir: Path, proc: Optional[subprocess.Popen]) -> JobHandle:
        """Wait for the runner's pid file. A runner that claimed the job and died before
        writing it gives a handle that polls as ``lost`` (never a second start)."""
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            info = read_pid_file(job_dir)
            if info is not None and info["source"] == "pid":
                return self._handle(job_key, job_dir, info)
            runner_gone = (proc.poll() is not None) if proc is not None else (
                info is not None and not _alive(info["pid"], info["start_time"]))
            if runner_gone:
                info = read_pid_file(job_dir)
                if info is not None:
                    return self._handle(job_key, job_dir, info)
                if proc is not None and not (job_dir / CLAIM_FILE).exists():
                    raise RuntimeError(f"job runner for {job_key} exited with {proc.returncode} before "
                                       f"starting the job; see {job_dir / RUNNER_LOG}")
            if time.monotonic() > deadline:
                log.warning("%s: the runner did not record its pid within %ss", from_job_key(job_key), START_TIMEOUT)
                return self._handle(job_key, job_dir, info)
            time.sleep(0.01)

    def _reap(self) -> None:
        """Collect exited runners this process started (no zombies in a long-lived worker)."""
        self._children = [p for p in self._children if p.poll() is None]

    # ------------------------------------------------------------------ poll / kill

    @staticmethod
    def _info(handle: JobHandle) -> dict:
        """The freshest pid information: the job folder's files, else the handle."""
        info = read_pid_file(Path(handle.data["job_dir"]))
        if info is None:
            info = {"pid": int(handle.data.get("pid") or 0), "pgid": int(handle.data.get("pgid") or 0),
                    "start_time": handle.data.get("start_time"), "child_start_time": None}
        return info

    @staticmethod
    def _exit_status(job_dir: Path) -> Optional[JobStatus]:
        try:
            text = (job_dir / EXIT_FILE).read_text().strip()
        except OSError:
            return None
        try:
            code = int(text)
        except ValueError:
            return JobStatus("exited", exit_code=1, message=f"unreadable exit code {text!r}")
        timed_out = (job_dir / TIMED_OUT_FILE).exists()
        message = ("timed out: the process group was killed" if timed_out
                   else "killed on request" if (job_dir / KILLED_FILE).exists() else "")
        return JobStatus("exited", exit_code=code, timed_out=timed_out, message=message)

    def poll(self, handle: JobHandle) -> JobStatus:
        self._reap()
        job_dir = Path(handle.data["job_dir"])
        status = self._exit_status(job_dir)
        if status is not None:
            return status
        if not job_dir.is_dir():
            return JobStatus("lost", message=f"the job folder {job_dir} is gone")
        info = self._info(handle)
        if _alive(info["pid"], info["start_time"]):
            return JobStatus("running")
        status = self._exit_status(job_dir)  # finished between the two checks
        if status is not None:
            return status
        message = "the job runner died without writing an exit code (machine restarted or runner killed)"
        if self._kill_leftovers(info):
            message += "; the job's leftover processes were killed"
        return JobStatus("lost", message=message)

    @staticmethod
    def _kill_leftovers(info: dict) -> bool:
        """SIGKILL the process group of a job whose runner is gone, unless its id was
        reused by an unrelated process. True when something was signalled."""
        pgid = int(info.get("pgid") or 0)
        if not _group_exists(pgid):
            return False
        leader_start = process_start_time(pgid)
        recorded = info.get("child_start_time")
        if leader_start is not None and recorded not in (None, "-") and leader_start != recorded:
            return False  # the id now belongs to someone else
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            return False
        return True

    def kill(self, handle: JobHandle) -> None:
        job_dir = Path(handle.data["job_dir"])
        exit_file = job_dir / EXIT_FILE
        if exit_file.exists():
            return
        grace = float(self.settings.kill_grace_seconds)
        info = self._info(handle)
        if _alive(info["pid"], info["start_time"]):
            # the runner stops the group (SIGTERM, SIGKILL after the grace) and records the code
            try:
                os.kill(info["pid"], signal.SIGTERM)
            except ProcessLookupError:
                pass
            if self._wait_for(exit_file, grace + 10):
                return
            info = self._info(handle)
        pgid = int(info.get("pgid") or 0)
        if _group_exists(pgid):  # the runner is gone or stuck: stop the group ourselves
            try:
                os.killpg(pgid, signal.SIGTERM)
            except (ProcessLookupError, PermissionError):
                pass
            deadline = time.monotonic() + grace
            while _group_exists(pgid) and time.monotonic() < deadline:
                time.sleep(0.05)
            self._kill_leftovers(info)
        if _alive(info["pid"], info["start_time"]):
            self._wait_for(exit_file, 5)

    def _wait_for(self, path: Path, seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while not path.exists():
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)
            self._reap()
        return True

    # ------------------------------------------------------------------ outputs

    def read_log(self, handle: JobHandle, max_bytes: int = 65536) -> str:
        path = Path(handle.data["job_dir"]) / LOG_FILE
        try:
            with open(path, "rb") as fh:
                fh.seek(0, os.SEEK_END)
                size = fh.tell()
                fh.seek(max(0, size - max(0, max_bytes)))
                return fh.read().decode("utf-8", errors="replace")
        except OSError:
            return ""

    def missing_outputs(self, patterns: list[str]) -> list[str]:
        return [pattern for pattern in patterns if not glob.glob(pattern, recursive=True)]

    def close(self) -> None:
        self._reap()  # running jobs are left running: they are detached on purpose


@hookimpl
def mqi_register_executors(register):  # type: ignore[no-untyped-def]
    register(LocalExecutor)
