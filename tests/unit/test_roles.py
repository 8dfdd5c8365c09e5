"""Roles on their own: what they do with ``run_step`` and ``cancel_step`` commands, kept in
the worker's ledger. The fake runtime has no state database at all: a role that tried to
read the conductor's tables would fail here."""

from __future__ import annotations

import stat
from pathlib import Path
from typing import Any, Optional

import pytest

from mqi_framework import protocols as p
from mqi_framework.ledger import Ledger, ledger_path
from mqi_framework.roles import ExecuteRole, ScanRole, TransferRole


class Runtime:
    """What a role may use of the worker runtime (no ``conn``: no state database)."""

    def __init__(self, workspace: Path, name: str = "execute") -> None:
        self.name = name
        self.reports: list[tuple[str, dict]] = []
        self.ledger = Ledger(ledger_path(workspace, name))

    def report(self, event_type: str, **fields: Any) -> None:
        self.reports.append((event_type, fields))

    def keep_alive(self) -> None:
        pass

    def build_interpreter(self) -> Any:  # pragma: no cover - no log rules in these tests
        raise AssertionError("not needed")

    def finals(self) -> list[tuple[int, str, str]]:
        return [(f["attempt"], f["outcome"], f["message"]) for t, f in self.reports if t == "step.finished"]


class FakeExecutor:
    name = "fake"

    def __init__(self) -> None:
        self.started: list[str] = []
        self.killed: list[str] = []
        self.state: dict[str, p.JobStatus] = {}

    def start(self, spec: p.JobSpec) -> p.JobHandle:
        self.started.append(spec.job_key)
        self.state.setdefault(spec.job_key, p.JobStatus("running"))
        return p.JobHandle("fake", spec.job_key, {"pid": 1})

    def poll(self, handle: p.JobHandle) -> p.JobStatus:
        return self.state[handle.job_key]

    def kill(self, handle: p.JobHandle) -> None:
        self.killed.append(handle.job_key)
        self.state[handle.job_key] = p.JobStatus("exited", exit_code=-9)

    def read_log(self, handle: p.JobHandle, max_bytes: int = 65536) -> str:
        return "log"

    def missing_outputs(self, patterns: list[str]) -> list[str]:
        return []

    def progress(self, handle: p.JobHandle) -> Optional[tuple[float, str]]:
        return None


def run_step(step_id: int = 1, attempt: int = 1) -> dict:
    return {"type": "run_step", "step_id": step_id, "attempt": attempt, "case": "case-000001", "beam": 1,
            "step": "simulate", "job_key": f"case-000001-simulate-b1-a{attempt}", "command": "true", "workdir": "/",
            "timeout": None, "env": {}, "outputs": [], "log_rules": False}


def cancel_step(step_id: int = 1, attempt: int = 1) -> dict:
    return {"type": "cancel_step", "step_id": step_id, "attempt": attempt, "reason": "case cancelled by cli"}


@pytest.fixture
def execute(tmp_path):
    runtime, executor = Runtime(tmp_path), FakeExecutor()
    return runtime, executor, ExecuteRole(runtime, executor)


def test_a_run_command_that_arrives_after_its_cancel_is_never_run(execute):
    runtime, executor, role = execute
    role.handle(cancel_step())
    role.handle(run_step())
    role.tick()
    assert executor.started == []
    assert runtime.finals() == [(1, "cancelled", "cancelled before it started")] * 2
    assert not [t for t, _ in runtime.reports if t == "step.started"]


def test_cancel_kills_a_running_job_once(execute):
    runtime, executor, role = execute
    role.handle(run_step())
    role.tick()
    assert executor.started == ["case-000001-simulate-b1-a1"] and runtime.finals() == []
    role.handle(cancel_step())
    role.tick()
    role.handle(cancel_step())  # a duplicate cancel changes nothing
    assert executor.killed == ["case-000001-simulate-b1-a1"]
    assert runtime.finals() == [(1, "cancelled", "killed on cancel")]


def test_a_restarted_worker_reattaches_from_its_ledger(tmp_path):
    first, executor = Runtime(tmp_path), FakeExecutor()
    ExecuteRole(first, executor).handle(run_step())
    first.ledger.close()  # SIGKILL: nothing but the ledger survives
    again = Runtime(tmp_path)
    role = ExecuteRole(again, executor)
    role.tick()
    assert again.finals() == []  # still running: polled, not started again
    executor.state["case-000001-simulate-b1-a1"] = p.JobStatus("exited", exit_code=0)
    role.tick()
    role.tick()
    assert again.finals() == [(1, "ok", "exit code 0")]  # reported once
    assert executor.started == ["case-000001-simulate-b1-a1"]


