"""The one retry model (docs/concepts.md, "Retries"), through the real runtime: a conductor
and a prepare worker over the embedded broker, in this process.

A handler that raises is a failed attempt, reported at once and acked: the step's
``retry.max_attempts`` is the total number of tries (never multiplied by the broker's
``max_attempts``); a PermanentError is tried once; a ConnectionError (host unreachable)
does not use up the step's tries."""

from __future__ import annotations

import time

import pytest

from mqi_framework import protocols as p
from mqi_framework.config import load_config
from mqi_framework.kinds import EVENTS_QUEUE, command_queue
from mqi_framework.roles import PrepareRole
from mqi_framework.worker import WorkerRuntime
from mqi_framework.workspace import fast_config, write_workspace

PLAN = {"beams": [{"number": 1, "name": "B1", "delivery_dir": "d1"}], "missing": [], "info": {},
        "inputs": {"1": "beams/1/in"}}


@pytest.fixture
def host(tmp_path):
    def make(max_attempts: int):
        data = fast_config()
        data["broker"]["max_attempts"] = 5
        data["workflow"]["steps"][0]["retry"] = {"max_attempts": max_attempts, "backoff_seconds": 0.05}
        loaded = load_config(write_workspace(tmp_path, data))
        runtimes = [WorkerRuntime(loaded, "conductor"), WorkerRuntime(loaded, "prepare")]
        made.extend(runtimes)
        return runtimes

    made: list[WorkerRuntime] = []
    yield make
    for runtime in made:
        runtime.close()


def run_case(conductor: WorkerRuntime, prepare: WorkerRuntime, *, until, timeout: float = 30.0) -> None:
    prepare.broker.publish(EVENTS_QUEUE, {"type": "case.seen", "worker": "scan", "name": "C1", "path": "/in/C1",
                                          "inbox": "/in", "reason": "marker"})
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not until():
        conductor.step_once(wait=0.02)
        prepare.step_once(wait=0.02)


def step_row(conductor: WorkerRuntime):
    return conductor.conn.execute("SELECT * FROM steps WHERE name = 'prepare'").fetchone()


def outcomes(conductor: WorkerRuntime) -> list[str]:
    return [r[0] for r in conductor.conn.execute("SELECT a.outcome FROM attempts a JOIN steps s ON s.id = a.step_id "
                                                 "WHERE s.name = 'prepare' ORDER BY a.attempt")]


def case_state(conductor: WorkerRuntime) -> str:
    row = conductor.conn.execute("SELECT state FROM cases WHERE name = 'C1'").fetchone()
    return row[0] if row else ""


def raising(monkeypatch, errors):
    calls: list[int] = []

    def run(self, body):
        calls.append(body["attempt"])
        self.begin(body)
        error = errors(len(calls))
        if error is not None:
            raise error
        self.finished(body, "ok", "prepared", data=PLAN)

    monkeypatch.setattr(PrepareRole, "run", run)
    return calls


def test_a_step_that_always_raises_is_tried_exactly_retry_max_attempts_times(host, monkeypatch):
    conductor, prepare = host(max_attempts=3)
    calls = raising(monkeypatch, lambda n: RuntimeError(f"boom {n}"))
    run_case(conductor, prepare, until=lambda: case_state(conductor) == "failed")
    assert case_state(conductor) == "failed"
    assert calls == [1, 2, 3]  # 3 tries in all, not 3 x broker.max_attempts (5)
    assert outcomes(conductor) == ["failed"] * 3
    assert "RuntimeError: boom 3" in step_row(conductor)["message"]
    assert prepare.broker.dlq_list() == []  # failures are results, not dead letters
    assert prepare.broker.depth(command_queue("prepare")) == 0


def test_a_permanent_error_is_tried_once(host, monkeypatch):
    conductor, prepare = host(max_attempts=3)
    calls = raising(monkeypatch, lambda n: p.PermanentError("cannot ever work"))
    run_case(conductor, prepare, until=lambda: case_state(conductor) == "failed")
    assert calls == [1] and case_state(conductor) == "failed"
    assert prepare.broker.dlq_list() == []


def test_a_permanent_connection_error_fails_at_once_and_is_not_unreachable(host, monkeypatch):
    """Issue 19: a changed host key or refused credentials (mqi-ssh's HostKeyError and
    AuthError are ConnectionErrors *and* PermanentErrors) fail the step at once with the
    reason, instead of backing off as "unreachable" for an hour."""

    class HostKeyChanged(ConnectionError, p.PermanentError):
        pass

    conductor, prepare = host(max_attempts=3)
    calls = raising(monkeypatch, lambda n: HostKeyChanged("host key of gpu1:22 CHANGED"))
    run_case(conductor, prepare, until=lambda: case_state(conductor) == "failed")
    assert calls == [1] and outcomes(conductor) == ["failed"]
    assert "CHANGED" in step_row(conductor)["message"]


def test_an_unreachable_host_does_not_use_up_the_steps_tries(host, monkeypatch):
    conductor, prepare = host(max_attempts=1)
    calls = raising(monkeypatch, lambda n: ConnectionError("cannot reach gpu1") if n <= 3 else None)
    run_case(conductor, prepare, until=lambda: (step_row(conductor) or {"state": ""})["state"] == "done")
    assert calls == [1, 2, 3, 4]
    assert outcomes(conductor) == ["unreachable"] * 3 + ["ok"]
    assert case_state(conductor) == "uploading"
