"""The queues of a RabbitBroker: their names, their type, the delay grid, and declaring them.

For a queue ``Q`` (with the broker's prefix) there are ``Q``, its dead letters ``Q.dlq`` and
its delay queues ``Q.delay.<ms>``, each declared on first use on a link. The queue type is
quorum on RabbitMQ 3.10 or newer and classic before, unless the broker was told
(:meth:`Topology.resolve_queue_type`, from the version the server announces). The package
docstring (:mod:`mqi_framework.broker.rabbitmq`) explains the delay grid and why.
"""

from __future__ import annotations

import logging
import random
import re
from typing import Any, Callable, Optional

import pika
import pika.exceptions as pe

from ..base import BrokerError, BrokerUnavailable
from .link import Link, server_version

log = logging.getLogger(__name__)

QUEUE_TYPES = ("auto", "quorum", "classic")

#: delay-queue TTLs in milliseconds: round(1000 * 2**(k/2)) for k = -10 .. 34 (31 ms .. 36.4 h)
DELAY_BUCKETS_MS: tuple[int, ...] = tuple(int(round(1000 * 2 ** (k / 2))) for k in range(-10, 35))


def bucket_ms(delay: float, *, stochastic: bool, rng: Optional[random.Random] = None) -> Optional[int]:
    """The delay-queue TTL for ``delay`` seconds (None: no delay).

    ``stochastic``: pick one of the two neighbouring grid values with the probability that
    keeps the mean (retry backoff); else round up (an explicit ``publish(delay=...)``).
    """
    ms = float(delay) * 1000.0
    if ms <= 0:
        return None
    grid = DELAY_BUCKETS_MS
    if ms <= grid[0]:
        return grid[0]
    if ms >= grid[-1]:
        return grid[-1]
    hi = next(i for i, b in enumerate(grid) if b >= ms)
    lo = hi - 1
    if grid[hi] == ms or not stochastic:
        return grid[hi]
    share = (ms - grid[lo]) / (grid[hi] - grid[lo])
    return grid[hi] if (rng or random).random() < share else grid[lo]


