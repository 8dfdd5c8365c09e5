"""What travels with a RabbitMQ message: its properties and the ``mqi-*`` headers.

Messages are persistent JSON (``delivery_mode=2``); the attempt count travels in the header
``mqi-attempts`` (attempts used up before this copy was published). Header values come
back from pika as bytes or str, or not at all: :func:`as_int` and :func:`as_text` read them.
"""

from __future__ import annotations

from typing import Any

import pika

H_ATTEMPTS = "mqi-attempts"  # attempts used up before this copy was published
H_LAST_ERROR = "mqi-last-error"
H_QUEUE = "mqi-queue"  # dead letters: the (unprefixed) queue it died on
H_REASON = "mqi-reason"
H_DEAD_AT = "mqi-dead-at"  # epoch seconds as text (pika encodes no floats)
H_DEAD_ID = "mqi-dead-id"

CLIP = 2000  # longest reason kept in a header


def properties(message_id: str, headers: dict[str, Any]) -> pika.BasicProperties:
    """The properties of every message the broker publishes: persistent JSON."""
    return pika.BasicProperties(content_type="application/json", delivery_mode=2, message_id=message_id,
                                headers=headers)


def as_int(value: Any, default: int = 0) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def as_text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return "" if value is None else str(value)
