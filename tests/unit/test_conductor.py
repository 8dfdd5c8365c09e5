"""The conductor's state machine on a real SQLite file, driven by the events workers send."""

from __future__ import annotations

import json
import random
import uuid

import pytest

from mqi_framework.conductor import Conductor, ConductorError
from mqi_framework.config import load_config
from mqi_framework.protocols import GpuReading
from mqi_framework.store import open_state, transaction
from mqi_framework.store import records as rec
from mqi_framework.workspace import fast_config, write_workspace


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def env(tmp_path):
    path = write_workspace(tmp_path, fast_config(gpus=2))
    loaded = load_config(path)
    conn = open_state(loaded.database_path)
    with transaction(conn):
        rec.record_gpu_readings(conn, "test", [GpuReading(host="h", index=i) for i in range(2)])
    clock = Clock()
    changes = []
    conductor = Conductor(loaded, conn, clock=clock, rng=random.Random(1),
                          notify=lambda **kw: changes.append((kw["old_state"], kw["new_state"])))
    return conductor, conn, clock, changes


def send(conductor, body, message_id=None):
    conductor.handle_event(body, message_id or uuid.uuid4().hex)


def commands(conn, queue=None):
    rows = conn.execute("SELECT queue, body FROM outbox ORDER BY id").fetchall()
    return [json.loads(r["body"]) for r in rows if queue is None or r["queue"] == queue]


def finish(conductor, cmd, outcome="ok", **extra):
    send(conductor, {"type": "step.started", "step_id": cmd["step_id"], "attempt": cmd["attempt"]})
    send(conductor, {"type": "step.finished", "step_id": cmd["step_id"], "attempt": cmd["attempt"],
                     "outcome": outcome, **extra})


def case_row(conn, name="C1"):
    return conn.execute("SELECT * FROM cases WHERE name = ?", (name,)).fetchone()


def beam_states(conn, case_id):
    return {r["number"]: r["state"] for r in conn.execute("SELECT * FROM beams WHERE case_id = ?", (case_id,))}


PLAN = {"beams": [{"number": n, "name": f"B{n}", "delivery_dir": f"d{n}"} for n in (1, 2, 3)], "missing": [],
        "info": {"treatment_beams": 3}, "inputs": {str(n): f"beams/{n}/moqui_tps_{n}.in" for n in (1, 2, 3)}}


def detect_and_prepare(conductor, conn, name="C1"):
    send(conductor, {"type": "case.seen", "name": name, "path": f"/in/{name}", "inbox": "/in", "reason": "marker"})
    prepare = commands(conn, "mqi.prepare")[-1]
    finish(conductor, prepare, data=PLAN)
    upload = commands(conn, "mqi.transfer")[-1]
    assert upload["direction"] == "upload"
    finish(conductor, upload)
    return case_row(conn, name)


def test_case_is_detected_once_and_prepare_dispatched(env):
    conductor, conn, _, changes = env
    body = {"type": "case.seen", "name": "C1", "path": "/in/C1", "inbox": "/in", "reason": "marker"}
    send(conductor, body)
    send(conductor, body)  # a second announcement is ignored: never picked up twice
    assert conn.execute("SELECT COUNT(*) FROM cases").fetchone()[0] == 1
    case = case_row(conn)
    assert case["uid"] == "case-000001" and case["state"] == "preparing"
    (cmd,) = commands(conn, "mqi.prepare")
    assert cmd["case"] == "case-000001" and cmd["attempt"] == 1 and "C1" not in cmd["remote_dir"]
    assert ("", "detected") in changes and ("detected", "preparing") in changes


def test_gpus_limit_concurrency_and_are_reused(env):
    conductor, conn, _, _ = env
    case = detect_and_prepare(conductor, conn)
    sims = commands(conn, "mqi.execute")
    assert len(sims) == 2  # two GPUs, three beams
    assert beam_states(conn, case["id"]) == {1: "running", 2: "running", 3: "queued"}
    assert {s["gpu"]["index"] for s in sims} == {0, 1}
    assert "'" in sims[0]["command"] or "/" in sims[0]["command"]
    finish(conductor, sims[0])
    third = commands(conn, "mqi.execute")[-1]
    assert third["beam"] == 3 and third["gpu"]["index"] == sims[0]["gpu"]["index"]
    finish(conductor, sims[1])
    finish(conductor, third)
    download = commands(conn, "mqi.transfer")[-1]
    assert download["direction"] == "download"
    finish(conductor, download)
    for post in commands(conn, "mqi.postprocess"):
        finish(conductor, post)
    case = case_row(conn)
    assert case["state"] == "done" and case["finished_at"]
    assert beam_states(conn, case["id"]) == {1: "done", 2: "done", 3: "done"}
    assert conn.execute("SELECT COUNT(*) FROM resources WHERE allocated_step IS NOT NULL").fetchone()[0] == 0


