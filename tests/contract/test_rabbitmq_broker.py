"""What only the RabbitMQ backend does: queue types, delay queues, reconnects, errors, threads.

The shared promises are in test_broker_contract.py (run over both backends); these tests use
the ``rabbit`` fixture (conftest.py): brokers on a unique queue prefix, deleted afterwards.
"""

from __future__ import annotations

import random
import threading
import time
import urllib.parse

import pika
import pytest

from mqi_framework.broker import BrokerError, BrokerUnavailable, RetryPolicy
from mqi_framework.broker.rabbitmq import DELAY_BUCKETS_MS, RabbitBroker, bucket_ms


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _url_with(url: str, **changes: str) -> str:
    parts = urllib.parse.urlsplit(url)
    password = changes.get("password", parts.password or "")
    port = changes.get("port", str(parts.port or 5672))
    path = "/" + changes.get("vhost", parts.path.lstrip("/") or "%2F")
    return urllib.parse.urlunsplit((parts.scheme, f"{parts.username}:{password}@{parts.hostname}:{port}", path, "",
                                    ""))


# ---------------------------------------------------------------- delay grid (no server needed)

def test_delay_grid_and_rounding():
    grid = DELAY_BUCKETS_MS
    assert grid[0] == 31 and grid[-1] > 36 * 3600 * 1000 and len(grid) == 45
    assert all(1.40 < b / a < 1.43 for a, b in zip(grid, grid[1:]))  # sqrt(2) apart
    assert bucket_ms(0, stochastic=False) is None and bucket_ms(-1, stochastic=True) is None
    for delay in (0.001, 0.04, 0.4, 1.0, 7.3, 299.0):
        up = bucket_ms(delay, stochastic=False)
        assert up >= delay * 1000 and (up <= delay * 1000 * 1.415 or up == grid[0])  # never earlier
    rng = random.Random(7)
    for delay in (0.3, 2.5, 40.0):
        picks = [bucket_ms(delay, stochastic=True, rng=rng) for _ in range(4000)]
        assert len(set(picks)) == 2  # the two neighbours: a burst of retries is still spread
        assert sum(picks) / len(picks) == pytest.approx(delay * 1000, rel=0.03)  # the mean is kept
    assert bucket_ms(10 ** 9, stochastic=True) == grid[-1]


# ---------------------------------------------------------------- queues

def test_queues_are_quorum_on_a_3_10_server_and_a_mismatch_is_explained(rabbit):
    broker = rabbit.broker()
    q = rabbit.queue()
    broker.publish(q, {"n": 1})
    if broker._quorum is False:
        pytest.skip(f"server {broker._server_version} is older than 3.10: classic queues (documented)")
    conn = pika.BlockingConnection(pika.URLParameters(rabbit.url))
    try:  # the queue is a quorum queue: declaring it classic is refused
        with pytest.raises(pika.exceptions.ChannelClosedByBroker, match="inequivalent arg 'x-queue-type'"):
            conn.channel().queue_declare(rabbit.prefix + q, durable=True, arguments={"x-queue-type": "classic"})
    finally:
        conn.close()
    classic = rabbit.broker(queue_type="classic")
    with pytest.raises(BrokerError, match="exists .* with other arguments .*queue_type") as info:
        classic.get(q)
    assert not isinstance(info.value, BrokerUnavailable)


def test_classic_queues_count_redeliveries_and_dead_letter(rabbit):
    retry = RetryPolicy(max_attempts=3, base_seconds=0.05, max_seconds=0.1)
    url = rabbit.url + ("&" if "?" in rabbit.url else "?") + "queue_type=classic"
    prefix = rabbit.prefix + "classic."
    q = rabbit.queue(prefix=prefix)
    first = rabbit.broker(url=url, prefix=prefix, retry=retry)
    assert first.queue_type == "classic"
    mid = first.publish(q, {"n": 1})
    assert first.get(q).attempt == 1
    first.close()  # died holding it: classic queues only flag the redelivery
    second = rabbit.broker(url=url, prefix=prefix, retry=retry)
    d = second.get(q, timeout=5)
    assert (d.message_id, d.attempt) == (mid, 2)
    assert second.nack(d, reason="boom") is True  # retry through a classic delay queue
    d = second.get(q, timeout=5)
    assert (d.message_id, d.attempt) == (mid, 3)
    assert second.nack(d, reason="boom") is False
    assert [(x.message_id, x.attempts) for x in second.dlq_list(q)] == [(mid, 3)]
    assert second.depth(q) == 0


def test_prefixes_isolate_sites_and_dead_letters_name_the_plain_queue(rabbit):
    a = rabbit.broker(prefix=rabbit.prefix + "a.")
    b = rabbit.broker(prefix=rabbit.prefix + "b.")
    q = "mqi.events"
    rabbit.queue(q, prefix=rabbit.prefix + "a.")
    rabbit.queue(q, prefix=rabbit.prefix + "b.")
    a.publish(q, {"site": "a"})
    assert b.get(q, timeout=0.2) is None and b.depth(q) == 0
    d = a.get(q)
    a.nack(d, reason="x", retry=False)
    [dead] = a.dlq_list()  # the queues it used are listed without naming them
    assert dead.queue == q
    assert b.dlq_list() == []
    fresh = rabbit.broker(prefix=rabbit.prefix + "a.", queues=[q])  # e.g. the CLI: knows the queue by config
    assert [x.id for x in fresh.dlq_list()] == [dead.id]


