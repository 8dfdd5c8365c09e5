"""``ssh`` executor: runs each job detached on a GPU server over SSH and polls it.

A job is started by one remote command (see :mod:`mqi_ssh.remote`): the job folder is
claimed with ``mkdir``, a supervisor in its own session starts the command in a new
session / process group with its output in ``output.log`` and writes ``exit_code`` when
it ends. The handle (host name + job folder) is stored by the host, so a restarted worker,
or one whose connection dropped, polls the same job again: a job key is never run twice.

Polling reads the job's status with one short command; a job whose host rebooted (the
boot id changed) or whose processes vanished without an exit code is ``lost`` and the
step's retry policy starts a new attempt. Timeouts are enforced on the host by the
supervisor (the process group is killed, exit 124); ``kill`` stops the whole group.

Jobs are routed to the host of their GPU (``JobSpec.gpu["host"]``, the host name the GPU
curator reported) when it is one of ``hosts``, else to the default ``host``.
"""

from __future__ import annotations

import logging
import posixpath
import shlex
import time
from typing import Optional

import attrs

from mqi_framework.protocols import (Executor, JobHandle, JobSpec, JobStatus, PermanentError, PluginContext,
                                     StartUnconfirmed)
from mqi_framework.toolkit import PathEscapeError, job_log_fields, safe_component
from mqi_ssh import remote, remotepath
from mqi_ssh.connection import SshConnection, SshError, connect
from mqi_ssh.errors import SshCommandInterrupted
from mqi_ssh.settings import SshHostSettings

log = logging.getLogger(__name__)


def _check_hosts(instance: object, attribute: attrs.Attribute, value: dict) -> None:
    if not value:
        raise ValueError("hosts: name at least one SSH host")


@attrs.frozen
class SshExecutorSettings:
    """Settings of the ``ssh`` executor."""

    #: the SSH hosts jobs may run on, by name (the names the GPU curator reports)
    hosts: dict[str, SshHostSettings] = attrs.field(validator=_check_hosts)
    #: default host for jobs whose GPU host is not in ``hosts``; default: the only host
    host: Optional[str] = None
    #: job folders on the host; relative: inside the host's ``root`` (or its login folder)
    jobs_dir: str = ".mqi-jobs"
    #: seconds between SIGTERM and SIGKILL to a job's process group (timeout, cancel)
    kill_grace_seconds: int = 10
    #: a job claimed but without a recorded pid after this long is lost (its start failed)
    start_timeout_seconds: float = 120.0
    #: a host unreachable this long while jobs run: those jobs are reported lost (retried)
    unreachable_lost_after_seconds: float = 3600.0
    #: at most one status command per host this often, for all its running jobs at once
    poll_interval_seconds: float = 2.0

    def __attrs_post_init__(self) -> None:
        if self.host is not None and self.host not in self.hosts:
            raise ValueError(f"host: {self.host!r} is not one of hosts ({', '.join(self.hosts)})")