def test_duplicate_and_stale_events_change_nothing(env):
    conductor, conn, _, _ = env
    detect_and_prepare(conductor, conn)
    sim = commands(conn, "mqi.execute")[0]
    send(conductor, {"type": "step.started", "step_id": sim["step_id"], "attempt": sim["attempt"]})
    done = {"type": "step.finished", "step_id": sim["step_id"], "attempt": sim["attempt"], "outcome": "ok"}
    send(conductor, done, "same-id")
    before = conn.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]
    send(conductor, done, "same-id")
    send(conductor, dict(done, attempt=99))
    assert conn.execute("SELECT COUNT(*) FROM outbox").fetchone()[0] == before
    assert conn.execute("SELECT COUNT(*) FROM events WHERE kind = 'event.stale'").fetchone()[0] == 1


def test_failed_step_is_retried_with_backoff_then_fails_the_case(env):
    conductor, conn, clock, _ = env
    case = detect_and_prepare(conductor, conn)
    sims = commands(conn, "mqi.execute")
    finish(conductor, sims[0], outcome="failed", message="exit code 1", exit_code=1)
    step = conn.execute("SELECT * FROM steps WHERE id = ?", (sims[0]["step_id"],)).fetchone()
    assert step["state"] == "waiting" and step["next_attempt_at"] > clock.now
    assert beam_states(conn, case["id"])[1] == "retrying"
    third = commands(conn, "mqi.execute")[-1]
    assert third["beam"] == 3  # the freed GPU went to the queued beam at once
    conductor.tick()
    assert conn.execute("SELECT state FROM steps WHERE id = ?", (sims[0]["step_id"],)).fetchone()[0] == "waiting"
    clock.now += 60
    conductor.tick()  # due, but both GPUs are busy: it queues
    assert conn.execute("SELECT state FROM steps WHERE id = ?", (sims[0]["step_id"],)).fetchone()[0] == "queued"
    finish(conductor, third)
    retry = [c for c in commands(conn, "mqi.execute") if c["step_id"] == sims[0]["step_id"]][-1]
    assert retry["attempt"] == 2 and retry["job_key"] != sims[0]["job_key"]
    finish(conductor, retry, outcome="failed", message="exit code 1", exit_code=1)  # budget (2) spent
    assert beam_states(conn, case["id"])[1] == "failed"
    assert case_row(conn)["state"] == "running"  # beam 2 still runs: wait for it
    finish(conductor, sims[1])
    case = case_row(conn)
    assert case["state"] == "failed" and case["attention"] == 1
    assert beam_states(conn, case["id"]) == {1: "failed", 2: "cancelled", 3: "cancelled"}  # 2, 3 never finished the case
    assert conn.execute("SELECT COUNT(*) FROM resources WHERE allocated_step IS NOT NULL").fetchone()[0] == 0
    # retry runs the failed and the unfinished beams again
    assert conductor.retry("C1") == "running"
    assert beam_states(conn, case["id"])[1] == "running"


def test_cancel_waits_for_running_jobs(env):
    conductor, conn, _, _ = env
    detect_and_prepare(conductor, conn)
    sims = commands(conn, "mqi.execute")
    for sim in sims:
        send(conductor, {"type": "step.started", "step_id": sim["step_id"], "attempt": sim["attempt"], "job": {}})
    assert conductor.cancel("case-000001") == "cancelling"
    states = {r["state"] for r in conn.execute("SELECT state FROM steps WHERE name = 'simulate'")}
    assert states == {"cancelling", "cancelled"}
    for sim in sims:
        send(conductor, {"type": "step.finished", "step_id": sim["step_id"], "attempt": sim["attempt"],
                         "outcome": "cancelled"})
    assert case_row(conn)["state"] == "cancelled"
    assert conn.execute("SELECT COUNT(*) FROM resources WHERE allocated_step IS NOT NULL").fetchone()[0] == 0
    with pytest.raises(ConductorError, match="already cancelled"):
        conductor.cancel("C1")


