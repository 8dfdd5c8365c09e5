"""Issue 13.3: waiting is not hanging. A worker's heartbeat is written by a thread of its
own; a declared wait (the SSH connection limit, a free channel, the broker coming back)
keeps it fresh, a main thread stuck elsewhere does not, and a locked state database never
blocks the work."""

from __future__ import annotations

import sqlite3
import threading

from mqi_framework.heartbeat import Heartbeat
from mqi_framework.store import open_state
from mqi_framework.waits import MAX_DECLARED_WAIT_SECONDS, current_wait, waiting


def row(conn, name="execute"):
    return conn.execute("SELECT heartbeat_at, message FROM workers WHERE name = ?", (name,)).fetchone()


def test_a_stuck_main_thread_leaves_its_last_sign_of_life(tmp_path, mocker):
    conn = open_state(tmp_path / "state.db")
    clock = mocker.patch("time.time", return_value=1000.0)
    beat = Heartbeat(tmp_path / "state.db", "execute", "executor", every=2.0)
    beat.alive()
    clock.return_value = 1500.0  # 500 s later, no sign of life from the main thread
    beat.beat_once(conn)
    assert tuple(row(conn)) == (1000.0, "")


def test_a_declared_wait_keeps_the_heartbeat_fresh_and_says_why(tmp_path, mocker):
    conn = open_state(tmp_path / "state.db")
    beat = Heartbeat(tmp_path / "state.db", "transfer", "transfer", every=2.0)
    clock = mocker.patch("time.time", return_value=10 ** 10)  # the one clock of both modules
    beat.alive()
    with waiting("SSH connection limit of gpu1"):
        clock.return_value = 10 ** 10 + 30.0  # blocked 30 s in the wait
        beat.beat_once(conn)
    at, message = row(conn, "transfer")
    assert at == 10 ** 10 + 30.0
    assert message.startswith("waiting: SSH connection limit of gpu1")
    assert current_wait() is None  # the wait ended with its block


def test_a_declared_wait_does_not_keep_a_worker_alive_for_ever(mocker):
    with waiting("a free SSH channel on gpu1"):
        (_, since) = current_wait()
        assert current_wait(now=since + MAX_DECLARED_WAIT_SECONDS + 1) is None


def test_the_heartbeat_thread_beats_while_the_main_thread_waits(tmp_path):
    conn = open_state(tmp_path / "state.db")
    beat = Heartbeat(tmp_path / "state.db", "execute", "executor", every=0.05)
    written = threading.Event()

    original = beat.beat_once

    def spy(c):
        original(c)
        if current_wait() is not None:
            written.set()

    beat.beat_once = spy  # type: ignore[method-assign]
    beat.start()
    try:
        with waiting("RabbitMQ at 127.0.0.1:5672"):
            assert written.wait(10)
    finally:
        beat.stop()
    assert row(conn)["message"].startswith("waiting: RabbitMQ")


def test_a_locked_state_database_does_not_block_the_main_thread(tmp_path):
    from mqi_framework.worker import WorkerRuntime

    open_state(tmp_path / "state.db").close()
    runtime = WorkerRuntime.__new__(WorkerRuntime)  # only what heartbeat() uses
    runtime._beat = Heartbeat(tmp_path / "state.db", "execute", "executor", every=2.0)
    locker = sqlite3.connect(str(tmp_path / "state.db"), isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")
    try:
        runtime.heartbeat()  # no write: it would wait for the lock (30 s) and then raise
    finally:
        locker.execute("ROLLBACK")