def test_a_worker_that_died_between_start_and_ledger_kills_the_job_on_cancel(tmp_path):
    """Issue 13.1: the executor started the job, the worker died before it recorded the
    handle; the command was dead-lettered and the conductor gave the attempt up. The cancel
    must find the job by its key and kill it, not report "cancelled before it started"."""
    first, executor = Runtime(tmp_path), FakeExecutor()

    class DiesAfterStart(FakeExecutor):
        def start(self, spec: p.JobSpec) -> p.JobHandle:
            handle = executor.start(spec)
            raise SystemExit(f"SIGKILL after starting {handle.job_key}")

    with pytest.raises(SystemExit):
        ExecuteRole(first, DiesAfterStart()).handle(run_step())
    first.ledger.close()
    again = Runtime(tmp_path)
    role = ExecuteRole(again, executor)
    role.handle(cancel_step())
    assert executor.started == ["case-000001-simulate-b1-a1"] * 2  # re-attached by job key
    assert executor.killed == ["case-000001-simulate-b1-a1"]
    assert again.finals() == [(1, "cancelled", "killed on cancel")]
    role.handle(run_step())  # a late re-delivery is dropped
    assert executor.started == ["case-000001-simulate-b1-a1"] * 2


def test_a_redelivered_command_starts_nothing_twice(execute):
    runtime, executor, role = execute
    role.handle(run_step())
    role.handle(run_step())  # its ack was lost: the same job is reported started again
    assert executor.started == ["case-000001-simulate-b1-a1"]
    assert [t for t, _ in runtime.reports].count("step.started") == 2
    executor.state["case-000001-simulate-b1-a1"] = p.JobStatus("exited", exit_code=3)
    role.tick()
    role.handle(run_step())  # after the final report: dropped
    assert executor.started == ["case-000001-simulate-b1-a1"] and runtime.finals() == [(1, "failed", "exit code 3")]


def test_cancel_of_one_attempt_leaves_the_next_alone(execute):
    runtime, executor, role = execute
    role.handle(cancel_step(attempt=1))
    role.handle(run_step(attempt=2))
    assert executor.started == ["case-000001-simulate-b1-a2"]


class AnswerLost(FakeExecutor):
    """Starts the job, then loses the answer ``lose`` times; raises ConnectionError (host
    away) while ``away``."""

    def __init__(self, lose: int = 1) -> None:
        super().__init__()
        self.lose = lose
        self.away = False

    def start(self, spec: p.JobSpec) -> p.JobHandle:
        if self.away:
            raise ConnectionError("cannot reach the host")
        handle = super().start(spec)
        if self.lose:
            self.lose -= 1
            raise p.StartUnconfirmed(f"starting {spec.job_key}: connection dropped while a command ran")
        return handle


def quick(role: ExecuteRole) -> ExecuteRole:
    role.CONFIRM_FIRST_SECONDS = role.CONFIRM_MAX_SECONDS = 0.0
    return role


def test_a_start_whose_answer_was_lost_is_confirmed_not_failed(tmp_path):
    """The fault campaign's finding: sshd dropped the connection while the start command ran;
    the attempt was failed as unreachable and a second attempt ran the beam beside the first.
    Now the attempt stays, and the same job key is asked again until it is answered."""
    runtime, executor = Runtime(tmp_path), AnswerLost(lose=1)
    role = quick(ExecuteRole(runtime, executor))
    role.handle(run_step())
    assert runtime.reports == []  # neither started nor failed: unknown yet
    executor.away = True
    role.tick()
    assert runtime.reports == []
    executor.away = False
    role.tick()
    assert [t for t, _ in runtime.reports] == ["step.started"]
    assert set(executor.state) == {"case-000001-simulate-b1-a1"}  # one job, re-attached by its key
    executor.state["case-000001-simulate-b1-a1"] = p.JobStatus("exited", exit_code=0)
    role.tick()
    role.tick()
    assert runtime.finals() == [(1, "ok", "exit code 0")]


def test_a_cancel_while_the_start_is_unconfirmed_kills_the_job_when_the_host_answers(tmp_path):
    runtime, executor = Runtime(tmp_path), AnswerLost(lose=1)
    role = quick(ExecuteRole(runtime, executor))
    role.handle(run_step())
    executor.away = True
    role.handle(cancel_step())  # no exception, no report: the job may run
    assert runtime.finals() == [] and executor.killed == []
    executor.away = False
    role.tick()
    assert executor.killed == ["case-000001-simulate-b1-a1"]
    assert runtime.finals() == [(1, "cancelled", "killed on cancel")]
    role.tick()
    assert executor.killed == ["case-000001-simulate-b1-a1"] and len(runtime.finals()) == 1


