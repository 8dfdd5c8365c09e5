"""The broker contract (see ``mqi_framework/broker/base.py``), written once for every backend.

Every test gets ``broker_factory`` (conftest.py): calling it opens a new connection to
the same store, ``broker_factory.queue()`` gives a queue name unique to the test, and
``broker_factory.url`` lets consumer subprocesses open the same store.

Tests marked ``requires("lease_expiry")`` need leases that run out after ``lease_seconds``
(SQLite); their ``requires("connection_leases")`` counterparts check the same promise
where a lease lasts as long as the consumer's connection (RabbitMQ): the message comes
back when the connection dies, not after a time.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time

import pytest

from mqi_framework.broker import RetryPolicy

# ---------------------------------------------------------------- helpers

CONSUMER_HOLD = """
import sys, time
from mqi_framework.broker import RetryPolicy, open_broker
url, queue, lease = sys.argv[1], sys.argv[2], float(sys.argv[3])
broker = open_broker(url, retry=RetryPolicy(max_attempts=5, base_seconds=0.05, max_seconds=0.2),
                     lease_seconds=lease)
d = broker.get(queue, timeout=10)
print("LEASED", d.message_id if d else "-", d.attempt if d else 0, flush=True)
time.sleep(120)  # 'working' until killed, never acks
"""

CONSUMER_DRAIN = """
import sys, time
from mqi_framework.broker import RetryPolicy, open_broker
url, queue, lease = sys.argv[1], sys.argv[2], float(sys.argv[3])
work = float(sys.argv[4]) if len(sys.argv) > 4 else 0.0
broker = open_broker(url, retry=RetryPolicy(max_attempts=5, base_seconds=0.05, max_seconds=0.2),
                     lease_seconds=lease)
print("READY", flush=True)
while True:
    d = broker.get(queue, timeout=1.5)
    if d is None:
        break
    print("GOT", d.message_id, d.attempt, flush=True)
    time.sleep(work)  # 'handling' it, so that consumers overlap
    broker.ack(d)
