"""GPU scheduling in the conductor: fair order across cases, eligibility, reconciliation,
the visible queue, and the bounded reading history."""

from __future__ import annotations

import json
import random
import uuid

import pytest

from mqi_framework.conductor import GPU_RECONCILE_GRACE_SECONDS, Conductor
from mqi_framework.config import load_config
from mqi_framework.protocols import GpuReading
from mqi_framework.store import open_state, transaction
from mqi_framework.store import records as rec
from mqi_framework.testing import run_cli
from mqi_framework.workspace import fast_config, write_workspace


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def readings(n, overrides=None):
    return [GpuReading(host="h", index=i, **(overrides or {}).get(i, {})) for i in range(n)]


@pytest.fixture
def env(tmp_path):
    path = write_workspace(tmp_path, fast_config(gpus=2))
    loaded = load_config(path)
    conn = open_state(loaded.database_path)
    with transaction(conn):
        rec.record_gpu_readings(conn, "test", readings(2))
    clock = Clock()
    return Conductor(loaded, conn, clock=clock, rng=random.Random(1)), conn, clock, path


def send(conductor, body):
    conductor.handle_event(body, uuid.uuid4().hex)


def commands(conn, queue):
    return [json.loads(r["body"]) for r in conn.execute("SELECT queue, body FROM outbox ORDER BY id") if r["queue"] == queue]


def finish(conductor, cmd, outcome="ok", **extra):
    send(conductor, {"type": "step.started", "step_id": cmd["step_id"], "attempt": cmd["attempt"], "job": {}})
    send(conductor, {"type": "step.finished", "step_id": cmd["step_id"], "attempt": cmd["attempt"],
                     "outcome": outcome, **extra})


def plan(beams):
    return {"beams": [{"number": n, "name": f"B{n}", "delivery_dir": f"d{n}"} for n in beams], "missing": [],
            "info": {}, "inputs": {str(n): f"beams/{n}/moqui_tps_{n}.in" for n in beams}}


def arrive(conductor, conn, name, beams=(1, 2, 3)):
    send(conductor, {"type": "case.seen", "name": name, "path": f"/in/{name}", "inbox": "/in", "reason": "marker"})
    finish(conductor, commands(conn, "mqi.prepare")[-1], data=plan(beams))
    finish(conductor, commands(conn, "mqi.transfer")[-1])
    return conn.execute("SELECT * FROM cases WHERE name = ?", (name,)).fetchone()


def sims_of(conn, case_uid):
    return [c for c in commands(conn, "mqi.execute") if c["case"] == case_uid]


def held(conn):
    return {r["idx"]: r["allocated_step"] for r in conn.execute("SELECT * FROM resources") if r["allocated_step"]}


def test_a_small_case_is_not_starved_by_a_big_one_that_arrived_first(env):
    conductor, conn, _, _ = env
    big = arrive(conductor, conn, "BIG", beams=range(1, 7))
    small = arrive(conductor, conn, "SMALL", beams=(1,))
    assert [c["beam"] for c in sims_of(conn, big["uid"])] == [1, 2]  # BIG alone took both GPUs
    assert sims_of(conn, small["uid"]) == []
    assert [(q["case"], q["beam"]) for q in rec.gpu_queue(conn)][:2] == [(small["uid"], 1), (big["uid"], 3)]
    finish(conductor, sims_of(conn, big["uid"])[0])  # the freed GPU goes to SMALL (holds 0), not BIG beam 3
    assert [c["beam"] for c in sims_of(conn, small["uid"])] == [1]
    assert [c["beam"] for c in sims_of(conn, big["uid"])] == [1, 2]


def test_cases_share_gpus_evenly_and_ties_go_to_the_older_case(env):
    conductor, conn, _, _ = env
    uids = [arrive(conductor, conn, name)["uid"] for name in ("A", "B", "C")]
    a, b, c = uids
    order, finished = [], set()
    while True:  # finish the longest-running beam, one at a time; record who gets each GPU
        running = [cmd for cmd in commands(conn, "mqi.execute") if cmd["step_id"] not in finished]
        order += [(cmd["case"], cmd["beam"]) for cmd in running if (cmd["case"], cmd["beam"]) not in order]
        assert len(held(conn)) == min(2, len(running))
        if not running:
            break
        finished.add(running[0]["step_id"])
        finish(conductor, running[0])
    assert sorted(order) == sorted((u, n) for u in uids for n in (1, 2, 3))
    # A is alone at first and takes both GPUs. Afterwards a free GPU goes to the case that
    # holds the fewest GPUs, and between equals to the case that arrived first.
    assert order == [(a, 1), (a, 2), (b, 1), (a, 3), (b, 2), (c, 1), (b, 3), (c, 2), (c, 3)]


def test_gpu_queue_lists_waiting_beams_in_service_order(env, tmp_path):
    conductor, conn, _, path = env
    a = arrive(conductor, conn, "A")
    b = arrive(conductor, conn, "B", beams=(1, 2))
    queue = rec.gpu_queue(conn)  # A holds both GPUs: B's beams come first while nothing changes
    expected = [(b["uid"], 1), (b["uid"], 2), (a["uid"], 3)]
    assert [(q["case"], q["beam"]) for q in queue] == expected
    assert all(q["step"] == "simulate" for q in queue)
    proc = run_cli("status", "--json", "-c", str(path))
    assert proc.returncode == 0, proc.stderr
    status = json.loads(proc.stdout)
    assert [(q["case"], q["beam"]) for q in status["gpu_queue"]] == expected
    text = run_cli("status", "-c", str(path)).stdout
    assert f"gpu queue: 3 beam(s) waiting for a GPU; next {b['uid']} beam 1" in text


