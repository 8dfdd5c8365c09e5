"""The :class:`RabbitBroker`: the :class:`~mqi_framework.broker.base.Broker` contract on RabbitMQ.

This module holds what a caller of the broker sees: the constructor (URL and options),
publishing, consuming with its attempt counting, settling (ack, nack: retry through a delay
queue or dead-letter) and inspection. It delegates to :class:`~.link.Connections` (one
connection per thread and process), :class:`~.topology.Topology` (queue names, types and
declarations) and :class:`~.deadletters.DeadLetterQueues`. The package docstring
(:mod:`mqi_framework.broker.rabbitmq`) explains the design.
"""

from __future__ import annotations

import json
import logging
import os
import random
import threading
import time
import urllib.parse
import uuid
from typing import Any, Iterable, Optional

import pika

from ...waits import waiting
from ..base import Broker, BrokerError, BrokerUnavailable, DeadLetter, Delivery, QueueStats, RetryPolicy, redact_url
from .deadletters import DeadLetterQueues, dead_letter_headers
from .link import (BACKOFF_FIRST, BACKOFF_MAX, LINK_ERRORS, Connections, Link, ThreadState, connection_parameters,
                   describe, split_url)
from .message import CLIP, H_ATTEMPTS, H_LAST_ERROR, as_int, as_text, properties
from .topology import DELAY_BUCKETS_MS, QUEUE_TYPES, Topology, bucket_ms

log = logging.getLogger(__name__)


class _Tag:
    """``Delivery.tag`` of a RabbitBroker: the link and delivery tag, and the raw message."""

    __slots__ = ("link", "delivery_tag", "queue", "message_id", "body")

    def __init__(self, link: Link, delivery_tag: int, queue: str, message_id: str, body: bytes) -> None:
        self.link, self.delivery_tag, self.queue, self.message_id, self.body = (
            link, delivery_tag, queue, message_id, body)

    def __repr__(self) -> str:
        return f"<rabbitmq delivery {self.delivery_tag} of {self.queue}>"