def test_an_unconfirmed_start_survives_a_worker_restart(tmp_path):
    first, executor = Runtime(tmp_path), AnswerLost(lose=1)
    ExecuteRole(first, executor).handle(run_step())
    first.ledger.close()
    again = Runtime(tmp_path)
    quick(ExecuteRole(again, executor)).tick()
    assert [t for t, _ in again.reports] == ["step.started"]


class FakeTransfer:
    name = "fake"

    def __init__(self) -> None:
        self.calls = 0

    def upload(self, local: Path, remote: str, progress: Any) -> p.TransferResult:
        self.calls += 1
        return p.TransferResult(files=1, bytes=2, skipped=0)


def test_transfer_drops_a_cancelled_or_finished_command(tmp_path):
    runtime, transfer = Runtime(tmp_path, "transfer"), FakeTransfer()
    role = TransferRole(runtime, transfer)
    body = dict(run_step(), direction="upload", staging_dir=str(tmp_path), remote_dir="/r")
    role.handle(cancel_step())
    role.handle(body)
    assert transfer.calls == 0 and runtime.finals()[-1][1] == "cancelled"
    role.handle(dict(body, attempt=2))
    role.handle(dict(body, attempt=2))  # re-delivered after its result was reported
    assert transfer.calls == 1
    role.handle(cancel_step(attempt=2))  # too late: it is done; nothing more is reported
    assert [f[:2] for f in runtime.finals()] == [(1, "cancelled"), (1, "cancelled"), (2, "ok")]


class FakeScanner:
    name = "fake"

    def __init__(self, names: list[str]) -> None:
        self.names = names

    def scan(self) -> list[p.CaseCandidate]:
        return [p.CaseCandidate(case_id=n, path=Path("/in") / n, inbox=Path("/in"), ready=True, reason="marker")
                for n in self.names]


def test_the_scanner_announces_each_folder_once_across_restarts(tmp_path):
    scanner = FakeScanner(["PAT1", "PAT2"])
    runtime = Runtime(tmp_path, "scan")
    ScanRole(runtime, scanner).tick()
    runtime.ledger.close()
    again = Runtime(tmp_path, "scan")
    role = ScanRole(again, scanner)
    role.tick()
    assert [f["name"] for _, f in runtime.reports] == ["PAT1", "PAT2"] and again.reports == []
    scanner.names = ["PAT2"]  # PAT1 left the inbox: forgotten
    role.tick()
    assert again.ledger.announced() == {"PAT2"}
    scanner.names = ["PAT1", "PAT2"]
    role.tick()
    assert [f["name"] for _, f in again.reports] == ["PAT1"]  # back again: announced (the conductor ignores it)


def test_the_ledger_is_private_to_its_worker(tmp_path):
    ledger = Ledger(ledger_path(tmp_path, "scan"))
    ledger.announce("PATIENT-ID")
    path = ledger_path(tmp_path, "scan")
    assert path == tmp_path / "workers" / "scan.db"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    for extra in (Path(str(path) + "-wal"), Path(str(path) + "-shm")):
        if extra.exists():
            assert stat.S_IMODE(extra.stat().st_mode) & 0o077 == 0
    assert ledger.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_a_reattached_job_is_announced_once(tmp_path):
    first, executor = Runtime(tmp_path), FakeExecutor()
    ExecuteRole(first, executor).handle(run_step())
    assert not [t for t, _ in first.reports if t == "step.reattached"]  # started here: not a re-attachment
    first.ledger.close()
    again = Runtime(tmp_path)
    role = ExecuteRole(again, executor)
    role.tick()
    role.tick()
    assert [t for t, _ in again.reports].count("step.reattached") == 1


def test_a_permanent_error_while_polling_fails_the_attempt_at_once(execute):
    """Issue 19: a host key that changed while a job ran read as "unreachable" until the job
    was given up as lost."""
    runtime, executor, role = execute
    role.handle(run_step())

    def refuse(handle):
        raise p.PermanentError("host key of gpu1 changed")

    executor.poll = refuse
    role.tick()
    [(attempt, outcome, message)] = runtime.finals()
    assert (attempt, outcome) == (1, "failed") and "host key of gpu1 changed" in message and "may still run" in message
    assert [f.get("permanent") for t, f in runtime.reports if t == "step.finished"] == [True]
    role.tick()
    assert len(runtime.finals()) == 1  # reported once