broker.close()
print("DONE", flush=True)
"""


def _spawn(factory, script: str, queue: str, lease: float, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [factory.python(), "-c", script, factory.url, queue, str(lease), *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=factory.subprocess_env(),
    )


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)


# ---------------------------------------------------------------- basics

def test_publish_get_ack_removes(broker_factory):
    broker = broker_factory()
    q = broker_factory.queue()
    mid = broker.publish(q, {"case": "C1", "n": 1})
    assert isinstance(mid, str) and mid
    assert broker.depth(q) == 1
    d = broker.get(q, timeout=1)
    assert d is not None
    assert (d.queue, d.message_id, d.body, d.attempt) == (q, mid, {"case": "C1", "n": 1}, 1)
    broker.ack(d)
    assert broker.depth(q) == 0
    assert broker.get(q) is None
    # a second connection sees nothing either
    assert broker_factory().get(q) is None


def test_message_id_kept_and_body_roundtrips(broker_factory):
    broker = broker_factory()
    q = broker_factory.queue()
    body = {"path": "/data/Ünïcode case", "beams": [1, 2, {"x": None, "ok": True}], "f": 1.5}
    assert broker.publish(q, body, message_id="fixed-id-1") == "fixed-id-1"
    auto = broker.publish(q, {"k": 2})
    assert auto != "fixed-id-1"
    d1 = broker.get(q)
    d2 = broker.get(q)
    assert (d1.message_id, d1.body) == ("fixed-id-1", body)  # oldest first
    assert (d2.message_id, d2.body) == (auto, {"k": 2})


def test_queues_are_independent(broker_factory):
    broker = broker_factory()
    a, b = broker_factory.queue("a"), broker_factory.queue("b")
    broker.publish(a, {"q": "a"})
    assert broker.get(b) is None
    assert broker.depth(b) == 0
    assert broker.get(a).body == {"q": "a"}


def test_get_on_empty_queue_waits_for_timeout(broker_factory):
    broker = broker_factory()
    q = broker_factory.queue()
    start = time.monotonic()
    assert broker.get(q, timeout=0.3) is None
    elapsed = time.monotonic() - start
    assert 0.28 <= elapsed < 1.5
    start = time.monotonic()
    assert broker.get(q, timeout=0) is None
    assert time.monotonic() - start < 0.5


def test_get_wakes_up_for_a_message_published_while_waiting(broker_factory):
    consumer, publisher = broker_factory(), broker_factory()
    q = broker_factory.queue()
    proc = _spawn(broker_factory, CONSUMER_DRAIN, q, 5.0)
    try:
        assert proc.stdout.readline().strip() == "READY"
        mid = publisher.publish(q, {"late": True})
        line = proc.stdout.readline().split()
        assert line[:2] == ["GOT", mid]
        out, err = proc.communicate(timeout=10)  # it acks, idles 1.5 s and exits
        assert "DONE" in out, err
    finally:
        _kill(proc)
    assert consumer.depth(q) == 0


def test_message_invisible_while_leased(broker_factory):
    c1, c2 = broker_factory(lease_seconds=5), broker_factory(lease_seconds=5)
    q = broker_factory.queue()
    c1.publish(q, {"n": 1})
    d = c1.get(q)
    assert d is not None
    assert c2.get(q, timeout=0.1) is None
    assert c1.get(q) is None
    assert c2.depth(q) == (1 if broker_factory.depth_counts_leased else 0)  # leased messages count (SQLite)
    c1.ack(d)
    assert c2.depth(q) == 0


def test_depth_counts_ready_delayed_and_leased(broker_factory):
    broker = broker_factory(lease_seconds=5)
    q = broker_factory.queue()
    broker.publish(q, {"n": "leased"})
    broker.publish(q, {"n": "ready"})
    broker.publish(q, {"n": "delayed"}, delay=30)
    assert broker.get(q).body == {"n": "leased"}
    assert broker.depth(q) == (3 if broker_factory.depth_counts_leased else 2)


# ---------------------------------------------------------------- leases

@pytest.mark.requires("lease_expiry")
def test_lease_expiry_redelivers_with_next_attempt(broker_factory):
    c1, c2 = broker_factory(lease_seconds=0.3), broker_factory(lease_seconds=0.3)
    q = broker_factory.queue()
    mid = c1.publish(q, {"n": 1})
    d1 = c1.get(q)
    assert d1.attempt == 1
    assert c2.get(q) is None
    time.sleep(0.4)
    d2 = c2.get(q, timeout=1)
    assert d2 is not None
    assert (d2.message_id, d2.attempt, d2.body) == (mid, 2, {"n": 1})
    c2.ack(d2)
    assert c1.depth(q) == 0


@pytest.mark.requires("lease_expiry")
def test_killed_consumer_message_is_redelivered_and_completes(broker_factory):
    lease = 1.0
    broker = broker_factory(lease_seconds=lease)
    q = broker_factory.queue()
    mid = broker.publish(q, {"beam": 1})
    proc = _spawn(broker_factory, CONSUMER_HOLD, q, lease)
    try:
        line = proc.stdout.readline().split()
        assert line == ["LEASED", mid, "1"], proc.stderr.read() if not line else line
        leased_at = time.monotonic()
    finally:
        _kill(proc)
    assert proc.returncode == -signal.SIGKILL
    if time.monotonic() - leased_at < lease * 0.8:
        assert broker.get(q) is None  # the dead consumer's lease still holds
    d = broker.get(q, timeout=lease + 2)
    assert d is not None
    assert (d.message_id, d.attempt) == (mid, 2)
    broker.ack(d)
    assert broker.depth(q) == 0
    assert broker.dlq_list(q) == []


@pytest.mark.requires("lease_expiry")
def test_stale_ack_is_refused(broker_factory):
    c1, c2 = broker_factory(lease_seconds=0.3), broker_factory(lease_seconds=5)
    q = broker_factory.queue()
    c1.publish(q, {"n": 1})
    stale = c1.get(q)
    time.sleep(0.4)
    fresh = c2.get(q, timeout=1)
    assert fresh is not None and fresh.attempt == 2
    c1.ack(stale)  # lease lost: must not remove the message c2 now holds
    assert c2.depth(q) == 1
    assert c1.get(q) is None  # and c2's lease is intact
    c2.ack(fresh)
    assert c2.depth(q) == 0


@pytest.mark.requires("lease_expiry")
def test_stale_nack_has_no_effect(broker_factory):
    c1, c2 = broker_factory(lease_seconds=0.3), broker_factory(lease_seconds=5)
    q = broker_factory.queue()
    c1.publish(q, {"n": 1})
    stale = c1.get(q)
    time.sleep(0.4)
    fresh = c2.get(q, timeout=1)
    c1.nack(stale, reason="late failure", retry=False)
    assert c2.dlq_list(q) == []
    assert c2.depth(q) == 1
    assert c1.get(q) is None  # not re-queued either: c2 still holds it
    c2.ack(fresh)
    assert c2.depth(q) == 0


def test_extend_keeps_the_lease(broker_factory):
    c1, c2 = broker_factory(lease_seconds=0.3), broker_factory(lease_seconds=0.3)
    q = broker_factory.queue()
    c1.publish(q, {"n": 1})
    d = c1.get(q)
    c1.extend(d, 2.0)
    time.sleep(0.45)
    assert c2.get(q) is None
    c1.ack(d)
    assert c2.depth(q) == 0


# ---------------------------------------------------------------- leases tied to the connection

def _sever(broker) -> None:
    """Cut the calling thread's connection of a RabbitBroker as a network failure would (no
    AMQP goodbye): the broker side sees the TCP connection drop."""
    import socket

    link = broker._state.link
    assert link is not None, "the broker has no open connection on this thread"
    link.conn._impl._transport._sock.shutdown(socket.SHUT_RDWR)


@pytest.mark.requires("connection_leases")
def test_closed_connection_redelivers_with_next_attempt(broker_factory):
    c1, c2 = broker_factory(), broker_factory()
    q = broker_factory.queue()
    mid = c1.publish(q, {"n": 1})
    d1 = c1.get(q)
    assert d1.attempt == 1
    assert c2.get(q, timeout=0.3) is None  # no time lease: held while the connection lives
    c1.close()
    d2 = c2.get(q, timeout=5)
    assert d2 is not None
    assert (d2.message_id, d2.attempt, d2.body) == (mid, 2, {"n": 1})
    c2.ack(d2)
    assert c2.depth(q) == 0
    assert c2.dlq_list(q) == []


@pytest.mark.requires("connection_leases")
def test_killed_consumer_process_message_is_redelivered_and_completes(broker_factory):
    broker = broker_factory()
    q = broker_factory.queue()
    mid = broker.publish(q, {"beam": 1})
    proc = _spawn(broker_factory, CONSUMER_HOLD, q, 1.0)
    try:
        line = proc.stdout.readline().split()
        assert line == ["LEASED", mid, "1"], proc.stderr.read() if not line else line
        assert broker.get(q, timeout=0.5) is None  # the live consumer holds it, however long
    finally:
        _kill(proc)
    assert proc.returncode == -signal.SIGKILL
    d = broker.get(q, timeout=10)  # RabbitMQ re-queues it as soon as the dead process's socket closes
    assert d is not None
    assert (d.message_id, d.attempt, d.body) == (mid, 2, {"beam": 1})
    broker.ack(d)
    assert broker.depth(q) == 0
    assert broker.get(q, timeout=0.2) is None
    assert broker.dlq_list(q) == []


@pytest.mark.requires("connection_leases")
def test_settling_a_delivery_of_a_lost_connection_has_no_effect(broker_factory):
    c1, c2 = broker_factory(), broker_factory()
    q = broker_factory.queue()
    mid = c1.publish(q, {"n": 1})
    stale = c1.get(q)
    _sever(c1)
    fresh = c2.get(q, timeout=10)
    assert fresh is not None and (fresh.message_id, fresh.attempt) == (mid, 2)
    c1.ack(stale)  # its connection is gone: must not touch the message c2 now holds
    assert c1.nack(stale, reason="late failure", retry=False) is True
    assert c2.dlq_list(q) == []
    assert c1.get(q, timeout=0.2) is None  # c1 reconnected by itself; c2 still holds the message
    c2.ack(fresh)
    assert c2.get(q, timeout=0.2) is None
    assert c2.depth(q) == 0


@pytest.mark.requires("connection_leases")
def test_redelivered_after_last_attempt_dead_letters_once(broker_factory):
    retry = RetryPolicy(max_attempts=2, base_seconds=0.01, max_seconds=0.02)
    c1, c2, c3 = (broker_factory(retry=retry) for _ in range(3))
    q = broker_factory.queue()
    mid = c1.publish(q, {"n": 1})
    assert c1.get(q).attempt == 1
    c1.close()  # consumer died
    assert c2.get(q, timeout=5).attempt == 2
    c2.close()  # died again, on the last attempt
    assert c3.get(q, timeout=0.5) is None  # not handed out a third time: dead-lettered once
    assert c3.depth(q) == 0
    dead = c3.dlq_list(q)
    assert [(d.message_id, d.attempts) for d in dead] == [(mid, 2)]
    assert "consumer died" in dead[0].reason


# ---------------------------------------------------------------- retries and dead letters

def test_nack_retry_is_delayed_by_backoff(broker_factory):
    retry = RetryPolicy(max_attempts=3, base_seconds=0.4, max_seconds=5)
    broker = broker_factory(retry=retry)
    q = broker_factory.queue()
    mid = broker.publish(q, {"n": 1})
    d1 = broker.get(q)
    nacked_at = time.monotonic()
    assert broker.nack(d1, reason="transient: ssh timeout") is True
    assert broker.get(q) is None  # backoff >= 0.5 * 0.4 s
    assert broker.depth(q) == 1
    d2 = broker.get(q, timeout=2)
    waited = time.monotonic() - nacked_at
    assert d2 is not None
    assert (d2.message_id, d2.attempt) == (mid, 2)
    assert 0.15 <= waited < 1.5
    broker.ack(d2)


def test_attempts_count_then_dead_letter_exactly_once(broker_factory):
    retry = RetryPolicy(max_attempts=3, base_seconds=0.01, max_seconds=0.02)
    broker, other = broker_factory(retry=retry), broker_factory(retry=retry)
    q = broker_factory.queue()
    mid = broker.publish(q, {"case": "C9"})
    results = []
    for expected_attempt in (1, 2, 3):
        d = broker.get(q, timeout=1)
        assert d is not None and d.attempt == expected_attempt and d.message_id == mid
        results.append(broker.nack(d, reason=f"boom {expected_attempt}"))
    assert results == [True, True, False]
    assert broker.depth(q) == 0
    assert broker.get(q, timeout=0.1) is None
    dead = other.dlq_list(q)
    assert len(dead) == 1
    dl = dead[0]
    assert (dl.queue, dl.message_id, dl.body, dl.attempts) == (q, mid, {"case": "C9"}, 3)
    assert "boom 3" in dl.reason
    assert dl.dead_at == pytest.approx(time.time(), abs=30)
    assert isinstance(dl.id, str)


@pytest.mark.requires("lease_expiry")
def test_lease_expired_on_last_attempt_dead_letters_once(broker_factory):
    retry = RetryPolicy(max_attempts=2, base_seconds=0.01, max_seconds=0.02)
    c1, c2 = broker_factory(retry=retry, lease_seconds=0.2), broker_factory(retry=retry, lease_seconds=0.2)
    q = broker_factory.queue()
    mid = c1.publish(q, {"n": 1})
    assert c1.get(q).attempt == 1
    time.sleep(0.3)
    assert c2.get(q, timeout=1).attempt == 2
    time.sleep(0.3)
    # both consumers look: neither gets it, it is dead-lettered once
    assert c1.get(q) is None
    assert c2.get(q) is None
    assert c1.depth(q) == 0
    dead = c2.dlq_list(q)
    assert [(d.message_id, d.attempts) for d in dead] == [(mid, 2)]
    assert "consumer died" in dead[0].reason


def test_nack_without_retry_dead_letters_immediately(broker_factory):
    broker = broker_factory(retry=RetryPolicy(max_attempts=5, base_seconds=0.01))
    q = broker_factory.queue()
    mid = broker.publish(q, {"n": 1})
    d = broker.get(q)
    assert broker.nack(d, reason="permanent: RTPLAN unreadable", retry=False) is False
    assert broker.depth(q) == 0
    dead = broker.dlq_list(q)
    assert len(dead) == 1
    assert (dead[0].message_id, dead[0].attempts) == (mid, 1)
    assert "RTPLAN unreadable" in dead[0].reason
    broker.ack(d)  # acking a dead-lettered delivery changes nothing
    assert len(broker.dlq_list(q)) == 1


def test_dlq_list_filters_by_queue_oldest_first(broker_factory):
    broker = broker_factory()
    a, b = broker_factory.queue("a"), broker_factory.queue("b")
    for q, n in ((a, 1), (b, 2), (a, 3)):
        broker.publish(q, {"n": n})
        broker.nack(broker.get(q), reason=f"r{n}", retry=False)
    assert [d.body["n"] for d in broker.dlq_list(a)] == [1, 3]
    assert [d.body["n"] for d in broker.dlq_list(b)] == [2]
    mine = [d for d in broker.dlq_list() if d.queue in (a, b)]
    assert [d.body["n"] for d in mine] == [1, 2, 3]


def test_replay_puts_dead_letter_back_with_fresh_attempts(broker_factory):
    retry = RetryPolicy(max_attempts=2, base_seconds=0.01, max_seconds=0.02)
    broker = broker_factory(retry=retry)
    q, other_q = broker_factory.queue(), broker_factory.queue("other")
    mid = broker.publish(q, {"n": 1})
    assert broker.nack(broker.get(q, timeout=1), reason="boom") is True
    assert broker.nack(broker.get(q, timeout=1), reason="boom") is False
    broker.publish(other_q, {"n": 2})
    broker.nack(broker.get(other_q), reason="x", retry=False)
    [dead] = broker.dlq_list(q)
    assert dead.attempts == 2
    assert broker.dlq_replay([dead.id]) == 1
    assert broker.dlq_list(q) == []
    assert len(broker.dlq_list(other_q)) == 1  # only the named one was replayed
    assert broker.depth(q) == 1
    d = broker.get(q, timeout=1)
    assert d is not None
    assert (d.queue, d.message_id, d.attempt, d.body) == (q, mid, 1, {"n": 1})
    # the attempt count really restarted: it gets max_attempts tries again
    assert broker.nack(d, reason="again") is True
    broker.ack(broker.get(q, timeout=1))
    assert broker.depth(q) == 0
    assert broker.dlq_replay([dead.id]) == 0  # already replayed: nothing happens


def test_replay_all(broker_factory):
    broker = broker_factory()
    q = broker_factory.queue()
    mids = [broker.publish(q, {"n": i}) for i in range(3)]
    for _ in mids:
        broker.nack(broker.get(q), reason="x", retry=False)
    assert broker.depth(q) == 0
    assert broker.dlq_replay() == 3
    assert broker.dlq_list(q) == []
    got = []
    while (d := broker.get(q)) is not None:
        got.append((d.message_id, d.attempt))
        broker.ack(d)
    assert sorted(got) == sorted((m, 1) for m in mids)


def test_purge(broker_factory):
    broker = broker_factory()
    q = broker_factory.queue()
    for i in range(3):
        broker.publish(q, {"n": i})
        broker.nack(broker.get(q), reason="x", retry=False)
    dead = broker.dlq_list(q)
    assert len(dead) == 3
    assert broker.dlq_purge([dead[0].id]) == 1
    assert [d.id for d in broker.dlq_list(q)] == [d.id for d in dead[1:]]
    assert broker.dlq_purge([dead[0].id]) == 0
    assert broker.dlq_purge() == 2
    assert broker.dlq_list(q) == []
    assert broker.depth(q) == 0


# ---------------------------------------------------------------- delay, concurrency, durability

def test_publish_with_delay(broker_factory):
    broker = broker_factory()
    q = broker_factory.queue()
    start = time.monotonic()
    mid = broker.publish(q, {"n": 1}, delay=0.4)
    assert broker.get(q) is None
    assert broker.depth(q) == 1
    d = broker.get(q, timeout=2)
    assert d is not None and d.message_id == mid and d.attempt == 1
    assert time.monotonic() - start >= 0.35


def test_two_consumer_processes_handle_each_message_exactly_once(broker_factory):
    broker = broker_factory()
    q = broker_factory.queue()
    procs = [_spawn(broker_factory, CONSUMER_DRAIN, q, 30.0, "0.004") for _ in range(2)]
    try:
        for p in procs:
            assert p.stdout.readline().strip() == "READY", p.stderr.read()
        published = [broker.publish(q, {"i": i}) for i in range(200)]
        outputs = [p.communicate(timeout=60) for p in procs]
    finally:
        for p in procs:
            _kill(p)
    got = []
    for (out, err), p in zip(outputs, procs):
        assert p.returncode == 0, err
        lines = out.split("\n")
        assert "DONE" in lines
        mine = [line.split() for line in lines if line.startswith("GOT ")]
        assert mine, "one consumer got nothing: the test did not exercise concurrency"
        got.extend(mine)
    ids = [g[1] for g in got]
    assert len(ids) == 200
    assert sorted(ids) == sorted(published)
    assert {g[2] for g in got} == {"1"}  # no redelivery while leases were valid
    assert broker.depth(q) == 0


def test_messages_survive_close_and_reopen(broker_factory):
    b1 = broker_factory(lease_seconds=0.2)
    q = broker_factory.queue()
    m1 = b1.publish(q, {"n": 1})
    m2 = b1.publish(q, {"n": 2})
    b1.get(q)  # leased, never acked
    b1.close()
    b2 = broker_factory(lease_seconds=5)
    assert b2.depth(q) == 2
    time.sleep(0.25)
    got = {}
    while (d := b2.get(q)) is not None:
        got[d.message_id] = d.attempt
        b2.ack(d)
    assert got == {m1: 2, m2: 1}


# ---------------------------------------------------------------- retry policy (backend-free)

def test_retry_policy_delay_bounds():
    policy = RetryPolicy(max_attempts=5, base_seconds=1.0, max_seconds=10.0)
    rng = random.Random(1234)
    for attempt in range(1, 12):
        raw = min(10.0, 1.0 * 2 ** (attempt - 1))
        samples = [policy.delay(attempt, rng) for _ in range(200)]
        assert all(0.5 * raw <= s <= raw for s in samples), attempt
        assert max(samples) <= policy.max_seconds
        assert max(samples) - min(samples) > 0.1 * raw  # jittered, not constant
    assert policy.delay(0, rng) <= 1.0  # attempt 0 treated as the first
    assert 5.0 <= policy.delay(100, rng) <= 10.0  # capped
