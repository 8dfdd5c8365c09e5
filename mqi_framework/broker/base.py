"""The broker contract every backend (embedded SQLite, RabbitMQ) fulfils.

Semantics (the contract tests in ``tests/contract/`` check each of them):

* ``publish`` returns only once the message is durably stored (a publisher confirm);
  ``message_id`` is kept across retries, replays and redeliveries.
* ``get`` hands out one message under a lease of ``lease_seconds``; the message is
  invisible to other consumers until it is acked, nacked or the lease runs out. A
  consumer that dies without acking gets its message redelivered after the lease
  (``Delivery.attempt`` counts deliveries, starting at 1).
* ``ack`` removes the message for good.
* ``nack(retry=True)`` makes it visible again after an exponential backoff with jitter
  (``RetryPolicy``); once ``attempt`` reached ``max_attempts`` it is dead-lettered
  instead. ``nack(retry=False)`` dead-letters at once (permanent failure). A message
  is dead-lettered exactly once; nothing of it stays in the live queue.
* Dead letters keep queue, body, reason and attempts; ``dlq_replay`` puts them back on
  their queue with a fresh attempt count; ``dlq_purge`` deletes them.

Backends differ in two documented ways, exposed as class attributes so that callers and
the contract tests can tell (see ``docs/brokers.md``):

* ``supports_lease_expiry``: the lease runs out after ``lease_seconds`` (SQLite). On
  RabbitMQ a delivery stays leased for as long as the consumer's connection lives and is
  redelivered the moment that connection dies; ``extend`` only keeps the connection alive.
* ``depth_counts_leased``: ``depth`` includes messages a consumer holds (SQLite). RabbitMQ
  does not report unacked deliveries over AMQP, so there ``depth`` is ready + delayed.
"""

from __future__ import annotations

import abc
import random
import re
from typing import Any, ClassVar, Iterable, Optional

import attrs


@attrs.frozen
class RetryPolicy:
    """Exponential backoff with full jitter: delay = uniform(0.5, 1) * min(max, base * 2**(n-1))."""

    max_attempts: int = 5
    base_seconds: float = 1.0
    max_seconds: float = 300.0

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        raw = min(self.max_seconds, self.base_seconds * (2 ** max(0, attempt - 1)))
        return raw * (rng or random).uniform(0.5, 1.0)


@attrs.frozen
class Delivery:
    """One message handed to a consumer. ``tag`` identifies the lease for ack/nack."""

    queue: str
    message_id: str
    body: dict
    attempt: int
    tag: Any


@attrs.frozen
class DeadLetter:
    id: str
    queue: str
    message_id: str
    body: dict
    reason: str
    attempts: int
    dead_at: float


_USERINFO = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*://[^:/@]*):[^/]*@")


def redact_url(url: str) -> str:
    """``url`` with any password replaced by ``***`` (safe for messages and logs)."""
    return _USERINFO.sub(r"\1:***@", url)


@attrs.frozen
class QueueStats:
    """One queue as :meth:`Broker.queues` sees it."""

    queue: str
    depth: int  # not yet acked: ready + delayed + leased
    ready: int  # visible now
    delayed: int  # waiting for a publish delay or a retry backoff
    leased: int  # handed to a consumer, lease still running
    dead: int  # dead letters of this queue


class BrokerError(Exception):
    """The broker could not be reached or refused an operation (retryable by callers)."""


class BrokerUnavailable(BrokerError):
    """The broker cannot be reached right now (down, restarting, network): try again later.

    Other :class:`BrokerError` s are problems a retry does not fix (wrong credentials, a
    missing virtual host, a queue declared with other arguments).
    """


class Broker(abc.ABC):
    """A durable message queue with leases, retries and a dead-letter queue."""

    retry: RetryPolicy

    #: a leased message comes back by itself after ``lease_seconds`` (else: when its consumer's connection dies)
    supports_lease_expiry: ClassVar[bool] = True
    #: ``depth`` counts messages a consumer holds right now
    depth_counts_leased: ClassVar[bool] = True

    @abc.abstractmethod
    def publish(self, queue: str, body: dict, *, message_id: Optional[str] = None, delay: float = 0.0) -> str:
        """Store ``body`` (JSON-serialisable) durably on ``queue``; return its message id.

        ``delay`` seconds hold the message back before it becomes visible.
        """

    @abc.abstractmethod
    def get(self, queue: str, *, timeout: float = 0.0) -> Optional[Delivery]:
        """Lease the next visible message of ``queue``, waiting up to ``timeout`` seconds."""

    @abc.abstractmethod
    def ack(self, delivery: Delivery) -> None:
        """The message was handled and its result recorded: remove it."""

    @abc.abstractmethod
    def nack(self, delivery: Delivery, *, reason: str, retry: bool = True) -> bool:
        """Give the message back. Return True if it will be retried, False if dead-lettered."""

    @abc.abstractmethod
    def extend(self, delivery: Delivery, seconds: float) -> None:
        """Extend the lease of a message still being handled."""

    @abc.abstractmethod
    def depth(self, queue: str) -> int:
        """Messages on ``queue`` not yet acked (visible, delayed or leased)."""

    @abc.abstractmethod
    def queues(self) -> list[QueueStats]:
        """Every queue the broker knows that holds messages or dead letters (for status pages)."""

    @abc.abstractmethod
    def dlq_list(self, queue: Optional[str] = None) -> list[DeadLetter]:
        """Dead letters, oldest first, optionally of one queue."""

    @abc.abstractmethod
    def dlq_replay(self, ids: Optional[Iterable[str]] = None) -> int:
        """Put dead letters (all when ``ids`` is None) back on their queues; return how many."""

    @abc.abstractmethod
    def dlq_purge(self, ids: Optional[Iterable[str]] = None) -> int:
        """Delete dead letters (all when ``ids`` is None); return how many."""

    def close(self) -> None:
        """Release connections."""
