"""The ``slurm`` executor: one Slurm batch job per step attempt.

Per job key a folder ``<jobs_dir>/<job key>/`` holds ``command.sh`` (the rendered command),
``job.sh`` (the batch script), ``output.log``, and what the script writes when it ends:
``exit_code`` and, when its own timeout fired, ``timed_out``. ``job_id`` is written right
after ``sbatch --parsable`` answers; a key whose folder has a ``job_id`` is re-attached,
never submitted again. A crash between ``sbatch`` and writing ``job_id`` is covered by the
``submitting`` marker: the job is then looked up by its name (``mqi-<job key>``) first.

Polling is batched: whatever the number of running jobs, at most one ``squeue`` call (plus
one ``sacct`` call for jobs squeue no longer lists) every ``poll_interval_seconds``.
"""

from __future__ import annotations

import logging
import math
import posixpath
import re
import shlex
import time
from pathlib import Path
from typing import Any, Optional

import attrs

from mqi_framework.protocols import Executor, JobHandle, JobSpec, JobStatus, PluginContext, StartUnconfirmed
from mqi_framework.toolkit import PluginMissing, job_log_fields, safe_component
from mqi_slurm import states as st
from mqi_slurm.site import CommandResult, LocalSite, Site, SshSite

log = logging.getLogger(__name__)

ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
SACCT_RETRY_SECONDS = 600.0  # after "accounting disabled", sacct is not asked again for this long


@attrs.frozen
class SlurmSettings:
    """Settings of the ``slurm`` executor."""

    jobs_dir: Optional[str] = None  # job folders; must be shared with the compute nodes (default <workspace>/jobs/slurm)
    partition: Optional[str] = None  # sbatch --partition
    account: Optional[str] = None  # sbatch --account
    qos: Optional[str] = None  # sbatch --qos
    gres: Optional[str] = None  # sbatch --gres, e.g. "gpu:1": Slurm picks the GPU and sets CUDA_VISIBLE_DEVICES
    cpus_per_task: Optional[int] = None  # sbatch --cpus-per-task
    memory: Optional[str] = None  # sbatch --mem, e.g. "16G"
    extra_args: list[str] = attrs.field(factory=list)  # more sbatch options, e.g. ["--constraint=a100"]
    default_time: Optional[str] = None  # sbatch --time for steps without timeout_seconds (Slurm syntax)
    time_margin_seconds: float = 120.0  # Slurm's limit = step timeout + this (the script enforces the timeout itself)
    kill_grace_seconds: float = 10.0  # SIGTERM -> SIGKILL when the step's timeout fires
    poll_interval_seconds: float = 5.0  # at most one squeue (+ sacct) call this often, for all jobs together
    command_timeout_seconds: float = 30.0  # sbatch, squeue, sacct, scancel running longer are failures
    bin_dir: Optional[str] = None  # folder of sbatch, squeue, sacct, scancel (default: PATH)
    ssh: Optional[dict[str, Any]] = None  # submit on a login node over mqi-ssh (its connection settings)