def test_ineligible_gpu_gets_no_beam_until_it_is_eligible_again(env):
    conductor, conn, _, _ = env
    with transaction(conn):
        rec.record_gpu_readings(conn, "test", readings(2, {1: {"eligible": False, "note": "busy: 97% used"}}))
    case = arrive(conductor, conn, "A")
    assert [c["gpu"]["index"] for c in sims_of(conn, case["uid"])] == [0]
    with transaction(conn):
        rec.record_gpu_readings(conn, "test", readings(2))
    conductor.tick()
    assert [c["gpu"]["index"] for c in sims_of(conn, case["uid"])] == [0, 1]


def test_unhealthy_and_vanished_gpus_are_never_allocated(env):
    conductor, conn, _, _ = env
    with transaction(conn):
        rec.record_gpu_readings(conn, "test", [GpuReading(host="h", index=0, healthy=False, note="lost")])
    gpus = {g["idx"]: g for g in rec.gpus(conn)}
    assert gpus[1]["healthy"] == 0 and "not reported by test" in gpus[1]["note"]
    arrive(conductor, conn, "A")
    assert commands(conn, "mqi.execute") == [] and len(rec.gpu_queue(conn)) == 3


def test_a_failing_case_gets_no_more_gpus(env):
    conductor, conn, _, _ = env
    case = arrive(conductor, conn, "A", beams=(1, 2, 3, 4))
    first, second = sims_of(conn, case["uid"])
    conn.execute("UPDATE steps SET max_attempt = 1")
    finish(conductor, first, outcome="failed", message="boom", permanent=True)
    assert [c["beam"] for c in sims_of(conn, case["uid"])] == [1, 2]  # beams 3 and 4 are not started
    assert rec.gpu_queue(conn) == []
    finish(conductor, second)
    row = conn.execute("SELECT state FROM cases WHERE id = ?", (case["id"],)).fetchone()
    assert row["state"] == "failed" and held(conn) == {}


def test_gpu_held_by_a_step_not_in_flight_is_reconciled_after_grace(env):
    conductor, conn, clock, _ = env
    case = arrive(conductor, conn, "A", beams=(1,))
    (sim,) = sims_of(conn, case["uid"])
    step_id = sim["step_id"]
    with transaction(conn):  # a crash left the allocation behind a step that already finished
        conn.execute("UPDATE steps SET state = 'done' WHERE id = ?", (step_id,))
        conn.execute("UPDATE resources SET allocated_at = ? WHERE allocated_step = ?", (clock.now, step_id))
    conductor.tick()
    assert held(conn) != {}  # within the grace period nothing happens
    with transaction(conn):
        conn.execute("UPDATE resources SET allocated_at = allocated_at - ?", (GPU_RECONCILE_GRACE_SECONDS + 1,))
    conductor.tick()
    assert held(conn) == {}
    assert conn.execute("SELECT COUNT(*) FROM events WHERE kind = 'gpu.reconciled'").fetchone()[0] == 1


def test_a_running_step_keeps_its_gpu_until_its_executor_reports(env):
    conductor, conn, clock, _ = env
    case = arrive(conductor, conn, "A", beams=(1,))
    (sim,) = sims_of(conn, case["uid"])
    send(conductor, {"type": "step.started", "step_id": sim["step_id"], "attempt": 1, "job": {}})
    clock.now += 10 * 86400
    conductor.tick()
    assert list(held(conn).values()) == [sim["step_id"]]
    # the executor polls the job and finds it gone: "lost" is reported as a failed attempt
    send(conductor, {"type": "step.finished", "step_id": sim["step_id"], "attempt": 1, "outcome": "failed",
                     "message": "job lost: the job folder is gone"})
    assert held(conn) == {}
    step = conn.execute("SELECT state, message FROM steps WHERE id = ?", (sim["step_id"],)).fetchone()
    assert step["state"] == "waiting" and "lost" in step["message"]


def test_history_is_spaced_and_pruned(tmp_path, monkeypatch):
    conn = open_state(tmp_path / "s.db")
    now = [1_000_000.0]
    monkeypatch.setattr(rec.time, "time", lambda: now[0])
    for _ in range(10):  # ten readings 10 s apart, spacing 30 s: every third one is kept
        with transaction(conn):
            rec.record_gpu_readings(conn, "c", readings(2), history_spacing=30, history_keep=3600)
        now[0] += 10
    rows = rec.gpu_history(conn, since=0)
    assert len(rows) == 8 and {r["idx"] for r in rows} == {0, 1}
    assert len(rec.gpu_history(conn, since=0, host="h", index=1)) == 4
    now[0] += 7200
    with transaction(conn):
        rec.record_gpu_readings(conn, "c", readings(1), history_spacing=30, history_keep=3600)
    rows = rec.gpu_history(conn, since=0)
    assert [(r["idx"], r["at"]) for r in rows] == [(0, now[0])]
