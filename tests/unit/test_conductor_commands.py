"""What the conductor tells workers: a ``cancel_step`` for every in-flight attempt it gives
up, in the same transaction as the state change (the outbox), and the retry bookkeeping of
an unreachable host."""

from __future__ import annotations

import json
import random
import uuid

import pytest

from mqi_framework.conductor import Conductor
from mqi_framework.retry_policy import UNREACHABLE_GIVE_UP_SECONDS
from mqi_framework.config import load_config
from mqi_framework.protocols import GpuReading
from mqi_framework.store import open_state, transaction
from mqi_framework.store import records as rec
from mqi_framework.workspace import fast_config, write_workspace

PLAN = {"beams": [{"number": n, "name": f"B{n}", "delivery_dir": f"d{n}"} for n in (1, 2, 3)], "missing": [],
        "info": {}, "inputs": {str(n): f"beams/{n}/moqui_tps_{n}.in" for n in (1, 2, 3)}}


class Clock:
    now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def env(tmp_path):
    loaded = load_config(write_workspace(tmp_path, fast_config(gpus=2)))
    conn = open_state(loaded.database_path)
    with transaction(conn):
        rec.record_gpu_readings(conn, "test", [GpuReading(host="h", index=i) for i in range(2)])
    clock = Clock()
    return Conductor(loaded, conn, clock=clock, rng=random.Random(1)), conn, clock


def send(conductor, body):
    conductor.handle_event(body, uuid.uuid4().hex)


def outbox(conn, queue, kind):
    rows = conn.execute("SELECT queue, body FROM outbox ORDER BY id").fetchall()
    bodies = [json.loads(r["body"]) for r in rows if r["queue"] == queue]
    return [b for b in bodies if b["type"] == kind]


def finish(conductor, cmd, outcome="ok", **extra):
    send(conductor, {"type": "step.started", "step_id": cmd["step_id"], "attempt": cmd["attempt"]})
    send(conductor, {"type": "step.finished", "step_id": cmd["step_id"], "attempt": cmd["attempt"],
                     "outcome": outcome, **extra})


def to_simulation(conductor, conn):
    send(conductor, {"type": "case.seen", "name": "C1", "path": "/in/C1", "inbox": "/in"})
    finish(conductor, outbox(conn, "mqi.prepare", "run_step")[-1], data=PLAN)
    finish(conductor, outbox(conn, "mqi.transfer", "run_step")[-1])
    return outbox(conn, "mqi.execute", "run_step")


def test_cancel_tells_the_worker_of_each_dispatched_or_running_attempt(env):
    conductor, conn, _ = env
    sims = to_simulation(conductor, conn)
    send(conductor, {"type": "step.started", "step_id": sims[0]["step_id"], "attempt": 1, "job": {"x": 1}})
    assert conductor.cancel("C1") == "cancelling"
    cancels = outbox(conn, "mqi.execute", "cancel_step")
    assert {(c["step_id"], c["attempt"], c["job_key"]) for c in cancels} == {
        (s["step_id"], 1, s["job_key"]) for s in sims}
    assert all(c["reason"] == "case cancelled by cli" for c in cancels)
    assert outbox(conn, "mqi.transfer", "cancel_step") == []  # nothing of the case was in flight there


def test_giving_up_an_unstarted_attempt_cancels_it_at_its_worker(env):
    conductor, conn, clock = env
    sims = to_simulation(conductor, conn)
    clock.now += 3600
    conductor.tick()
    cancels = outbox(conn, "mqi.execute", "cancel_step")
    assert {(c["step_id"], c["attempt"]) for c in cancels} == {(s["step_id"], 1) for s in sims}
    assert all("no worker started it" in c["reason"] for c in cancels)


def test_no_attempt_is_given_up_while_events_wait(env, tmp_path):
    conductor, conn, clock = env

    class Broker:
        def depth(self, queue):
            return 1

    to_simulation(conductor, conn)
    conductor.broker = Broker()
    clock.now += 3600
    conductor.tick()
    assert outbox(conn, "mqi.execute", "cancel_step") == []
    assert {r[0] for r in conn.execute("SELECT state FROM steps WHERE name = 'simulate'")} == {"dispatched", "queued"}


def test_unreachable_attempts_are_free_until_the_cap(env):
    conductor, conn, clock = env
    send(conductor, {"type": "case.seen", "name": "C1", "path": "/in/C1", "inbox": "/in"})
    step_id = outbox(conn, "mqi.prepare", "run_step")[0]["step_id"]
    limit = conn.execute("SELECT max_attempt FROM steps WHERE id = ?", (step_id,)).fetchone()[0]

    def state() -> str:
        return conn.execute("SELECT state FROM steps WHERE id = ?", (step_id,)).fetchone()[0]

    def attempt_unreachable() -> None:
        finish(conductor, outbox(conn, "mqi.prepare", "run_step")[-1], outcome="failed", unreachable=True,
               message="cannot reach gpu1")
        clock.now += 400
        conductor.tick()

    for _ in range(limit + 3):
        attempt_unreachable()
    assert state() == "dispatched" and outbox(conn, "mqi.prepare", "run_step")[-1]["attempt"] == limit + 4
    clock.now += UNREACHABLE_GIVE_UP_SECONDS
    tries = 0
    while state() != "failed" and tries < 10:  # past the cap, unreachable attempts count like any failure
        attempt_unreachable()
        tries += 1
    assert state() == "failed" and tries == limit
    kinds = {r[0] for r in conn.execute("SELECT outcome FROM attempts WHERE step_id = ?", (step_id,))}
    assert kinds == {"unreachable"}


