"""The production broker: RabbitMQ over AMQP 0-9-1 with pika (``amqp://`` / ``amqps://`` URLs).

It keeps the :class:`~mqi_framework.broker.base.Broker` contract with the means RabbitMQ
offers; ``docs/brokers.md`` explains the differences a site sees.

Queues. Every queue name gets the optional ``prefix`` (sites sharing a vhost, tests). For a
queue ``Q`` the broker declares, on first use:

* ``Q``: durable, ``x-queue-type: quorum`` (replicated, poison-message safe) when the
  server is RabbitMQ 3.10 or newer, else a classic durable queue (``queue_type`` / the
  URL query ``?queue_type=classic|quorum`` force one);
* ``Q.dlq``: its dead letters, same type;
* ``Q.delay.<ms>``: delay queues for retry backoff and ``publish(delay=...)``. Each has a
  fixed ``x-message-ttl`` of ``<ms>`` and dead-letters expired messages back into ``Q``
  (default exchange, routing key ``Q``; on quorum queues with
  ``x-dead-letter-strategy: at-least-once``, so a message is never dropped between the two
  queues). Because every message in one delay queue has the same TTL, the queue is FIFO
  in expiry order: there is no head-of-line blocking (a per-message ``expiration`` on one
  shared delay queue would hold a 1 s retry behind a 5 min one). The TTLs form a fixed
  grid, ``round(1000 * 2**(k/2))`` ms for k in -10..34 (31 ms .. 36 h, a factor sqrt(2)
  apart, :data:`DELAY_BUCKETS_MS`). A retry backoff (already jittered by
  :class:`RetryPolicy`) is rounded stochastically to one of its two neighbouring grid
  values so that the mean delay is kept and the jitter still spreads a burst of retries;
  an explicit ``publish(delay=...)`` is rounded up (never earlier than asked, at most
  sqrt(2) later). Delay queues are created only when used and are never deleted
  automatically (an idle quorum queue costs little; ``delete_queue`` removes them all).

Messages are persistent JSON (``delivery_mode=2``), published with ``mandatory`` on a
channel in confirm mode: ``publish`` returns once RabbitMQ confirmed the message (stored
on a quorum majority). The attempt count travels in the header ``mqi-attempts`` (attempts
used up before this copy was published).

Leases. ``get`` uses ``basic.get`` (and, while waiting for a message, a temporary consumer
with prefetch 1 that is cancelled as soon as one message arrived), manual acks. There is
no time-based lease: an unacked message is invisible to other consumers for as long as the
consumer's connection lives, and RabbitMQ hands it out again the moment that connection
dies (process killed, network lost, missed heartbeats). ``extend`` therefore only services
the connection (heartbeats). Redeliveries are counted with ``x-delivery-count``
(quorum queues); on classic queues a redelivered message is re-published with its attempt
count raised and the original acked, because classic queues only flag "redelivered".
``Delivery.attempt = mqi-attempts + redeliveries + 1``; a message delivered again after its
last allowed attempt is dead-lettered (reason "... the consumer died ...") instead of
being handed out, like the SQLite broker's expired-lease sweep.

``nack(retry=True)`` publishes a copy with ``mqi-attempts = attempt`` to the delay queue and
THEN acks the original: there is exactly one live copy; a crash between the two leaves two
(duplicates are harmless, consumers are idempotent), never none. After ``max_attempts`` (or
with ``retry=False``) the copy goes to ``Q.dlq`` with reason, attempts, time and a
dead-letter id in its headers, then the original is acked: exactly one dead letter. A
consumer may only settle a delivery on the connection it came on: after a reconnect the
old delivery tags are void (RabbitMQ has re-queued those messages), so ``ack``/``nack`` of
such a stale delivery are ignored with a warning.

Dead letters. ``dlq_list``/``dlq_replay``/``dlq_purge`` drain ``Q.dlq`` with ``basic.get``
on a channel of their own, ack what they replay or purge and close the channel, which
puts everything else back (order kept). Fine for the small DLQs of a clinic (hundreds);
not an analytics tool. Listing without a queue covers the queues named in ``queues=``
(``make_broker`` passes the config's queues) and every queue this object used. Two
operators listing the same DLQ at the same instant may each see only part of it.

Depth. AMQP reports only ready messages (passive ``queue.declare``), so ``depth`` is ready
+ delayed (the ready counts of ``Q`` and its delay queues, probed one by one); messages a
consumer holds are not counted (``depth_counts_leased`` is False).

Connections and threads. pika's ``BlockingConnection`` is not thread-safe. A RabbitBroker
opens one connection per thread that uses it (lazily, on first use) and per process (a
forked child never touches its parent's socket). A delivery must be acked or nacked on
the thread that got it. ``close()`` closes every connection the object opened; call it
when no other thread is using the object. Heartbeats are on (60 s unless the URL says
``?heartbeat=``); ``blocked_connection_timeout`` is 30 s, so a broker in a resource alarm
fails publishes instead of hanging them.

Failures. Nothing connects in the constructor. ``publish`` reconnects with exponential
backoff for up to ``reconnect_seconds`` and then raises :class:`BrokerUnavailable`;
``get`` reconnects with backoff within its timeout and returns None while the broker is
away (a worker loop keeps running and heartbeating); ``depth`` and the DLQ operations try
one fresh connection and raise. Wrong credentials, a missing virtual host, missing
permissions and queues declared with other arguments raise :class:`BrokerError` with a
precise message and are not retried. Passwords never appear in messages or logs
(:func:`redact_url`).

Modules. :mod:`.broker` (:class:`RabbitBroker`: publish, get, settle, inspect),
:mod:`.link` (connections per thread and process, reconnecting; the one use of a private
pika attribute), :mod:`.topology` (queue names and types, the delay grid, declarations),
:mod:`.deadletters` (the dead-letter format and the DLQ operations), :mod:`.message`
(message properties and headers). Import from the package: the modules inside may change.
"""

from __future__ import annotations

from .broker import RabbitBroker
from .message import H_ATTEMPTS, H_DEAD_AT, H_DEAD_ID, H_LAST_ERROR, H_QUEUE, H_REASON
from .topology import DELAY_BUCKETS_MS, QUEUE_TYPES, bucket_ms

__all__ = [
    "DELAY_BUCKETS_MS",
    "H_ATTEMPTS",
    "H_DEAD_AT",
    "H_DEAD_ID",
    "H_LAST_ERROR",
    "H_QUEUE",
    "H_REASON",
    "QUEUE_TYPES",
    "RabbitBroker",
    "bucket_ms",
]
