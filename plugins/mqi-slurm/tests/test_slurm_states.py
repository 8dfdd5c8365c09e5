"""Canned Slurm output: parsing, and the mapping of every Slurm state to a job status."""

from __future__ import annotations

from pathlib import Path

import pytest

from mqi_slurm import states as st

FIXTURES = Path(__file__).parent / "fixtures"


def canned(name: str) -> str:
    return (FIXTURES / name).read_text()


def test_sbatch_parsable():
    assert st.parse_sbatch(canned("sbatch_parsable.txt")) == "4242"
    assert st.parse_sbatch(canned("sbatch_parsable_cluster.txt")) == "4243"
    for bad in ("", "Submitted batch job 12\n", "error: x\n"):
        with pytest.raises(st.SlurmOutputError):
            st.parse_sbatch(bad)


def test_squeue_lines():
    jobs = st.parse_squeue(canned("squeue_all_states.txt"))
    assert len(jobs) == 14
    assert jobs["101"] == st.SlurmJob("101", "PENDING", "Resources", None, "squeue")
    assert jobs["103"].reason == "" and jobs["106"].reason == "NonZeroExitCode"
    with pytest.raises(st.SlurmOutputError):
        st.parse_squeue("JOBID|STATE\n")


def test_sacct_lines_skip_steps_and_read_exit_codes():
    jobs = st.parse_sacct(canned("sacct_all_states.txt"))
    assert "201.batch" not in jobs and len(jobs) == 11
    assert jobs["202"].exit_code == 3
    assert jobs["204"].state == "CANCELLED" and jobs["204"].exit_code == 143  # "CANCELLED by 0", signal 15
    assert jobs["206"].exit_code == 128 + 125
    assert st.parse_exit_code("") is None and st.parse_exit_code("x:y") is None and st.parse_exit_code("2:0") == 2


# state, exit code written by the job script, its timed_out marker -> (state, exit code, timed out, message part)
SQUEUE_CASES = [
    ("101", None, False, ("running", None, False, "PENDING (Resources)")),
    ("102", None, False, ("running", None, False, "PENDING (Priority)")),
    ("103", None, False, ("running", None, False, "RUNNING")),
    ("104", None, False, ("running", None, False, "COMPLETING")),
    ("105", 0, False, ("exited", 0, False, "")),
    ("105", None, False, ("exited", 0, False, "")),
    ("106", 3, False, ("exited", 3, False, "")),
    ("106", None, False, ("exited", 1, False, "")),
    ("106", 124, True, ("exited", 124, True, "")),  # the script's own timeout fired
    ("107", None, False, ("exited", None, True, "TIMEOUT")),
    ("108", None, False, ("exited", 143, False, "cancelled in Slurm")),
    ("109", None, False, ("lost", None, False, "NODE_FAIL: the node it ran on failed")),
    ("110", None, False, ("exited", 137, False, "OUT_OF_MEMORY")),
    ("111", None, False, ("lost", None, False, "PREEMPTED")),
    ("112", None, False, ("running", None, False, "SUSPENDED")),
    ("113", None, False, ("running", None, False, "REQUEUED (BeginTime)")),
    ("114", None, False, ("running", None, False, "CONFIGURING")),
]


@pytest.mark.parametrize("job_id, exit_file, timed_out, expected", SQUEUE_CASES)
def test_every_squeue_state_maps(job_id, exit_file, timed_out, expected):
    job = st.parse_squeue(canned("squeue_all_states.txt"))[job_id]
    status = st.job_status(job, exit_file, timed_out)
    assert (status.state, status.exit_code, status.timed_out) == expected[:3]
    assert expected[3] in status.message


SACCT_CASES = [
    ("201", ("exited", 0, False)), ("202", ("exited", 3, False)), ("203", ("exited", 0, True)),
    ("204", ("exited", 143, False)), ("205", ("lost", None, False)), ("206", ("exited", 253, False)),
    ("207", ("lost", None, False)), ("208", ("running", None, False)), ("209", ("running", None, False)),
    ("210", ("lost", None, False)), ("211", ("exited", 0, True)),
]


@pytest.mark.parametrize("job_id, expected", SACCT_CASES)
def test_every_sacct_state_maps_without_exit_file(job_id, expected):
    job = st.parse_sacct(canned("sacct_all_states.txt"))[job_id]
    status = st.job_status(job, None, False)
    assert (status.state, status.exit_code, status.timed_out) == expected


def test_unknown_and_forgotten_jobs():
    assert st.job_status(None, 0, False).state == "exited"
    assert st.job_status(None, 124, True).timed_out
    lost = st.job_status(None, None, False)
    assert lost.state == "lost" and "no exit code" in lost.message
    odd = st.job_status(st.SlurmJob("1", "SOMETHING_NEW"), None, False)
    assert odd.state == "running" and "unknown Slurm state" in odd.message
    assert st.normalise_state("cancelled+ ") == "CANCELLED"
