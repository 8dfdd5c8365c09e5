"""State database: migrations, pragmas, GPU allocation, worker rows."""

import threading

import pytest

from mqi_framework.protocols import GpuReading
from mqi_framework.store import StoreError, connect, migrate, open_state, transaction
from mqi_framework.store import db as store_db
from mqi_framework.store import records as rec


def test_migrations_are_numbered_and_applied_once(tmp_path):
    known = store_db.migrations()
    assert [v for v, _, _ in known] == list(range(1, len(known) + 1))
    conn = open_state(tmp_path / "s.db")
    assert conn.execute("PRAGMA user_version").fetchone()[0] == known[-1][0]
    assert migrate(conn) == known[-1][0]  # idempotent
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_newer_schema_is_refused(tmp_path):
    conn = open_state(tmp_path / "s.db")
    conn.execute("PRAGMA user_version=999")
    with pytest.raises(StoreError, match="newer"):
        migrate(conn)


def test_readonly_open_of_missing_db_is_clear(tmp_path):
    with pytest.raises(StoreError, match="does not exist"):
        connect(tmp_path / "none.db", readonly=True)


def test_transaction_rolls_back(tmp_path):
    conn = open_state(tmp_path / "s.db")
    with pytest.raises(RuntimeError):
        with transaction(conn):
            rec.add_event(conn, "x", "y")
            raise RuntimeError
    assert conn.execute("SELECT COUNT(*) FROM events").fetchone()[0] == 0


def _step(conn, case_id, number):
    return conn.execute("INSERT INTO steps(case_id, beam_number, step_index, name, worker, state, max_attempt) "
                        "VALUES (?, ?, 2, 'simulate', 'execute', 'pending', 1)", (case_id, number)).lastrowid


def test_gpu_allocation_is_exclusive_across_connections(tmp_path):
    path = tmp_path / "s.db"
    conn = open_state(path)
    with transaction(conn):
        rec.record_gpu_readings(conn, "c", [GpuReading(host="h", index=i) for i in range(3)])
        conn.execute("INSERT INTO cases(uid, name, inbox, path, state, detected_at, updated_at) "
                     "VALUES ('case-000001', 'n', '/i', '/i/n', 'running', 0, 0)")
        steps = [_step(conn, 1, n) for n in range(1, 21)]
    got: list = []
    lock = threading.Lock()

    def worker(my_steps):
        c = connect(path)
        for step_id in my_steps:
            with transaction(c):
                row = rec.allocate_gpu(c, step_id)
            with lock:
                got.append((step_id, row["idx"] if row is not None else None))

    threads = [threading.Thread(target=worker, args=(steps[i::4],)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    allocated = [idx for _, idx in got if idx is not None]
    assert sorted(allocated) == [0, 1, 2]  # three GPUs, never one GPU twice
    holder = [s for s, idx in got if idx == 0][0]
    with transaction(conn):
        assert rec.release_gpu(conn, holder)
        assert not rec.release_gpu(conn, holder)
        assert rec.allocate_gpu(conn, steps[-1] if steps[-1] != holder else steps[0]) is not None


def test_vanished_gpu_becomes_unhealthy(tmp_path):
    conn = open_state(tmp_path / "s.db")
    with transaction(conn):
        rec.record_gpu_readings(conn, "c", [GpuReading(host="h", index=i) for i in range(2)])
    with transaction(conn):
        rec.record_gpu_readings(conn, "c", [GpuReading(host="h", index=0)])
    health = {g["idx"]: g["healthy"] for g in rec.gpus(conn)}
    assert health == {0: 1, 1: 0}


def test_worker_rows(tmp_path):
    conn = open_state(tmp_path / "s.db")
    rec.worker_state(conn, "execute", "executor", pid=12, state="running")
    rec.worker_state(conn, "execute", "executor", pid=13, state="stopped", heartbeat=False)
    (row,) = rec.workers(conn)
    assert row["pid"] == 13 and row["state"] == "stopped" and row["heartbeat_at"] is not None