class Topology:
    """Queue names with ``prefix``, the queue type, and the declarations and probes on a link.

    ``quorum`` is None until the first connection told the server's version (``auto``);
    ``where``, ``user`` and ``redact`` word the errors.
    """

    def __init__(self, prefix: str, queue_type: str, *, where: str, user: str,
                 redact: Callable[[str], str]) -> None:
        self.prefix = prefix
        self.queue_type = queue_type
        self.quorum: Optional[bool] = None if queue_type == "auto" else queue_type == "quorum"
        self.server_version = ""
        self.where = where
        self.user = user
        self.redact = redact

    # ------------------------------------------------------------------ names

    def phys(self, queue: str) -> str:
        if not queue or not isinstance(queue, str):
            raise ValueError("queue name must be a non-empty string")
        name = self.prefix + queue
        if len(name.encode()) + len(".delay.") + 9 > 255:
            raise ValueError(f"queue name {name!r} is too long for RabbitMQ (255 bytes with its suffixes)")
        return name

    @staticmethod
    def dlq(phys: str) -> str:
        return phys + ".dlq"

    @staticmethod
    def delay(phys: str, ms: int) -> str:
        return f"{phys}.delay.{ms}"

    # ------------------------------------------------------------------ queue type

    def on_connect(self, conn: pika.BlockingConnection) -> None:
        if self.quorum is None or not self.server_version:
            self.resolve_queue_type(conn)

    def resolve_queue_type(self, conn: pika.BlockingConnection) -> None:
        version = server_version(conn)
        numbers = tuple(int(n) for n in re.findall(r"\d+", version)[:2]) or (0, 0)
        quorum_ok = numbers >= (3, 10)  # quorum queues with message TTL and at-least-once dead-lettering
        if self.queue_type == "quorum" and not quorum_ok:
            raise BrokerError(f"queue_type=quorum needs RabbitMQ 3.10 or newer; {self.where} runs {version or '?'}")
        if self.queue_type == "auto":
            self.quorum = quorum_ok
        if not self.server_version:
            log.info("RabbitMQ %s at %s: %s durable queues", version or "?", self.where,
                     "quorum" if self.quorum else "classic")
        self.server_version = version or "?"

    # ------------------------------------------------------------------ declarations

    @staticmethod
    def aux(link: Link) -> Any:
        if link.aux is None or not link.aux.is_open:
            link.aux = link.conn.channel()
        return link.aux

    def base_args(self) -> dict[str, Any]:
        return {"x-queue-type": "quorum"} if self.quorum else {}

    def declare(self, link: Link, name: str, args: dict[str, Any]) -> None:
        if name in link.declared:
            return
        try:
            self.aux(link).queue_declare(name, durable=True, arguments=args)
        except pe.ChannelClosedByBroker as exc:
            link.aux = None
            raise self.refused(exc, name) from None
        link.declared.add(name)

    def refused(self, exc: pe.ChannelClosedByBroker, name: str) -> BrokerError:
        text = self.redact(f"{exc.reply_code} {exc.reply_text}")
        if exc.reply_code == 406 and "inequivalent" in exc.reply_text:
            return BrokerError(
                f"queue {name!r} exists on RabbitMQ at {self.where} with other arguments than mqi-host declares "
                f"({'quorum' if self.quorum else 'classic'}): {text}. Delete it when it is empty, or choose the "
                f"matching type with ?queue_type=classic|quorum in broker.url")
        if exc.reply_code == 403:
            return BrokerError(f"user {self.user!r} may not use queue {name!r} on RabbitMQ at {self.where}: {text} "
                               f"(rabbitmqctl set_permissions)")
        return BrokerUnavailable(f"RabbitMQ at {self.where} refused queue {name!r}: {text}")

    def declare_main(self, link: Link, phys: str) -> None:
        self.declare(link, phys, self.base_args())

    def declare_target(self, link: Link, phys: str, kind: str, ms: Optional[int]) -> str:
        """Declare what a message for ``phys`` of ``kind`` (main, delay, dlq) needs; return its routing key."""
        if kind == "dlq":
            name = self.dlq(phys)
            self.declare(link, name, self.base_args())
            return name
        self.declare_main(link, phys)
        if kind == "main":
            return phys
        assert ms is not None
        name = self.delay(phys, ms)
        args = {**self.base_args(), "x-message-ttl": ms, "x-dead-letter-exchange": "",
                "x-dead-letter-routing-key": phys}
        if self.quorum:
            args.update({"x-dead-letter-strategy": "at-least-once", "x-overflow": "reject-publish"})
        self.declare(link, name, args)
        return name

    def probe(self, link: Link, name: str) -> Optional[int]:
        """Ready messages in ``name``, None when the queue does not exist."""
        try:
            return int(self.aux(link).queue_declare(name, passive=True).method.message_count)
        except pe.ChannelClosedByBroker as exc:
            link.aux = None
            if exc.reply_code == 404:
                return None
            raise self.refused(exc, name) from None

    def delete(self, link: Link, phys: str) -> None:
        """Delete ``phys``, its DLQ and its delay queues, messages included."""
        channel = self.aux(link)
        for name in [phys, self.dlq(phys)] + [self.delay(phys, ms) for ms in DELAY_BUCKETS_MS]:
            channel.queue_delete(name)
            link.declared.discard(name)

    # ------------------------------------------------------------------ publishing

    def send(self, link: Link, channel: Any, phys: str, kind: str, ms: Optional[int], data: bytes,
             props: pika.BasicProperties) -> None:
        """One confirmed publish on ``channel``; declares what it needs, redeclares once if unroutable."""
        for round_ in (1, 2):
            key = self.declare_target(link, phys, kind, ms)
            try:
                channel.basic_publish("", key, data, props, mandatory=True)
                return
            except pe.UnroutableError:
                link.declared.clear()  # deleted behind our back: declare again
                if round_ == 2:
                    raise BrokerError(f"RabbitMQ at {self.where} could not route a message to {key!r}") from None
            except pe.NackError:
                raise BrokerUnavailable(f"RabbitMQ at {self.where} did not accept a message for {key!r} "
                                        f"(negative publisher confirm)") from None
