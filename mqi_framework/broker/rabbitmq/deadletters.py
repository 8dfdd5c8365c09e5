"""Dead letters on RabbitMQ: the headers that make a message one, reading one back, and
listing, replaying and purging ``Q.dlq``.

A dead letter is a copy of the message in ``Q.dlq`` with reason, attempts, time and a
dead-letter id in its headers. ``dlq_list``/``dlq_replay``/``dlq_purge`` drain ``Q.dlq``
with ``basic.get`` on a channel of their own, ack what they replay or purge and close the
channel, which puts everything else back (order kept).
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from typing import Any, Iterable, Optional

import pika.exceptions as pe

from ..base import DeadLetter
from .link import LINK_ERRORS, Connections, Link
from .message import (CLIP, H_ATTEMPTS, H_DEAD_AT, H_DEAD_ID, H_QUEUE, H_REASON, as_int, as_text,
                      properties)
from .topology import Topology

log = logging.getLogger(__name__)


def dead_letter_headers(queue: str, reason: str, attempts: int) -> dict[str, Any]:
    """The headers of a new dead letter of (unprefixed) ``queue``."""
    return {H_QUEUE: queue, H_REASON: reason[:CLIP], H_ATTEMPTS: int(attempts),
            H_DEAD_AT: f"{time.time():.6f}", H_DEAD_ID: uuid.uuid4().hex[:16]}


def letter(queue: str, msg_props: Any, body: bytes) -> DeadLetter:
    """A message fetched from the DLQ of ``queue`` as a :class:`DeadLetter`."""
    headers = msg_props.headers or {}
    try:
        data = json.loads(body)
    except ValueError:
        data = {"unreadable": body.decode("utf-8", "replace")}
    try:
        dead_at = float(headers.get(H_DEAD_AT) or 0.0)
    except (TypeError, ValueError):
        dead_at = 0.0
    return DeadLetter(id=as_text(headers.get(H_DEAD_ID)) or as_text(msg_props.message_id),
                      queue=as_text(headers.get(H_QUEUE)) or queue, message_id=as_text(msg_props.message_id),
                      body=data, reason=as_text(headers.get(H_REASON)), attempts=as_int(headers.get(H_ATTEMPTS)),
                      dead_at=dead_at)


def close_channel(channel: Any) -> None:
    if channel is not None:
        try:
            if channel.is_open:
                channel.close()  # everything not acked goes back to the DLQ, in order
        except LINK_ERRORS:
            pass


class DeadLetterQueues:
    """List, replay and purge the DLQs of named queues over ``connections``."""

    def __init__(self, connections: Connections, topology: Topology) -> None:
        self.connections = connections
        self.topology = topology

    def drain(self, link: Link, queue: str) -> tuple[Any, list[tuple[int, bytes, DeadLetter]]]:
        """Take every dead letter of ``queue`` (unacked) on a channel of its own."""
        name = self.topology.dlq(self.topology.phys(queue))
        channel = link.conn.channel()
        try:
            channel.queue_declare(name, passive=True)
        except pe.ChannelClosedByBroker as exc:
            if exc.reply_code == 404:
                return None, []
            raise self.topology.refused(exc, name) from None
        channel.confirm_delivery()
        items = []
        while True:
            method, msg_props, body = channel.basic_get(name, auto_ack=False)
            if method is None:
                break
            items.append((method.delivery_tag, body, letter(queue, msg_props, body)))
        return channel, items

    def letters(self, names: list[str]) -> list[DeadLetter]:
        """The dead letters of the queues ``names``, oldest first."""

        def run(link: Link) -> list[DeadLetter]:
            found: list[DeadLetter] = []
            for name in names:
                channel, items = self.drain(link, name)
                close_channel(channel)
                found.extend(dead for _, _, dead in items)
            return sorted(found, key=lambda d: (d.dead_at, d.id))

        return self.connections.fail_fast(run)

    def apply(self, names: list[str], ids: Optional[Iterable[str]], replay: bool) -> int:
        """Replay (``replay``) or purge the dead letters ``ids`` (None: all) of the queues ``names``."""
        wanted = None if ids is None else {str(i) for i in ids}
        topology = self.topology

        def run(link: Link) -> int:
            done = 0
            for name in names:
                if wanted is not None and not wanted:
                    break
                channel, items = self.drain(link, name)
                try:
                    for delivery_tag, body, dead in items:
                        if wanted is not None and dead.id not in wanted:
                            continue
                        if replay:
                            fresh = properties(dead.message_id or uuid.uuid4().hex, {H_ATTEMPTS: 0})
                            topology.send(link, channel, topology.phys(dead.queue), "main", None, body, fresh)
                        channel.basic_ack(delivery_tag)
                        done += 1
                        if wanted is not None:
                            wanted.discard(dead.id)
                finally:
                    close_channel(channel)
            return done

        count = self.connections.fail_fast(run)
        if count and replay:
            log.info("replayed %d dead letter(s)", count)
        return count
