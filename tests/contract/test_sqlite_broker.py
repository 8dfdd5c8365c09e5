"""What only the embedded SQLite backend promises: URLs, pragmas, queues(), failure modes."""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

import pytest

from mqi_framework.broker import BrokerError, Delivery, RetryPolicy, SqliteBroker, open_broker
from mqi_framework.broker import sqlite_path
from mqi_framework.broker.sqlite import QueueStats


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "sub" / "queue.db"


def test_open_broker_url_forms(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    abs_db = tmp_path / "abs.db"
    for url, expected in [
        (f"sqlite:///{abs_db}".replace("////", "///"), abs_db),  # sqlite:///abs/path.db
        (f"sqlite:///{abs_db}", abs_db),  # sqlite:////abs/path.db (what HostContext produces)
        ("sqlite:rel/queue.db", Path("rel/queue.db")),
        (str(abs_db), abs_db),
        ("plain.db", Path("plain.db")),
    ]:
        assert sqlite_path(url) == expected, url
        broker = open_broker(url, retry=RetryPolicy(), lease_seconds=5)
        try:
            assert isinstance(broker, SqliteBroker)
            assert broker.path.resolve() == expected.resolve()
            assert broker.lease_seconds == 5
        finally:
            broker.close()
    assert (tmp_path / "rel" / "queue.db").exists()


@pytest.mark.parametrize("url", ["amqp://guest:s3cret@localhost/", "amqps://mq.example.org/mqi"])
def test_open_broker_amqp_urls_pick_rabbitmq_without_connecting(url):
    from mqi_framework.broker.rabbitmq import RabbitBroker

    broker = open_broker(url, retry=RetryPolicy(), lease_seconds=5)  # connects on first use only
    assert isinstance(broker, RabbitBroker) and not isinstance(broker, SqliteBroker)
    assert "s3cret" not in repr(broker)
    broker.close()


@pytest.mark.parametrize("url", ["redis://localhost/0", "", "sqlite:", "sqlite://host/x.db",
                                 "sqlite::memory:", ":memory:"])
def test_open_broker_rejects_other_forms(url):
    with pytest.raises(ValueError, match="sqlite"):
        open_broker(url, retry=RetryPolicy(), lease_seconds=5)


def test_pragmas_and_schema(db):
    broker = SqliteBroker(db)
    try:
        conn = broker._conn
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        assert conn.execute("PRAGMA busy_timeout").fetchone()[0] >= 10_000
    finally:
        broker.close()
    raw = sqlite3.connect(db)
    tables = {r[0] for r in raw.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"messages", "dead_letters"} <= tables
    raw.close()


def test_queues_reports_depth_and_dead_letters(db):
    broker = SqliteBroker(db, lease_seconds=5)
    try:
        broker.publish("a", {"n": 1})
        broker.publish("a", {"n": 2})
        broker.publish("a", {"n": 3}, delay=30)
        broker.get("a")
        broker.publish("b", {"n": 4})
        broker.nack(broker.get("b"), reason="x", retry=False)
        assert broker.queues() == [
            QueueStats(queue="a", depth=3, ready=1, delayed=1, leased=1, dead=0),
            QueueStats(queue="b", depth=0, ready=0, delayed=0, leased=0, dead=1),
        ]
    finally:
        broker.close()


def test_closed_broker_raises_broker_error(db):
    broker = SqliteBroker(db)
    broker.close()
    broker.close()  # idempotent
    with pytest.raises(BrokerError, match="closed"):
        broker.publish("q", {})


def test_bad_bodies_and_tags(db):
    with SqliteBroker(db) as broker:
        with pytest.raises(TypeError):
            broker.publish("q", ["not", "a", "dict"])  # type: ignore[arg-type]
        with pytest.raises(TypeError):
            broker.publish("q", {"x": object()})
        with pytest.raises(ValueError):
            broker.publish("q", {"x": float("nan")})
        assert broker.depth("q") == 0
        foreign = Delivery(queue="q", message_id="m", body={}, attempt=1, tag="amqp-delivery-tag-7")
        with pytest.raises(ValueError, match="not a delivery"):
            broker.ack(foreign)


def test_stale_extend_is_ignored(db):
    c1, c2 = SqliteBroker(db, lease_seconds=0.2), SqliteBroker(db, lease_seconds=5)
    try:
        c1.publish("q", {})
        stale = c1.get("q")
        time.sleep(0.3)
        fresh = c2.get("q")
        c1.extend(stale, 60)
        row = c2._conn.execute("SELECT leased_until FROM messages").fetchone()
        assert row[0] < time.time() + 10
        c2.ack(fresh)
    finally:
        c1.close()
        c2.close()


def test_one_instance_shared_by_threads(db):
    broker = SqliteBroker(db, lease_seconds=30, poll_interval=0.01)
    try:
        for i in range(100):
            broker.publish("q", {"i": i})
        seen: list[int] = []
        lock = threading.Lock()

        def consume() -> None:
            while (d := broker.get("q", timeout=0.2)) is not None:
                with lock:
                    seen.append(d.body["i"])
                broker.ack(d)

        threads = [threading.Thread(target=consume) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
        assert sorted(seen) == list(range(100))
        assert broker.depth("q") == 0
    finally:
        broker.close()


def test_invalid_settings(db):
    with pytest.raises(ValueError):
        SqliteBroker(db, lease_seconds=0)
    with pytest.raises(ValueError):
        SqliteBroker(db, poll_interval=0)
    with pytest.raises(ValueError):
        SqliteBroker(db, retry=RetryPolicy(max_attempts=0))


def test_unopenable_path_raises_broker_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(BrokerError):
        SqliteBroker(blocker / "queue.db")