# ---------------------------------------------------------------- delays

def test_short_delay_is_not_held_behind_a_long_one(rabbit):
    broker = rabbit.broker()
    q = rabbit.queue()
    start = time.monotonic()
    broker.publish(q, {"n": "late"}, delay=3.0)
    broker.publish(q, {"n": "early"}, delay=0.3)
    d = broker.get(q, timeout=2)
    assert d is not None and d.body == {"n": "early"}
    assert time.monotonic() - start < 1.5
    broker.ack(d)
    assert broker.depth(q) == 1  # the late one waits in its delay queue


def test_retry_copies_leave_nothing_behind(rabbit):
    retry = RetryPolicy(max_attempts=4, base_seconds=0.05, max_seconds=0.3)
    broker = rabbit.broker(retry=retry)
    q = rabbit.queue()
    mids = [broker.publish(q, {"n": i}) for i in range(5)]
    dead = 0
    while dead < 5:
        d = broker.get(q, timeout=3)
        assert d is not None
        dead += broker.nack(d, reason=f"boom {d.attempt}") is False
    assert broker.depth(q) == 0  # no copy in Q or in any delay queue
    letters = broker.dlq_list(q)
    assert sorted(x.message_id for x in letters) == sorted(mids)
    assert {x.attempts for x in letters} == {4}
    assert all("gave up after 4 attempts" in x.reason for x in letters)


# ---------------------------------------------------------------- failures

def test_unreachable_broker_publish_gives_up_get_waits_and_nothing_raises_late(rabbit):
    broker = RabbitBroker(_url_with(rabbit.url, port=str(_free_port())), reconnect_seconds=0.6)
    start = time.monotonic()
    with pytest.raises(BrokerUnavailable, match="could not publish to 'q'.*unavailable"):
        broker.publish("q", {"n": 1})
    assert 0.5 <= time.monotonic() - start < 3
    start = time.monotonic()
    assert broker.get("q", timeout=0.5) is None  # a worker loop keeps running
    assert 0.45 <= time.monotonic() - start < 2
    with pytest.raises(BrokerUnavailable, match="cannot reach RabbitMQ"):
        broker.depth("q")
    broker.close()


@pytest.mark.parametrize("change, expected", [
    ({"password": "wrong-secret-123"}, "refused the login of user"),
    ({"vhost": "mqi-missing-vhost"}, "virtual host 'mqi-missing-vhost' does not exist"),
])
def test_credentials_and_vhost_errors_are_precise_and_never_show_the_password(rabbit, change, expected):
    url = _url_with(rabbit.url, **change)
    broker = RabbitBroker(url)
    for call in (lambda: broker.depth("q"), lambda: broker.publish("q", {}), lambda: broker.get("q", timeout=1)):
        with pytest.raises(BrokerError, match=expected) as info:
            call()
        assert not isinstance(info.value, BrokerUnavailable)  # not retried: a person must fix it
        assert "wrong-secret-123" not in str(info.value)
    assert "wrong-secret-123" not in repr(broker)
    broker.close()


def test_publish_rides_out_a_dropped_connection(rabbit):
    broker = rabbit.broker()
    q = rabbit.queue()
    broker.publish(q, {"n": 1})
    import socket

    broker._state.link.conn._impl._transport._sock.shutdown(socket.SHUT_RDWR)
    broker.publish(q, {"n": 2})  # reconnects by itself
    assert broker.depth(q) == 2


# ---------------------------------------------------------------- threads

def test_each_thread_has_its_own_connection_and_settles_its_own_deliveries(rabbit):
    broker = rabbit.broker()
    q = rabbit.queue()
    for i in range(20):
        broker.publish(q, {"n": i})
    got: list[int] = []
    errors: list[BaseException] = []

    def consume() -> None:
        try:
            while (d := broker.get(q, timeout=0.5)) is not None:
                got.append(d.body["n"])
                broker.ack(d)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=consume) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == [] and sorted(got) == list(range(20))
    assert len(broker._links) == 4  # one connection per thread that used it: 3 consumers + this one
    broker.publish(q, {"n": "x"})
    d = broker.get(q, timeout=1)
    failure: list[BaseException] = []
    t = threading.Thread(target=lambda: failure.extend(_raises(lambda: broker.ack(d))))
    t.start()
    t.join()
    assert failure and "thread that got it" in str(failure[0])
    broker.ack(d)
    assert broker.depth(q) == 0


def _raises(fn) -> list[BaseException]:
    try:
        fn()
    except BaseException as exc:  # noqa: BLE001
        return [exc]
    return []


def test_queue_stats_for_status_and_the_dashboard(rabbit):
    from mqi_framework.broker.sqlite import QueueStats

    broker = rabbit.broker(queues=["mqi.events", "mqi.unused"])
    q = rabbit.queue("mqi.events")
    rabbit.queue("mqi.unused")
    broker.publish(q, {"n": "dead"})
    broker.nack(broker.get(q), reason="x", retry=False)
    broker.publish(q, {"n": "ready"})
    broker.publish(q, {"n": "delayed"}, delay=60)
    broker.get(q)  # held: not visible over AMQP
    assert broker.queues() == [QueueStats("mqi.events", depth=1, ready=0, delayed=1, leased=0, dead=1)]