class SlurmExecutor(Executor):
    """Steps as Slurm batch jobs; batched polling; re-attach by job key."""

    name = "slurm"
    settings_class = SlurmSettings

    def __init__(self, settings: Optional[SlurmSettings], context: PluginContext) -> None:
        super().__init__(settings or SlurmSettings(), context)
        s = self.settings
        if s.jobs_dir and (s.ssh is not None or posixpath.isabs(s.jobs_dir)):
            self.jobs_dir = s.jobs_dir
        else:
            self.jobs_dir = str(Path(context.workspace) / (s.jobs_dir or "jobs/slurm"))
        self.site: Site = SshSite(s.ssh, s.command_timeout_seconds) if s.ssh is not None else LocalSite()
        self._tracked: dict[str, float] = {}  # job id -> last time poll() asked for it
        self._known: dict[str, st.SlurmJob] = {}  # job id -> latest squeue/sacct view
        self._gone: set[str] = set()  # ids neither squeue nor sacct knew at the last refresh
        self._queried: set[str] = set()  # ids the last refresh asked about
        self._last_refresh = -math.inf
        self._sacct_off_until = -math.inf
        self._refresh_problem = ""

    # ------------------------------------------------------------------ helpers

    def _cmd(self, name: str) -> str:
        return posixpath.join(self.settings.bin_dir, name) if self.settings.bin_dir else name

    def _run(self, argv: list[str]) -> CommandResult:
        return self.site.run(argv, self.settings.command_timeout_seconds)

    def _job_dir(self, job_key: str) -> str:
        return posixpath.join(self.jobs_dir, safe_component(job_key))

    @staticmethod
    def job_name(job_key: str) -> str:
        return "mqi-" + re.sub(r"[^A-Za-z0-9._-]", "_", job_key)[:200]

    def check(self) -> list[str]:
        if self.settings.ssh is not None and not posixpath.isabs(self.settings.jobs_dir or ""):
            return [f"with ssh:, jobs_dir must be an absolute path on the login node shared with the compute "
                    f"nodes (got {self.settings.jobs_dir!r})"]
        try:
            result = self._run([self._cmd("sbatch"), "--version"])
        except PluginMissing as exc:  # an ssh: site without mqi-ssh installed
            return [str(exc)]
        if result.returncode != 0:
            return [f"sbatch {self.site.where} does not run: {result.problem()}"]
        probe = self._run([self._cmd("squeue"), "--noheader", "--states=all", "--format=%i", "--jobs=1"])
        if probe.returncode != 0 and "Invalid job id" not in probe.stderr:
            return [f"squeue {self.site.where} cannot reach the Slurm controller: {probe.problem()}"]
        try:
            self.site.write_text(posixpath.join(self.jobs_dir, ".mqi-check"), "ok\n")
        except OSError as exc:
            return [f"jobs folder {self.jobs_dir} is not writable {self.site.where}: {exc}"]
        return []

    def program_problem(self, program: str) -> Optional[str]:
        """Probed where jobs are submitted (this machine or the login node): compute nodes
        normally share that software; a program missing there is missing on them too."""
        try:
            found = self._run(["sh", "-c", f"command -v -- {shlex.quote(program)}"])
        except (PluginMissing, OSError, TimeoutError):
            return None  # check() reports the site itself
        if found.returncode != 0:
            return (f"{program}: command not found {self.site.where} (where jobs are submitted; not on the PATH of "
                    "a shell there: give its full path in the command)")
        return None

    # ------------------------------------------------------------------ start

    def script(self, spec: JobSpec, job_dir: str) -> str:
        """The batch script for ``spec`` (the command itself is in command.sh beside it)."""
        s = self.settings
        q = shlex.quote
        lines = ["#!/bin/bash", "# sbatch options with paths are on the command line (see sbatch_argv)"]
        if spec.timeout:
            lines.append(f"#SBATCH --time={max(1, math.ceil((spec.timeout + s.time_margin_seconds) / 60))}")
        elif s.default_time:
            lines.append(f"#SBATCH --time={s.default_time}")
        for flag, value in (("--partition", s.partition), ("--account", s.account), ("--qos", s.qos),
                            ("--gres", s.gres), ("--cpus-per-task", s.cpus_per_task), ("--mem", s.memory)):
            if value not in (None, ""):
                lines.append(f"#SBATCH {flag}={value}")
        lines += [f"#SBATCH {arg}" for arg in s.extra_args]
        lines += [f"# written by mqi-slurm for job key {spec.job_key}", f"d={q(job_dir)}",
                  'rm -f "$d/exit_code" "$d/timed_out"', 'echo "mqi-slurm: job $SLURM_JOB_ID on $(hostname)"']
        for key, value in spec.env.items():
            if not ENV_NAME.match(str(key)):
                raise ValueError(f"environment variable name {key!r} is not valid in a shell")
            lines.append(f"export {key}={q(str(value))}")
        lines += [f"cd {q(spec.workdir)} || {{ echo \"mqi-slurm: cannot enter the work folder\" >&2; "
                  f"echo 1 > \"$d/exit_code.tmp\"; mv -f \"$d/exit_code.tmp\" \"$d/exit_code\"; exit 1; }}",
                  "started=$(date +%s)"]
        if spec.timeout:
            secs = max(1, math.ceil(spec.timeout))
            lines += [f"timeout --kill-after={max(1, math.ceil(s.kill_grace_seconds))} {secs} /bin/sh \"$d/command.sh\"",
                      "code=$?",
                      f"if [ \"$code\" = 124 ] || {{ [ \"$code\" = 137 ] && [ $(( $(date +%s) - started )) -ge {secs} ]; }}; "
                      f"then touch \"$d/timed_out\"; fi"]
        else:
            lines += ["/bin/sh \"$d/command.sh\"", "code=$?"]
        lines += ['echo "$code" > "$d/exit_code.tmp" && mv -f "$d/exit_code.tmp" "$d/exit_code"', 'exit "$code"', ""]
        return "\n".join(lines)

    def sbatch_argv(self, job_key: str, job_dir: str) -> list[str]:
        """``sbatch`` with the options that hold paths as separate arguments (never parsed
        from ``#SBATCH`` lines, so a space in a path is safe)."""
        return [self._cmd("sbatch"), "--parsable", f"--job-name={self.job_name(job_key)}",
                f"--output={posixpath.join(job_dir, 'output.log')}", "--open-mode=append", f"--chdir={job_dir}",
                posixpath.join(job_dir, "job.sh")]

    def _handle(self, spec_key: str, job_dir: str, job_id: str) -> JobHandle:
        return JobHandle(executor=self.name, job_key=spec_key,
                         data={"job_id": job_id, "job_dir": job_dir, "job_name": self.job_name(spec_key)})

    def start(self, spec: JobSpec) -> JobHandle:
        if self.settings.ssh is not None and not posixpath.isabs(self.settings.jobs_dir or ""):
            raise ValueError("with ssh:, jobs_dir must be an absolute path on the login node (see mqi-host check)")
        job_dir = self._job_dir(spec.job_key)
        known = (self.site.read_text(posixpath.join(job_dir, "job_id")) or "").strip()
        if known:
            log.info("%s slurm_job=%s: submitted before: re-attaching", job_log_fields(spec.job_key), known)
            return self._handle(spec.job_key, job_dir, known)
        if self.site.exists(posixpath.join(job_dir, "submitting")):
            found = self._find_by_name(self.job_name(spec.job_key))
            if found is None and self.site.exists(posixpath.join(job_dir, "exit_code")):
                found = "0"  # it ran and Slurm forgot it: the exit-code file tells the outcome
            if found is not None:
                log.warning("%s slurm_job=%s: submitted before its id was recorded: adopting it",
                            job_log_fields(spec.job_key), found)
                self.site.write_text(posixpath.join(job_dir, "job_id"), found + "\n")
                return self._handle(spec.job_key, job_dir, found)
        self.site.write_text(posixpath.join(job_dir, "command.sh"), spec.command + "\n", executable=True)
        self.site.write_text(posixpath.join(job_dir, "job.sh"), self.script(spec, job_dir), executable=True)
        self.site.write_text(posixpath.join(job_dir, "submitting"), f"{time.time()}\n")
        try:
            result = self._run(self.sbatch_argv(spec.job_key, job_dir))
        except (ConnectionError, TimeoutError) as exc:  # sbatch may have queued it: ask again by name
            raise StartUnconfirmed(f"submitting job {spec.job_key} on {self.site.where}: {exc}") from None
        if result.returncode != 0:
            raise RuntimeError(f"sbatch {self.site.where} refused job {spec.job_key}: {result.problem()}")
        job_id = st.parse_sbatch(result.stdout)
        self.site.write_text(posixpath.join(job_dir, "job_id"), job_id + "\n")
        log.info("%s slurm_job=%s: submitted", job_log_fields(spec.job_key), job_id)
        self._tracked[job_id] = time.monotonic()
        return self._handle(spec.job_key, job_dir, job_id)

    def _find_by_name(self, name: str) -> Optional[str]:
        result = self._run([self._cmd("squeue"), "--noheader", "--states=all", f"--name={name}", "--format=%i"])
        ids = [line.strip() for line in result.stdout.splitlines() if line.strip()] if result.returncode == 0 else []
        if not ids and time.monotonic() >= self._sacct_off_until:
            acct = self._run([self._cmd("sacct"), "--noheader", "--parsable2", "--allocations", f"--name={name}",
                              "--format=JobIDRaw"])
            if acct.returncode == 0:
                ids = [line.strip() for line in acct.stdout.splitlines() if line.strip()]
        return ids[-1] if ids else None

    # ------------------------------------------------------------------ poll

    def refresh(self) -> None:
        """One squeue call for every tracked job, then one sacct call for those it lacks."""
        now = time.monotonic()
        horizon = now - max(60.0, 20 * self.settings.poll_interval_seconds)
        self._tracked = {j: t for j, t in self._tracked.items() if t >= horizon}
        ids = sorted(j for j in self._tracked if j != "0")
        self._last_refresh = now
        self._queried = set(ids)
        if not ids:
            return
        result = self._run([self._cmd("squeue"), "--noheader", "--states=all", f"--format={st.SQUEUE_FORMAT}",
                            "--jobs=" + ",".join(ids)])
        if result.returncode == 0:
            found = st.parse_squeue(result.stdout)
        elif "Invalid job id" in result.stderr:
            found = {}  # none of them is known any more (purged after MinJobAge)
        else:
            self._queried = set()
            self._problem(f"squeue {self.site.where} failed: {result.problem()}; job states unknown, waiting")
            return
        missing = [j for j in ids if j not in found]
        if missing and now >= self._sacct_off_until:
            acct = self._run([self._cmd("sacct"), "--noheader", "--parsable2", "--allocations",
                              f"--format={st.SACCT_FORMAT}", "--jobs=" + ",".join(missing)])
            if acct.returncode == 0:
                found.update(st.parse_sacct(acct.stdout))
            else:
                self._sacct_off_until = now + SACCT_RETRY_SECONDS
                log.info("sacct %s is not usable (%s): finished jobs are judged by their exit-code files",
                         self.site.where, acct.problem())
        self._known.update(found)
        self._gone = {j for j in ids if j not in found}
        self._problem("")

    def _problem(self, problem: str) -> None:
        if problem and problem != self._refresh_problem:
            log.warning("%s", problem)
        elif not problem and self._refresh_problem:
            log.info("Slurm answers again")
        self._refresh_problem = problem

    def poll(self, handle: JobHandle) -> JobStatus:
        job_id = str(handle.data.get("job_id") or "0")
        now = time.monotonic()
        self._tracked[job_id] = now
        if now - self._last_refresh >= self.settings.poll_interval_seconds:
            self.refresh()
        if job_id != "0" and job_id not in self._queried:
            # Tracked since the last squeue call (or that call failed): the next refresh asks.
            return JobStatus("running", message="Slurm not asked about it yet")
        job = None if job_id in self._gone else self._known.get(job_id)
        if job is not None and not job.final:
            return st.job_status(job, None, False)
        exit_code, timed_out = self._exit_files(handle)
        status = st.job_status(job, exit_code, timed_out)
        if status.state != "running":
            self._known.pop(job_id, None)
            self._tracked.pop(job_id, None)
        return status

    def _exit_files(self, handle: JobHandle) -> tuple[Optional[int], bool]:
        job_dir = handle.data["job_dir"]
        text = self.site.read_text(posixpath.join(job_dir, "exit_code"))
        code = None
        if text is not None and text.strip().lstrip("-").isdigit():
            code = int(text.strip())
        return code, self.site.exists(posixpath.join(job_dir, "timed_out"))

    def progress(self, handle: JobHandle) -> Optional[tuple[float, str]]:
        job = self._known.get(str(handle.data.get("job_id")))
        if job is not None and job.state == "PENDING":
            return 0.0, f"pending in Slurm{' (' + job.reason + ')' if job.reason else ''}"
        return None

    # ------------------------------------------------------------------ kill, logs, outputs

    def kill(self, handle: JobHandle) -> None:
        job_id = str(handle.data.get("job_id") or "0")
        if job_id == "0":
            return
        result = self._run([self._cmd("scancel"), job_id])
        if result.returncode != 0 and "Invalid job id" not in result.stderr:
            raise RuntimeError(f"scancel {job_id} {self.site.where} failed: {result.problem()}")
        deadline = time.monotonic() + self.settings.kill_grace_seconds + 20
        while time.monotonic() < deadline:  # report "killed" only once Slurm has ended it
            check = self._run([self._cmd("squeue"), "--noheader", "--states=all", f"--format={st.SQUEUE_FORMAT}",
                               f"--jobs={job_id}"])
            if check.returncode != 0:
                return  # no longer known: gone
            job = st.parse_squeue(check.stdout).get(job_id)
            if job is None or job.final:
                return
            time.sleep(0.5)
        log.warning("Slurm job %s still not ended %.0fs after scancel", job_id, self.settings.kill_grace_seconds + 20)

    def read_log(self, handle: JobHandle, max_bytes: int = 65536) -> str:
        return self.site.tail(posixpath.join(handle.data["job_dir"], "output.log"), max_bytes)

    def missing_outputs(self, patterns: list[str]) -> list[str]:
        return self.site.missing(patterns)

    def close(self) -> None:
        self.site.close()