class RabbitBroker(Broker):
    """:class:`Broker` on RabbitMQ (see the package docstring for the design)."""

    supports_lease_expiry = False
    depth_counts_leased = False

    def __init__(
        self,
        url: str,
        *,
        retry: RetryPolicy = RetryPolicy(),
        lease_seconds: float = 60.0,
        prefix: str = "",
        queues: Iterable[str] = (),
        queue_type: Optional[str] = None,
        reconnect_seconds: float = 10.0,
    ) -> None:
        if retry.max_attempts < 1:
            raise ValueError(f"retry.max_attempts must be at least 1, got {retry.max_attempts!r}")
        if lease_seconds <= 0:
            raise ValueError(f"lease_seconds must be positive, got {lease_seconds!r}")
        self.retry = retry
        self.lease_seconds = float(lease_seconds)  # kept for symmetry: RabbitMQ leases end with the connection
        self.prefix = prefix or ""
        self.reconnect_seconds = float(reconnect_seconds)
        self.url = redact_url(url)
        self._secret = urllib.parse.urlsplit(url).password or ""
        pika_url, ours = split_url(url)
        queue_type = queue_type or ours.get("queue_type") or "auto"
        if queue_type not in QUEUE_TYPES:
            raise ValueError(f"queue_type must be one of {', '.join(QUEUE_TYPES)}, got {queue_type!r}")
        self.queue_type = queue_type
        try:
            params = connection_parameters(pika_url)
        except Exception as exc:  # pika raises ValueError, TypeError, ... for a bad URL
            raise ValueError(f"broker URL {self.url}: {self._redact(str(exc))}") from None
        self.where = f"{params.host}:{params.port} (vhost {params.virtual_host!r})"
        self.user = params.credentials.username
        self._known = [q for q in queues if q]
        self._used: set[str] = set()
        self._rng = random.Random()
        self._topology = Topology(self.prefix, queue_type, where=self.where, user=self.user, redact=self._redact)
        self._connections = Connections(params, owner=self, where=self.where, user=self.user, redact=self._redact,
                                        on_open=self._topology.on_connect, rng=self._rng)
        self._dead_letters = DeadLetterQueues(self._connections, self._topology)

    def __repr__(self) -> str:
        prefix = f", prefix={self.prefix!r}" if self.prefix else ""
        return f"RabbitBroker({self.url!r}{prefix})"

    # The contract tests cut a thread's connection through ``_state.link`` and count
    # ``_links``; they read ``_quorum`` and ``_server_version`` to skip on old servers.

    @property
    def _state(self) -> ThreadState:
        return self._connections.state

    @property
    def _links(self) -> set[Link]:
        return self._connections.links

    @property
    def _quorum(self) -> Optional[bool]:
        return self._topology.quorum

    @property
    def _server_version(self) -> str:
        return self._topology.server_version

    def _redact(self, text: str) -> str:
        if self._secret and len(self._secret) >= 3:
            text = text.replace(self._secret, "***")
        return text

    # ------------------------------------------------------------------ publishing

    def _publish_patient(self, queue: str, kind: str, ms: Optional[int], data: bytes,
                         props: pika.BasicProperties) -> None:
        phys = self._topology.phys(queue)
        deadline = time.monotonic() + self.reconnect_seconds
        backoff = BACKOFF_FIRST
        while True:
            link: Optional[Link] = None
            try:
                link = self._connections.link_now()
                self._topology.send(link, link.main, phys, kind, ms, data, props)
                self._connections.state.backoff = 0.0
                return
            except BrokerUnavailable as exc:
                last: BaseException = exc
            except BrokerError:
                raise
            except LINK_ERRORS as exc:
                self._connections.lost(link, exc)
                last = exc
            left = deadline - time.monotonic()
            if left <= 0:
                raise BrokerUnavailable(
                    f"could not publish to {queue!r}: RabbitMQ at {self.where} unavailable for "
                    f"{self.reconnect_seconds:.0f}s "
                    f"({self._redact(str(last) if isinstance(last, BrokerError) else describe(last))})")
            with waiting(f"RabbitMQ at {self.where}"):
                time.sleep(min(left, backoff * self._rng.uniform(0.5, 1.0)))
            backoff = min(BACKOFF_MAX, backoff * 2)

    def publish(self, queue: str, body: dict, *, message_id: Optional[str] = None, delay: float = 0.0) -> str:
        if not isinstance(body, dict):
            raise TypeError(f"message body must be a dict, got {type(body).__name__}")
        self._topology.phys(queue)
        data = json.dumps(body, ensure_ascii=False, allow_nan=False).encode("utf-8")
        message_id = message_id or uuid.uuid4().hex
        ms = bucket_ms(delay, stochastic=False) if delay and delay > 0 else None
        self._used.add(queue)
        self._publish_patient(queue, "delay" if ms else "main", ms, data,
                             properties(message_id, {H_ATTEMPTS: 0}))
        return message_id

    # ------------------------------------------------------------------ consuming

    def get(self, queue: str, *, timeout: float = 0.0) -> Optional[Delivery]:
        phys = self._topology.phys(queue)
        self._used.add(queue)
        deadline = time.monotonic() + max(0.0, float(timeout))
        st = self._connections.state
        while True:
            link = self._connections.current()
            if link is None and time.monotonic() >= st.retry_at:
                try:
                    link = self._connections.open_link()
                except BrokerUnavailable as exc:
                    self._connections.note_unreachable(exc)
            if link is None:
                now = time.monotonic()
                if now >= deadline:
                    return None
                time.sleep(max(0.0, min(st.retry_at - now, deadline - now)) or 0.01)
                continue
            try:
                self._topology.declare_main(link, phys)
                method, props, body = link.main.basic_get(phys, auto_ack=False)
                if method is None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return None
                    got = link.wait_for_one(phys, left)
                    if got is None:
                        return None
                    method, props, body = got
                delivery = self._admit(link, queue, phys, method, props, body)
            except BrokerUnavailable as exc:  # a queue refused for now (e.g. while the broker restarts)
                self._connections.lost(link, exc)
                self._connections.note_unreachable(exc)
                continue
            except BrokerError:
                raise
            except LINK_ERRORS as exc:
                self._connections.lost(link, exc)
                self._connections.note_unreachable(
                    BrokerUnavailable(f"RabbitMQ at {self.where}: {self._redact(describe(exc))}"))
                continue
            st.backoff = 0.0
            if delivery is not None:
                return delivery

    def _admit(self, link: Link, queue: str, phys: str, method: Any, props: Any, body: bytes) -> Optional[Delivery]:
        """Turn a fetched message into a Delivery, or settle it here (dead-letter, classic re-issue)."""
        link.unacked.add(method.delivery_tag)
        headers = props.headers or {}
        base = max(0, as_int(headers.get(H_ATTEMPTS)))
        message_id = as_text(props.message_id) or uuid.uuid4().hex
        tag = _Tag(link, method.delivery_tag, queue, message_id, body)
        if self._topology.quorum:
            attempt = base + max(0, as_int(headers.get("x-delivery-count"))) + 1
        else:
            attempt = base + (1 if method.redelivered else 0) + 1
        if attempt > self.retry.max_attempts:
            self._dead_letter(link, tag, f"delivered {attempt - 1} time(s) without an ack: the consumer died "
                                         f"or lost its connection each time", attempt - 1)
            return None
        if method.redelivered and not self._topology.quorum:
            # classic queues only flag a redelivery: re-issue the message with the crashed
            # attempt counted, so that a message that kills its consumers still dead-letters
            props2 = properties(message_id, {H_ATTEMPTS: base + 1})
            self._topology.send(link, link.main, phys, "main", None, body, props2)
            link.main.basic_ack(method.delivery_tag)
            link.unacked.discard(method.delivery_tag)
            return None
        try:
            data = json.loads(body)
            if not isinstance(data, dict):
                raise ValueError(f"a JSON {type(data).__name__}, not an object")
        except ValueError as exc:
            self._dead_letter(link, tag, f"unreadable message body (not a JSON object): {exc}", attempt)
            return None
        return Delivery(queue=queue, message_id=message_id, body=data, attempt=attempt, tag=tag)

    def _held(self, delivery: Delivery, verb: str) -> tuple[_Tag, Optional[Link]]:
        tag = delivery.tag
        if not isinstance(tag, _Tag):
            raise ValueError(f"not a delivery of a RabbitBroker: tag {tag!r}")
        if tag.link.thread != threading.get_ident() or tag.link.pid != os.getpid():
            raise BrokerError(f"{verb} of message {delivery.message_id} must happen on the thread that got it "
                              f"(pika connections are not thread-safe)")
        link = self._connections.current()
        if link is not tag.link or tag.delivery_tag not in link.unacked:
            log.warning("%s of message %s on queue %s ignored: the connection it came on was lost (RabbitMQ gives "
                        "it to a consumer again) or it was settled already", verb, delivery.message_id, delivery.queue)
            return tag, None
        return tag, link

    def ack(self, delivery: Delivery) -> None:
        tag, link = self._held(delivery, "ack")
        if link is None:
            return
        try:
            link.main.basic_ack(tag.delivery_tag)
            link.unacked.discard(tag.delivery_tag)
        except LINK_ERRORS as exc:
            self._connections.lost(link, exc)
            log.warning("ack of message %s on queue %s lost with the connection: it will be delivered again",
                        delivery.message_id, delivery.queue)

    def _settle(self, link: Link, tag: _Tag, kind: str, ms: Optional[int], props: pika.BasicProperties) -> None:
        """Publish the copy (confirmed), THEN ack the original: one live copy, never none."""
        self._topology.send(link, link.main, self._topology.phys(tag.queue), kind, ms, tag.body, props)
        link.main.basic_ack(tag.delivery_tag)
        link.unacked.discard(tag.delivery_tag)

    def _dead_letter(self, link: Link, tag: _Tag, reason: str, attempts: int) -> None:
        headers = dead_letter_headers(tag.queue, reason, attempts)
        self._settle(link, tag, "dlq", None, properties(tag.message_id, headers))
        log.warning("dead-lettered message %s of queue %s after %d attempt(s): %s",
                    tag.message_id, tag.queue, attempts, reason)

    def nack(self, delivery: Delivery, *, reason: str, retry: bool = True) -> bool:
        """See :meth:`Broker.nack`. Returns True when the message stays live, also when the
        connection was lost meanwhile (RabbitMQ then re-queues it and counts the delivery)."""
        tag, link = self._held(delivery, "nack")
        if link is None:
            return True
        attempt = delivery.attempt
        try:
            if retry and attempt < self.retry.max_attempts:
                ms = bucket_ms(self.retry.delay(attempt, self._rng), stochastic=True, rng=self._rng)
                props = properties(tag.message_id, {H_ATTEMPTS: attempt, H_LAST_ERROR: str(reason)[:CLIP]})
                self._settle(link, tag, "delay" if ms else "main", ms, props)
                return True
            if retry:
                reason = f"{reason} (gave up after {attempt} attempts)"
            self._dead_letter(link, tag, str(reason), attempt)
            return False
        except BrokerError as exc:  # unroutable or refused: give the message back as it is
            log.warning("nack of message %s on queue %s: %s; returning it to its queue", delivery.message_id,
                        delivery.queue, exc)
            try:
                link.main.basic_reject(tag.delivery_tag, requeue=True)
                link.unacked.discard(tag.delivery_tag)
            except LINK_ERRORS as exc2:
                self._connections.lost(link, exc2)
            return True
        except LINK_ERRORS as exc:
            self._connections.lost(link, exc)
            log.warning("nack of message %s on queue %s: connection lost; RabbitMQ returns the message to its "
                        "queue", delivery.message_id, delivery.queue)
            return True

    def extend(self, delivery: Delivery, seconds: float) -> None:
        """No lease to extend on RabbitMQ: service the connection (heartbeats) instead."""
        link = self._connections.current()
        if link is None:
            return
        try:
            link.conn.process_data_events(0)
        except LINK_ERRORS as exc:
            self._connections.lost(link, exc)

    # ------------------------------------------------------------------ inspection

    def depth(self, queue: str) -> int:
        """Ready + delayed messages of ``queue`` (messages a consumer holds are not visible over AMQP)."""
        phys = self._topology.phys(queue)

        def run(link: Link) -> int:
            total = self._topology.probe(link, phys) or 0
            for ms in DELAY_BUCKETS_MS:
                total += self._topology.probe(link, self._topology.delay(phys, ms)) or 0
            return total

        return self._connections.fail_fast(run)

    def _all_queues(self) -> list[str]:
        return sorted(set(self._known) | self._used)

    def queues(self) -> list:
        """Known and used queues that exist, as :class:`~mqi_framework.broker.base.QueueStats`
        (``leased`` is always 0: RabbitMQ does not report it over AMQP)."""

        def run(link: Link) -> list:
            out = []
            for queue in self._all_queues():
                phys = self._topology.phys(queue)
                ready = self._topology.probe(link, phys)
                dead = self._topology.probe(link, self._topology.dlq(phys))
                if ready is None and dead is None:
                    continue
                delayed = sum(self._topology.probe(link, self._topology.delay(phys, ms)) or 0
                              for ms in DELAY_BUCKETS_MS)
                out.append(QueueStats(queue, (ready or 0) + delayed, ready or 0, delayed, 0, dead or 0))
            return out

        return self._connections.fail_fast(run)

    # ------------------------------------------------------------------ dead letters

    def dlq_list(self, queue: Optional[str] = None) -> list[DeadLetter]:
        return self._dead_letters.letters([queue] if queue is not None else self._all_queues())

    def dlq_replay(self, ids: Optional[Iterable[str]] = None) -> int:
        return self._dead_letters.apply(self._all_queues(), ids, replay=True)

    def dlq_purge(self, ids: Optional[Iterable[str]] = None) -> int:
        return self._dead_letters.apply(self._all_queues(), ids, replay=False)

    # ------------------------------------------------------------------ administration

    def delete_queue(self, queue: str) -> None:
        """Delete ``queue``, its DLQ and its delay queues, messages included (tests, decommissioning)."""
        phys = self._topology.phys(queue)
        self._connections.fail_fast(lambda link: self._topology.delete(link, phys))

    def close(self) -> None:
        self._connections.close()

    def __enter__(self) -> "RabbitBroker":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