def test_incomplete_case_waits_rechecks_and_is_flagged(env):
    conductor, conn, clock, _ = env
    send(conductor, {"type": "case.seen", "name": "C1", "path": "/in/C1", "inbox": "/in"})
    prepare = commands(conn, "mqi.prepare")[0]
    partial = dict(PLAN, missing=[2])
    finish(conductor, prepare, outcome="incomplete", message="waiting for beam 2", data=partial)
    case = case_row(conn)
    assert case["state"] == "incomplete"
    assert beam_states(conn, case["id"]) == {1: "pending", 2: "missing", 3: "pending"}
    assert not commands(conn, "mqi.transfer")
    clock.now += conductor.cfg.cases.incomplete_recheck_seconds + 1
    conductor.tick()
    again = commands(conn, "mqi.prepare")[-1]
    assert again["attempt"] == 2
    finish(conductor, again, outcome="incomplete", data=partial)
    clock.now += conductor.cfg.cases.incomplete_flag_after_seconds + 1
    conductor.tick()
    assert case_row(conn)["attention"] == 1
    assert conn.execute("SELECT COUNT(*) FROM events WHERE kind = 'case.flagged'").fetchone()[0] == 1


def test_rejected_case_is_final_and_retryable(env):
    conductor, conn, _, _ = env
    send(conductor, {"type": "case.seen", "name": "C1", "path": "/in/C1", "inbox": "/in"})
    finish(conductor, commands(conn, "mqi.prepare")[0], outcome="rejected", message="no RT Ion Plan")
    case = case_row(conn)
    assert case["state"] == "rejected" and case["message"] == "no RT Ion Plan"
    assert conductor.retry("C1") == "preparing"
    assert commands(conn, "mqi.prepare")[-1]["attempt"] == 2


def test_command_values_are_shell_quoted(env):
    conductor, conn, _, _ = env
    detect_and_prepare(conductor, conn)
    sim = commands(conn, "mqi.execute")[0]
    assert sim["command"].startswith("CUDA_VISIBLE_DEVICES=0 ")
    assert "-m mqi_moqui.standin" in sim["command"]


def test_events_are_append_only(env):
    conductor, conn, _, _ = env
    send(conductor, {"type": "case.seen", "name": "C1", "path": "/in/C1", "inbox": "/in"})
    import sqlite3

    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        conn.execute("DELETE FROM events")
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        conn.execute("UPDATE events SET message = 'x'")


def test_command_nobody_started_is_failed_and_its_gpu_released(env):
    conductor, conn, clock, _ = env
    detect_and_prepare(conductor, conn)
    sims = commands(conn, "mqi.execute")
    send(conductor, {"type": "step.started", "step_id": sims[1]["step_id"], "attempt": 1, "job": {}})
    clock.now += 3600
    conductor.tick()
    first = conn.execute("SELECT * FROM steps WHERE id = ?", (sims[0]["step_id"],)).fetchone()
    assert first["state"] == "waiting" and "no worker started it" in first["message"]
    running = conn.execute("SELECT state FROM steps WHERE id = ?", (sims[1]["step_id"],)).fetchone()[0]
    assert running == "running"  # a started job is never reconciled away
    holders = {r[0] for r in conn.execute("SELECT allocated_step FROM resources WHERE allocated_step IS NOT NULL")}
    third = commands(conn, "mqi.execute")[-1]
    assert third["beam"] == 3 and holders == {sims[1]["step_id"], third["step_id"]}  # the freed GPU moved on


def test_cancel_of_a_command_nobody_took_finishes_after_the_grace(env):
    conductor, conn, clock, _ = env
    detect_and_prepare(conductor, conn)
    assert conductor.cancel("C1") == "cancelling"  # two simulate commands were dispatched, none started
    clock.now += 3600
    conductor.tick()
    assert case_row(conn)["state"] == "cancelled"
    assert conn.execute("SELECT COUNT(*) FROM resources WHERE allocated_step IS NOT NULL").fetchone()[0] == 0


