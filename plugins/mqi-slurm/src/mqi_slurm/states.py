"""Slurm's words: parsing ``sbatch --parsable``, ``squeue`` and ``sacct`` output, and
mapping Slurm job states to the host's :class:`~mqi_framework.protocols.JobStatus`.

Mapping (``docs/gpus-and-slurm.md`` has the table for people):

* still going – PENDING, CONFIGURING, RUNNING, COMPLETING, SUSPENDED, REQUEUED,
  REQUEUE_HOLD, REQUEUE_FED, RESIZING, SIGNALING, STAGE_OUT, STOPPED, RESV_DEL_HOLD,
  POWER_UP_NODE: ``running``;
* COMPLETED, FAILED, CANCELLED, OUT_OF_MEMORY, SPECIAL_EXIT: ``exited`` with the exit code
  the job script wrote (else Slurm's: 1 for FAILED, 143 for CANCELLED, as a shell reports
  SIGTERM, 137 for OUT_OF_MEMORY, as for SIGKILL);
* TIMEOUT, DEADLINE: ``exited`` with ``timed_out``;
* NODE_FAIL, PREEMPTED, BOOT_FAIL, REVOKED: ``lost`` (retryable: the job never had a fair run).

A job that is in neither ``squeue`` nor ``sacct`` (purged, accounting disabled) is judged by
the exit-code file its script wrote: exited with that code, or ``lost`` without one.
"""

from __future__ import annotations

from typing import Optional

import attrs

from mqi_framework.protocols import JobStatus

RUNNING_STATES = frozenset({
    "PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED",
    "RESIZING", "SIGNALING", "STAGE_OUT", "STOPPED", "RESV_DEL_HOLD", "POWER_UP_NODE", "UPDATE_DB",
})
EXITED_STATES = {"COMPLETED": 0, "FAILED": 1, "CANCELLED": 143, "OUT_OF_MEMORY": 137, "SPECIAL_EXIT": 1}
TIMEOUT_STATES = frozenset({"TIMEOUT", "DEADLINE"})
LOST_STATES = frozenset({"NODE_FAIL", "PREEMPTED", "BOOT_FAIL", "REVOKED"})
FINAL_STATES = frozenset(EXITED_STATES) | TIMEOUT_STATES | LOST_STATES

SQUEUE_FORMAT = "%i|%T|%r"
SACCT_FORMAT = "JobIDRaw,State,ExitCode"

EXPLAIN = {
    "CANCELLED": "cancelled in Slurm (scancel by someone else, or an administrator)",
    "OUT_OF_MEMORY": "Slurm killed it: it used more memory than it asked for (raise `memory`)",
    "NODE_FAIL": "the node it ran on failed",
    "PREEMPTED": "preempted by a job of higher priority",
    "BOOT_FAIL": "the node failed to boot",
    "REVOKED": "revoked (federation)",
    "TIMEOUT": "Slurm's time limit was reached",
    "DEADLINE": "the job's deadline was reached",
    "SPECIAL_EXIT": "held by Slurm in SPECIAL_EXIT",
}


class SlurmOutputError(Exception):
    """A Slurm command printed something this parser does not understand."""


@attrs.frozen
class SlurmJob:
    """One job as squeue or sacct reports it."""

    job_id: str
    state: str  # first word, upper case: "CANCELLED by 0" -> "CANCELLED"
    reason: str = ""
    exit_code: Optional[int] = None  # from sacct's ExitCode (code:signal), when known
    source: str = "squeue"

    @property
    def final(self) -> bool:
        return self.state in FINAL_STATES


def parse_sbatch(stdout: str) -> str:
    """The job id from ``sbatch --parsable`` (``123`` or ``123;cluster``)."""
    lines = [line.strip() for line in stdout.splitlines() if line.strip()]
    if not lines:
        raise SlurmOutputError("sbatch --parsable printed nothing")
    job_id = lines[-1].split(";")[0].strip()
    if not job_id.isdigit():
        raise SlurmOutputError(f"sbatch --parsable printed {lines[-1]!r}, not a job id")
    return job_id


def normalise_state(text: str) -> str:
    word = text.strip().split(" ")[0].rstrip("+").upper()
    return word


def parse_exit_code(text: str) -> Optional[int]:
    """sacct's ``ExitCode`` ``code:signal`` as a shell would report it (signal n -> 128+n)."""
    text = text.strip()
    if not text:
        return None
    code, _, signal = text.partition(":")
    try:
        code_i, signal_i = int(code), int(signal or 0)
    except ValueError:
        return None
    return 128 + signal_i if signal_i else code_i


def parse_squeue(stdout: str) -> dict[str, SlurmJob]:
    """Lines of ``squeue --noheader --format=%i|%T|%r``."""
    jobs: dict[str, SlurmJob] = {}
    for line in stdout.splitlines():
        if not line.strip():
            continue
        parts = line.strip().split("|")
        if len(parts) < 2 or not parts[0].split("_")[0].isdigit():
            raise SlurmOutputError(f"unexpected squeue line {line!r}")
        reason = parts[2].strip() if len(parts) > 2 else ""
        jobs[parts[0].strip()] = SlurmJob(parts[0].strip(), normalise_state(parts[1]),
                                          "" if reason == "None" else reason, None, "squeue")
    return jobs


def parse_sacct(stdout: str) -> dict[str, SlurmJob]:
    """Lines of ``sacct --noheader --parsable2 --allocations --format=JobIDRaw,State,ExitCode``
    (job steps such as ``123.batch`` are ignored)."""
    jobs: dict[str, SlurmJob] = {}
    for line in stdout.splitlines():
        if not line.strip():
            continue
        parts = line.strip().split("|")
        if len(parts) < 3:
            raise SlurmOutputError(f"unexpected sacct line {line!r}")
        job_id = parts[0].strip()
        if "." in job_id:
            continue
        if not job_id.split("_")[0].isdigit():
            raise SlurmOutputError(f"unexpected sacct line {line!r}")
        jobs[job_id] = SlurmJob(job_id, normalise_state(parts[1]), "", parse_exit_code(parts[2]), "sacct")
    return jobs


def job_status(job: Optional[SlurmJob], exit_file: Optional[int], timed_out_file: bool) -> JobStatus:
    """Map what Slurm says (``job``, None when Slurm no longer knows the job) and what the job
    script wrote (its exit code, and whether its own timeout fired) to a JobStatus."""
    if job is None:
        if exit_file is not None:
            return JobStatus("exited", exit_code=exit_file, timed_out=timed_out_file)
        return JobStatus("lost", message="Slurm no longer knows the job and it wrote no exit code")
    state = job.state
    if state in RUNNING_STATES:
        return JobStatus("running", message=f"{state}{' (' + job.reason + ')' if job.reason else ''}")
    if state in TIMEOUT_STATES:
        return JobStatus("exited", exit_code=exit_file if exit_file is not None else job.exit_code, timed_out=True,
                         message=f"Slurm: {state}: {EXPLAIN[state]}")
    if state in LOST_STATES:
        return JobStatus("lost", message=f"Slurm: {state}: {EXPLAIN[state]}")
    if state in EXITED_STATES:
        code = exit_file if exit_file is not None else job.exit_code
        if code is None or (state != "COMPLETED" and code == 0 and exit_file is None):
            code = EXITED_STATES[state]
        message = f"Slurm: {state}: {EXPLAIN[state]}" if state in EXPLAIN else ""
        return JobStatus("exited", exit_code=code, timed_out=timed_out_file, message=message)
    # A state this version does not know: keep waiting rather than guess an outcome.
    return JobStatus("running", message=f"unknown Slurm state {state}")