class SshExecutor(Executor):
    """Detached jobs on SSH hosts: claim, supervisor, exit-code file, re-attach by job key."""

    name = "ssh"
    settings_class = SshExecutorSettings

    def __init__(self, settings: SshExecutorSettings, context: PluginContext) -> None:
        super().__init__(settings, context)
        self._connections: dict[str, SshConnection] = {}
        self._unreachable_since: dict[str, float] = {}
        self._warned_at: dict[str, float] = {}
        #: jobs reported lost while their host was unreachable: killed once it answers again,
        #: so that a job that was only cut off does not hold a GPU the retry may be given
        self._abandoned: dict[str, dict[str, str]] = {}
        #: per host: job folders polled lately, and the last answer for all of them
        self._watched: dict[str, dict[str, float]] = {}
        self._status_cache: dict[str, tuple[float, dict[str, list[str]]]] = {}
        self._last_host: Optional[str] = None
        self._info: list[str] = []

    # ------------------------------------------------------------------ hosts

    def _default_host(self) -> str:
        if self.settings.host is not None:
            return self.settings.host
        if len(self.settings.hosts) == 1:
            return next(iter(self.settings.hosts))
        raise PermanentError(f"the job names no GPU host of {', '.join(self.settings.hosts)} and no default "
                             f"`host:` is set in the ssh executor's settings")

    def _route(self, spec: JobSpec) -> str:
        gpu_host = (spec.gpu or {}).get("host")
        if gpu_host in self.settings.hosts:
            return str(gpu_host)
        return self._default_host()

    def _conn(self, host: str) -> SshConnection:
        if host not in self.settings.hosts:
            raise PermanentError(f"host {host!r} is no longer in the ssh executor's hosts")
        conn = self._connections.get(host)
        if conn is None:
            conn = self._connections[host] = connect(self.settings.hosts[host])
        return conn

    def _jobs_dir(self, host: str) -> str:
        return remotepath.inside_root(self.settings.jobs_dir, self.settings.hosts[host].root)

    def _inside(self, host: str, path: str) -> str:
        try:
            return remotepath.inside_root(path, self.settings.hosts[host].root)
        except PathEscapeError as exc:
            raise PermanentError(str(exc)) from None

    # ------------------------------------------------------------------ check

    def program_problem(self, program: str) -> Optional[str]:
        missing = []
        for name in self.settings.hosts:
            try:
                found = self._conn(name).run(f"command -v -- {shlex.quote(program)}", timeout=30)
            except (SshError, TimeoutError):
                continue  # check() reports the host itself
            if found.returncode != 0:
                missing.append(name)
        if missing:
            return (f"{program}: command not found on {', '.join(missing)} (not on the PATH of a shell there; "
                    "give its full path in the command)")
        return None

    def check(self) -> list[str]:
        problems: list[str] = []
        self._info = []
        for name, host in self.settings.hosts.items():
            bad_root = host.check_root() or remotepath.remote_root_problem(self.context.remote_root, host.root, name)
            if bad_root:
                problems.append(f"hosts.{name}: {bad_root}")
                continue
            if host.root is None:
                self._info.append(f"host {name}: no `root` set: remote paths are not confined to a folder")
            try:
                jobs = self._jobs_dir(name)
            except PathEscapeError as exc:
                problems.append(f"hosts.{name}: jobs_dir: {exc}")
                continue
            conn = self._conn(name)
            try:
                self._info.append(conn.known_key_line(name))
                probe = conn.run(remote.script_call(
                    'command -v setsid >/dev/null || { echo "setsid (util-linux) is missing"; exit 1; }\n'
                    'if [ -n "$2" ] && [ ! -d "$2" ]; then echo "root $2 does not exist"; exit 1; fi\n'
                    'mkdir -p -- "$1" 2>&1 || exit 1\n[ -w "$1" ] || { echo "not writable"; exit 1; }',
                    "mqi-check", jobs, host.root or ""))
                if probe.returncode != 0:
                    problems.append(f"hosts.{name}: {(probe.stdout + probe.stderr).strip()} (jobs folder {jobs})")
            except (SshError, TimeoutError) as exc:
                problems.append(f"hosts.{name}: {exc}")
        if self.settings.host is None and len(self.settings.hosts) > 1:
            self._info.append("no default `host:`: every job must run on a GPU of one of the hosts")
        return problems

    def check_info(self) -> list[str]:
        return list(self._info)

    # ------------------------------------------------------------------ start

    def start(self, spec: JobSpec) -> JobHandle:
        host = self._route(spec)
        jobs = self._jobs_dir(host)
        job_dir = posixpath.join(jobs, safe_component(spec.job_key))
        workdir = self._inside(host, spec.workdir)
        try:
            command = remote.with_env(spec.command, spec.env)
        except ValueError as exc:
            raise PermanentError(str(exc)) from None
        line = remote.launch(jobs, job_dir, workdir, spec.timeout, self.settings.kill_grace_seconds, command)
        try:
            result = self._conn(host).run(line, timeout=60)
        except (SshCommandInterrupted, TimeoutError) as exc:  # sent, answer lost: it may run
            raise StartUnconfirmed(f"starting job {spec.job_key} on {host}: {exc}") from None
        said = result.stdout.strip().splitlines()
        if result.returncode != 0 or not said or said[-1] not in ("started", "attached"):
            raise RuntimeError(f"starting job {spec.job_key} on {host} failed (exit {result.returncode}): "
                               f"{(result.stderr or result.stdout).strip()[:300]}")
        if said[-1] == "attached":
            log.info("%s host=%s: started before: re-attaching", job_log_fields(spec.job_key), host)
        return JobHandle(executor=self.name, job_key=spec.job_key, data={"host": host, "job_dir": job_dir})

    # ------------------------------------------------------------------ poll / kill

    def poll(self, handle: JobHandle) -> JobStatus:
        host, job_dir = handle.data["host"], handle.data["job_dir"]
        self._last_host = host
        try:
            words = self._status_words(host, job_dir)
        except (SshError, TimeoutError) as exc:
            status = self._unreachable(host, exc)
            if status.state == "lost":
                self._abandoned.setdefault(host, {})[job_dir] = handle.job_key
            return status
        if not words:
            raise RuntimeError(f"reading the status of job {handle.job_key} on {host} gave no answer")
        kind = words[0]
        if kind == "exited":
            try:
                code = int(words[1])
            except (IndexError, ValueError):
                return JobStatus("lost", message=f"unreadable exit code file in {job_dir}")
            return JobStatus("exited", exit_code=code, timed_out="timed_out" in words[2:],
                             message="killed on request" if "killed" in words[2:] else "")
        if kind == "running":
            return JobStatus("running")
        if kind == "starting":
            age = float(words[1]) if len(words) > 1 and words[1].lstrip("-").isdigit() else 0.0
            if age < self.settings.start_timeout_seconds:
                return JobStatus("running", message="starting")
            return JobStatus("lost", message=f"claimed on {host} but never started (see {job_dir}/supervisor.log)")
        if kind == "rebooted":
            return JobStatus("lost", message=f"{host} rebooted while the job ran")
        if kind == "missing":
            return JobStatus("lost", message=f"job folder {job_dir} is gone from {host}")
        return JobStatus("lost", message=f"the job's processes on {host} are gone and it left no exit code")

    def _status_words(self, host: str, job_dir: str) -> list[str]:
        """The status line of ``job_dir``, from one command that reads every job this worker
        polled on ``host`` lately, run at most every ``poll_interval_seconds`` per host (so a
        tick over many running beams costs one round trip, not one each)."""
        now = time.monotonic()
        watched = self._watched.setdefault(host, {})
        watched[job_dir] = now
        cached = self._status_cache.get(host)
        if cached is not None and job_dir in cached[1] and now - cached[0] < self.settings.poll_interval_seconds:
            return cached[1][job_dir]
        dirs = [d for d, seen in watched.items() if now - seen < 600.0]  # forget jobs nobody asks about
        self._watched[host] = {d: watched[d] for d in dirs}
        result = self._conn(host).run(remote.script_call(remote.STATUS, "mqi-status", *dirs), timeout=30)
        self._unreachable_since.pop(host, None)
        lines = result.stdout.strip().splitlines()
        if result.returncode != 0 or len(lines) != len(dirs):
            raise RuntimeError(f"reading the status of {len(dirs)} job(s) on {host} failed "
                               f"(exit {result.returncode}, {len(lines)} lines): {result.stderr.strip()[:300]}")
        answers = {d: line.split() for d, line in zip(dirs, lines)}
        self._status_cache[host] = (now, answers)
        self._kill_abandoned(host)
        return answers[job_dir]

    def _forget_status(self, host: str) -> None:
        self._status_cache.pop(host, None)

    def _unreachable(self, host: str, exc: Exception) -> JobStatus:
        now = time.monotonic()
        since = self._unreachable_since.setdefault(host, now)
        if now - since >= self.settings.unreachable_lost_after_seconds:
            return JobStatus("lost", message=f"{host} unreachable for {now - since:.0f}s: {exc}")
        if now - self._warned_at.get(host, -1e9) >= 60.0:  # once a minute per host, not once per poll
            self._warned_at[host] = now
            log.warning("SSH host %s unreachable (%s); its jobs keep running there, polling again", host, exc)
        return JobStatus("running", message=f"host unreachable: {exc}")

    def _kill_abandoned(self, host: str) -> None:
        for job_dir, job_key in list(self._abandoned.get(host, {}).items()):
            try:
                self.kill(JobHandle(executor=self.name, job_key=job_key, data={"host": host, "job_dir": job_dir}))
            except (SshError, TimeoutError, RuntimeError) as exc:
                log.warning("%s host=%s: given up while the host was away; killing it failed: %s",
                            job_log_fields(job_key), host, exc)
                return
            log.warning("%s host=%s: given up while the host was away: killed now that it answers",
                        job_log_fields(job_key), host)
            self._abandoned[host].pop(job_dir, None)

    def kill(self, handle: JobHandle) -> None:
        host, job_dir = handle.data["host"], handle.data["job_dir"]
        grace = self.settings.kill_grace_seconds
        self._forget_status(host)
        result = self._conn(host).run(remote.script_call(remote.KILL, "mqi-kill", job_dir, grace), timeout=grace + 30)
        if result.returncode != 0:
            raise RuntimeError(f"killing job {handle.job_key} on {host} failed (exit {result.returncode}): "
                               f"{result.stderr.strip()[:300]}")
        log.info("%s host=%s: %s", job_log_fields(handle.job_key), host, result.stdout.strip() or "kill sent")

    # ------------------------------------------------------------------ outputs

    def read_log(self, handle: JobHandle, max_bytes: int = 65536) -> str:
        host, job_dir = handle.data["host"], handle.data["job_dir"]
        try:
            with self._conn(host).sftp() as sftp:
                return remotepath.tail(sftp, posixpath.join(job_dir, "output.log"), max_bytes)
        except (SshError, TimeoutError) as exc:
            log.warning("%s host=%s: cannot read the job's log: %s", job_log_fields(handle.job_key), host, exc)
            return ""

    def missing_outputs(self, patterns: list[str]) -> list[str]:
        if not patterns:
            return []
        host = self._last_host if self._last_host in self.settings.hosts else self._default_host()
        with self._conn(host).sftp() as sftp:
            return [p for p in patterns if not remotepath.glob_exists(sftp, p)]

    def close(self) -> None:
        for conn in self._connections.values():
            conn.close()
        self._connections.clear()