def test_retention_asks_once_records_answers_and_ignores_late_ones(env):
    conductor, conn, clock, _ = env
    send(conductor, {"type": "case.seen", "name": "C1", "path": "/in/C1", "inbox": "/in"})
    finish(conductor, commands(conn, "mqi.prepare")[0], outcome="rejected", message="no RT Ion Plan")
    clock.now += 23 * 3600
    conductor.tick()
    assert not [c for c in commands(conn, "mqi.transfer") if c["type"] == "clean_case"]  # not due yet
    clock.now += 2 * 3600
    conductor.tick()
    (clean,) = [c for c in commands(conn, "mqi.transfer") if c["type"] == "clean_case"]
    assert clean["remove"] == ["remote"] and clean["remote_dir"].endswith("/case-000001")
    assert clean["staging_dir"].endswith("staging/case-000001")
    clock.now += 120
    conductor.tick()  # asked, not answered: not asked again yet
    assert len([c for c in commands(conn, "mqi.transfer") if c["type"] == "clean_case"]) == 1
    send(conductor, {"type": "case.cleaned", "case_id": clean["case_id"], "removed": [], "missing": [],
                     "unsupported": ["remote"], "problems": []})
    clock.now += 7 * 86400
    conductor.tick()
    (second,) = [c for c in commands(conn, "mqi.transfer") if c["type"] == "clean_case"][1:]
    assert second["remove"] == ["staging"]  # a transfer that cannot remove is not asked again
    # retried before the answer came: the case runs from its first step, and the answer changes nothing
    assert conductor.retry("C1") == "preparing"
    send(conductor, {"type": "case.cleaned", "case_id": clean["case_id"], "removed": ["staging"]})
    assert json.loads(case_row(conn)["cleaned"]) == {}


def test_a_beam_that_finished_its_step_says_so_while_it_waits(env):
    """Issue 19: `waiting` with no words read as stuck."""
    conductor, conn, _, _ = env
    case = detect_and_prepare(conductor, conn)
    sims = commands(conn, "mqi.execute")
    finish(conductor, sims[0])
    beam = conn.execute("SELECT state, message FROM beams WHERE case_id = ? AND number = ?",
                        (case["id"], sims[0]["beam"])).fetchone()
    assert (beam["state"], beam["message"]) == ("waiting", "simulate done; waiting for the case's other beams")


def test_re_checks_of_an_incomplete_case_are_quiet_until_something_changes(env):
    """Issue 19: every re-check of a case waiting for a delivery went incomplete -> detected ->
    preparing -> incomplete, with audit events each time, and drew a red "failed" attempt."""
    conductor, conn, clock, _ = env
    send(conductor, {"type": "case.seen", "name": "C1", "path": "/in/C1", "inbox": "/in"})
    partial = dict(PLAN, missing=[2])
    finish(conductor, commands(conn, "mqi.prepare")[0], outcome="incomplete", message="waiting for beam 2",
           data=partial)
    case = case_row(conn)
    events = conn.execute("SELECT COUNT(*) FROM events WHERE case_id = ?", (case["id"],)).fetchone()[0]
    for _ in range(3):
        clock.now += conductor.cfg.cases.incomplete_recheck_seconds + 1
        conductor.tick()
        assert case_row(conn)["state"] == "incomplete"  # no flapping through detected/preparing
        finish(conductor, commands(conn, "mqi.prepare")[-1], outcome="incomplete", message="waiting for beam 2",
               data=partial)
    assert conn.execute("SELECT COUNT(*) FROM events WHERE case_id = ?", (case["id"],)).fetchone()[0] == events
    clock.now += conductor.cfg.cases.incomplete_recheck_seconds + 1
    conductor.tick()
    conductor.tick()  # no second dispatch while the re-check is out
    assert len(commands(conn, "mqi.prepare")) == 5
    finish(conductor, commands(conn, "mqi.prepare")[-1], data=PLAN)  # the delivery arrived
    assert case_row(conn)["state"] == "uploading"
    assert commands(conn, "mqi.transfer")


def test_a_beam_is_done_when_its_last_step_is(env):
    """Issue 19: in the demo's progress a beam went from postprocessing back to waiting."""
    conductor, conn, _, _ = env
    case = detect_and_prepare(conductor, conn)
    for sim in commands(conn, "mqi.execute"):
        finish(conductor, sim)
    for sim in commands(conn, "mqi.execute")[2:]:
        finish(conductor, sim)
    finish(conductor, commands(conn, "mqi.transfer")[-1])
    first, *others = commands(conn, "mqi.postprocess")
    finish(conductor, first)
    states = beam_states(conn, case["id"])
    assert states[first["beam"]] == "done" and case_row(conn)["state"] == "postprocessing"
    assert all(states[o["beam"]] == "postprocessing" for o in others)
