"""``core.local`` executor: runs jobs on this machine, detached through
:mod:`mqi_framework.jobrunner`, and finds them again after a restart."""

from __future__ import annotations

import glob
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import attrs

from mqi_framework import hookimpl
from mqi_framework.jobrunner import process_start_time
from mqi_framework.protocols import Executor, JobHandle, JobSpec, JobStatus
from mqi_framework.safepath import safe_component

log = logging.getLogger(__name__)


@attrs.frozen
class LocalExecutorSettings:
    """Settings of the ``core.local`` executor."""

    jobs_dir: Optional[str] = None  # default: <workspace>/jobs
    kill_grace_seconds: float = 5.0


class LocalExecutor(Executor):
    """Detached local jobs: own session, output.log, exit_code file; re-attach by job key."""

    name = "core.local"
    settings_class = LocalExecutorSettings

    def __init__(self, settings: Optional[LocalExecutorSettings], context) -> None:  # type: ignore[no-untyped-def]
        super().__init__(settings or LocalExecutorSettings(), context)
        base = Path(self.settings.jobs_dir) if self.settings.jobs_dir else Path("jobs")
        self.jobs_dir = base if base.is_absolute() else Path(context.workspace) / base
        self._children: list[subprocess.Popen] = []

    def check(self) -> list[str]:
        try:
            self.jobs_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            return [f"jobs folder {self.jobs_dir} cannot be created: {exc}"]
        return [] if os.access(self.jobs_dir, os.W_OK) else [f"jobs folder {self.jobs_dir} is not writable"]

    def _job_dir(self, job_key: str) -> Path:
        return self.jobs_dir / safe_component(job_key)

    def _handle(self, job_key: str, job_dir: Path) -> JobHandle:
        runner_pid, child_pgid, start = (job_dir / "pid").read_text().split()
        return JobHandle(executor=self.name, job_key=job_key,
                         data={"job_dir": str(job_dir), "pid": int(runner_pid), "pgid": int(child_pgid),
                               "start_time": start})

    def start(self, spec: JobSpec) -> JobHandle:
        self._reap()
        job_dir = self._job_dir(spec.job_key)
        if (job_dir / "pid").exists():
            log.info("job %s was started before: re-attaching", spec.job_key)
            return self._handle(spec.job_key, job_dir)
        job_dir.mkdir(parents=True, exist_ok=True)
        argv = [sys.executable, "-m", "mqi_framework.jobrunner", str(job_dir), "--workdir", spec.workdir,
                "--grace", str(self.settings.kill_grace_seconds)]
        if spec.timeout:
            argv += ["--timeout", str(spec.timeout)]
        for key, value in spec.env.items():
            argv += ["--env", f"{key}={value}"]
        argv += ["--", spec.command]
        with open(job_dir / "runner.log", "ab") as runner_log:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=runner_log, stderr=subprocess.STDOUT,
                                    start_new_session=True, close_fds=True)
        self._children.append(proc)
        deadline = time.monotonic() + 30
        while not (job_dir / "pid").exists():
            if proc.poll() is not None and not (job_dir / "pid").exists():
                raise RuntimeError(f"job runner for {spec.job_key} exited with {proc.returncode} before starting; "
                                   f"see {job_dir / 'runner.log'}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"job runner for {spec.job_key} did not start within 30s")
            time.sleep(0.01)
        return self._handle(spec.job_key, job_dir)

    def _reap(self) -> None:
        """Collect exited runners this process started (no zombies in a long-lived worker)."""
        self._children = [p for p in self._children if p.poll() is None]

    def _runner_alive(self, handle: JobHandle) -> bool:
        return process_start_time(int(handle.data["pid"])) == handle.data.get("start_time")

    def poll(self, handle: JobHandle) -> JobStatus:
        self._reap()
        job_dir = Path(handle.data["job_dir"])
        exit_file = job_dir / "exit_code"
        if exit_file.exists():
            code = int(exit_file.read_text().strip() or "1")
            return JobStatus("exited", exit_code=code, timed_out=(job_dir / "timed_out").exists())
        if not job_dir.is_dir():
            return JobStatus("lost", message="the job folder is gone")
        if self._runner_alive(handle):
            return JobStatus("running")
        if exit_file.exists():  # finished between the two checks
            return self.poll(handle)
        return JobStatus("lost", message="the job runner died without an exit code (machine restarted?)")

    def kill(self, handle: JobHandle) -> None:
        job_dir = Path(handle.data["job_dir"])
        if (job_dir / "exit_code").exists():
            return
        if self._runner_alive(handle):
            os.kill(int(handle.data["pid"]), signal.SIGTERM)  # the runner kills the group and records the code
            deadline = time.monotonic() + self.settings.kill_grace_seconds + 10
            while time.monotonic() < deadline and not (job_dir / "exit_code").exists():
                time.sleep(0.05)
                self._reap()
            if (job_dir / "exit_code").exists():
                return
        pgid = int(handle.data.get("pgid") or 0)
        if pgid > 0:  # the runner is gone: kill what is left of the job itself
            try:
                os.killpg(pgid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    def read_log(self, handle: JobHandle, max_bytes: int = 65536) -> str:
        path = Path(handle.data["job_dir"]) / "output.log"
        try:
            with open(path, "rb") as fh:
                fh.seek(0, os.SEEK_END)
                size = fh.tell()
                fh.seek(max(0, size - max_bytes))
                return fh.read().decode("utf-8", errors="replace")
        except OSError:
            return ""

    def missing_outputs(self, patterns: list[str]) -> list[str]:
        return [pattern for pattern in patterns if not glob.glob(pattern)]

    def close(self) -> None:
        self._reap()


@hookimpl
def mqi_register_executors(register):  # type: ignore[no-untyped-def]
    register(LocalExecutor)
