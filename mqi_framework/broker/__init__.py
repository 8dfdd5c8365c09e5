"""Message brokers: the :class:`Broker` contract and :func:`open_broker` to pick a backend.

Accepted URLs:

* ``sqlite:///abs/path.db`` (also ``sqlite:////abs/path.db``): embedded SQLite broker, absolute path
* ``sqlite:relative/path.db``: embedded SQLite broker, path relative to the current directory
  (``HostContext.broker_url`` resolves workspace-relative ``sqlite:`` URLs before this)
* a bare filesystem path (``/var/lib/mqi/queue.db``, ``queue.db``): embedded SQLite broker
* ``amqp://user:pass@host:5672/vhost`` / ``amqps://…`` (TLS): RabbitMQ (:mod:`.rabbitmq`, pika);
  the default vhost ``/`` is written ``%2F``; query options: pika's (``heartbeat=60``,
  ``connection_attempts``, ``socket_timeout``, ...) and ``queue_type=auto|quorum|classic``
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

from .base import Broker, BrokerError, BrokerUnavailable, DeadLetter, Delivery, QueueStats, RetryPolicy, redact_url

if TYPE_CHECKING:  # the backend modules are imported on first use
    from .rabbitmq import RabbitBroker
    from .sqlite import SqliteBroker

__all__ = [
    "Broker",
    "BrokerError",
    "BrokerUnavailable",
    "DeadLetter",
    "Delivery",
    "QueueStats",
    "RabbitBroker",
    "RetryPolicy",
    "SqliteBroker",
    "open_broker",
    "redact_url",
]

_ACCEPTED = ("sqlite:///abs/path.db, sqlite:relative/path.db, a bare filesystem path, "
             "or amqp://user:pass@host/vhost (amqps:// for TLS)")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")


def sqlite_path(url: str) -> Path:
    """The database file a ``sqlite:`` URL or bare path names (ValueError if it names none)."""
    if url.startswith("sqlite://"):
        rest = url[len("sqlite://"):]
        if not rest.startswith("/"):
            raise ValueError(
                f"broker URL {url!r}: sqlite:// takes no host; use sqlite:///abs/path.db "
                f"or sqlite:relative/path.db")
        rest = "/" + rest.lstrip("/")  # sqlite:////abs/x.db -> /abs/x.db
    elif url.startswith("sqlite:"):
        rest = url[len("sqlite:"):]
    else:
        rest = url
    if rest in ("", "/") or rest.endswith("/"):
        raise ValueError(f"broker URL {url!r} names no database file; accepted forms: {_ACCEPTED}")
    if rest == ":memory:" or rest.startswith("file:"):
        raise ValueError(
            f"broker URL {url!r}: the SQLite broker needs a real file shared by all processes "
            f"(in-memory and URI forms are not supported); accepted forms: {_ACCEPTED}")
    return Path(rest).expanduser()


def open_broker(url: str, *, retry: RetryPolicy = RetryPolicy(), lease_seconds: float = 60.0,
                prefix: str = "", queues: Iterable[str] = ()) -> Broker:
    """Open the broker ``url`` names (see the module docstring for the accepted forms).

    ``prefix`` is prepended to every queue name and ``queues`` names the queues the caller
    uses (so that ``dlq_list()`` without a queue finds their dead letters); both matter to
    RabbitMQ only: the embedded SQLite queue belongs to one workspace and lists itself.

    Raises ValueError for a URL of no accepted form and BrokerError when the backend
    cannot be used. RabbitMQ connects on first use, so that is where an unreachable
    broker, wrong credentials or a missing vhost show (as BrokerError).
    """
    if not isinstance(url, str) or not url.strip():
        raise ValueError(f"broker URL must be a non-empty string; accepted forms: {_ACCEPTED}")
    url = url.strip()
    scheme_match = _SCHEME.match(url)
    scheme = scheme_match.group(1).lower() if scheme_match else None
    if scheme in ("amqp", "amqps"):
        try:
            from .rabbitmq import RabbitBroker
        except ImportError as exc:  # pika is a dependency; a broken install says so
            raise BrokerError(f"the RabbitMQ backend needs pika (pip install 'pika>=1.3,<1.5'): {exc}") from None

        return RabbitBroker(url, retry=retry, lease_seconds=lease_seconds, prefix=prefix, queues=queues)
    if url.startswith("sqlite:") or scheme is None:
        from .sqlite import SqliteBroker

        return SqliteBroker(sqlite_path(url), retry=retry, lease_seconds=lease_seconds)
    raise ValueError(f"unsupported broker URL scheme {scheme!r} in {redact_url(url)!r}; accepted forms: {_ACCEPTED}")


def __getattr__(name: str) -> Any:
    if name == "SqliteBroker":
        from . import sqlite

        return getattr(sqlite, name)
    if name == "RabbitBroker":
        from . import rabbitmq

        return rabbitmq.RabbitBroker
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