def test_a_restarted_conductor_gives_the_workers_a_full_grace_before_giving_up(env):
    """Issue 13.1: a host down longer than the grace while a simulation started must not,
    on restart, declare the attempt unstarted before its worker re-attached and reported."""
    conductor, conn, clock = env
    sims = to_simulation(conductor, conn)
    clock.now += 3600  # the host was down an hour
    restarted = Conductor(conductor.loaded, conn, clock=clock, rng=random.Random(1))
    restarted.tick()
    assert outbox(conn, "mqi.execute", "cancel_step") == []
    assert conn.execute("SELECT state FROM steps WHERE id = ?", (sims[0]["step_id"],)).fetchone()[0] == "dispatched"
    # the worker re-attached and reported: the attempt simply runs on
    send(restarted, {"type": "step.started", "step_id": sims[0]["step_id"], "attempt": 1,
                     "job": {"executor": "local", "job_key": sims[0]["job_key"], "data": {}}, "worker": "execute"})
    clock.now += 3600
    restarted.tick()
    assert conn.execute("SELECT state FROM steps WHERE id = ?", (sims[0]["step_id"],)).fetchone()[0] == "running"
    cancels = outbox(conn, "mqi.execute", "cancel_step")
    assert [c["step_id"] for c in cancels] == [sims[1]["step_id"]]  # the one nobody ever started


def test_a_late_start_of_a_given_up_attempt_has_its_job_killed(env):
    conductor, conn, clock = env
    sims = to_simulation(conductor, conn)
    clock.now += 3600
    conductor.tick()  # attempt 1 of both beams given up
    before = len(outbox(conn, "mqi.execute", "cancel_step"))
    job = {"executor": "local", "job_key": sims[0]["job_key"], "data": {}}
    send(conductor, {"type": "step.started", "step_id": sims[0]["step_id"], "attempt": 1, "job": job,
                     "worker": "execute"})
    cancels = outbox(conn, "mqi.execute", "cancel_step")
    assert len(cancels) == before + 1
    late = cancels[-1]
    assert (late["step_id"], late["attempt"], late["job_key"]) == (sims[0]["step_id"], 1, sims[0]["job_key"])
    assert "does not run beside" in late["reason"]
    kinds = [r[0] for r in conn.execute("SELECT kind FROM events WHERE step = 'simulate'")]
    assert "step.stale_job_killed" in kinds


def test_a_live_worker_with_commands_queued_is_behind_not_lost(env):
    conductor, conn, clock = env

    class Broker:
        def depth(self, queue):
            return 3 if queue == "mqi.execute" else 0

    to_simulation(conductor, conn)
    conductor.broker = Broker()
    clock.now += 3600
    with transaction(conn):
        rec.worker_state(conn, "execute", "executor", pid=1, state="running")
    conn.execute("UPDATE workers SET heartbeat_at = ? WHERE name = 'execute'", (clock.now,))
    conductor.tick()
    assert outbox(conn, "mqi.execute", "cancel_step") == []
    conn.execute("UPDATE workers SET heartbeat_at = ? WHERE name = 'execute'", (clock.now - 3600,))
    conductor.tick()  # its heartbeat stopped: the commands will not be taken
    assert len(outbox(conn, "mqi.execute", "cancel_step")) == 2


def test_dead_letters_of_a_recovered_step_or_an_ended_case_read_resolved(env):
    """Issue 13.4: dead letters left by a fault the pipeline recovered from say so."""
    from mqi_framework.store import views

    conductor, conn, clock = env
    sims = to_simulation(conductor, conn)
    prepare = outbox(conn, "mqi.prepare", "run_step")[0]
    other = {"type": "case.seen", "name": "C9"}  # no step: nothing to tell
    assert views.dead_letter_resolutions(conn, [sims[0], other]) == [None, None]
    assert views.dead_letter_resolutions(conn, [prepare]) == ["resolved: its step is done"]
    clock.now += 3600
    conductor.tick()  # attempt 1 of both beams given up, attempt 2 follows
    clock.now += 3600
    conductor.tick()
    for cmd in outbox(conn, "mqi.execute", "run_step"):
        if cmd["attempt"] == 2:
            send(conductor, {"type": "step.started", "step_id": cmd["step_id"], "attempt": 2})
    assert views.dead_letter_resolutions(conn, [sims[0]]) == ["resolved: attempt 1 was followed by attempt 2"]
    conductor.cancel("C1")
    for cmd in outbox(conn, "mqi.execute", "run_step"):
        if cmd["attempt"] == 2:
            send(conductor, {"type": "step.finished", "step_id": cmd["step_id"], "attempt": 2,
                             "outcome": "cancelled"})
    uid = conn.execute("SELECT uid, state FROM cases").fetchone()
    assert uid["state"] == "cancelled"
    assert views.dead_letter_resolutions(conn, [sims[1]]) == [f"resolved: case {uid['uid']} is cancelled"]
