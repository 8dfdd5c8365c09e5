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
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import threading
import time
import urllib.parse
import uuid
from typing import Any, Callable, Iterable, Optional, TypeVar

import pika
import pika.exceptions as pe

from .base import Broker, BrokerError, BrokerUnavailable, DeadLetter, Delivery, RetryPolicy, redact_url

log = logging.getLogger(__name__)
if logging.getLogger("pika").level == logging.NOTSET:
    # pika logs every failed connection attempt as ERROR with a traceback; this module reports
    # connection loss and recovery itself (one warning per outage, one line on reconnecting)
    logging.getLogger("pika").setLevel(logging.CRITICAL)

T = TypeVar("T")

#: delay-queue TTLs in milliseconds: round(1000 * 2**(k/2)) for k = -10 .. 34 (31 ms .. 36.4 h)
DELAY_BUCKETS_MS: tuple[int, ...] = tuple(int(round(1000 * 2 ** (k / 2))) for k in range(-10, 35))

H_ATTEMPTS = "mqi-attempts"  # attempts used up before this copy was published
H_LAST_ERROR = "mqi-last-error"
H_QUEUE = "mqi-queue"  # dead letters: the (unprefixed) queue it died on
H_REASON = "mqi-reason"
H_DEAD_AT = "mqi-dead-at"  # epoch seconds as text (pika encodes no floats)
H_DEAD_ID = "mqi-dead-id"

QUEUE_TYPES = ("auto", "quorum", "classic")
_OUR_QUERY_KEYS = ("queue_type",)
_DEFAULTS = {"heartbeat": 60, "blocked_connection_timeout": 30, "socket_timeout": 5}
_BACKOFF_FIRST, _BACKOFF_MAX = 0.1, 3.0
_CLIP = 2000  # longest reason kept in a header

# errors that mean "this connection or channel is gone": the link is dropped and rebuilt
_LINK_ERRORS = (pe.AMQPConnectionError, pe.AMQPChannelError, pe.ChannelError, OSError)


# ------------------------------------------------------------------------------ helpers


def _describe(exc: BaseException) -> str:
    """The innermost cause of a pika error, as one line."""
    seen = exc
    for _ in range(10):
        inner = next((a for a in getattr(seen, "args", ()) if isinstance(a, BaseException)), None)
        if inner is None and isinstance(getattr(seen, "exception", None), BaseException):
            inner = seen.exception  # pika's connection-workflow errors wrap the socket error here
        if inner is None:
            break
        seen = inner
    text = str(seen).strip() or type(seen).__name__
    return f"{type(seen).__name__}: {text}" if type(seen).__name__ not in text else text


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


def _int(value: Any, default: int = 0) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return "" if value is None else str(value)


class _Link:
    """One connection and its channels, owned by one thread of one process."""

    def __init__(self, conn: pika.BlockingConnection, main: Any) -> None:
        self.conn = conn
        self.main = main  # confirm mode, prefetch 1: publish, get, ack
        self.aux: Any = None  # declarations and probes (a refused one closes this channel only)
        self.thread = threading.get_ident()
        self.pid = os.getpid()
        self.unacked: set[int] = set()
        self.declared: set[str] = set()
        self.alive = True

    def usable(self) -> bool:
        return (self.alive and self.pid == os.getpid() and self.conn.is_open and self.main.is_open)


class _Tag:
    """``Delivery.tag`` of a RabbitBroker: the link and delivery tag, and the raw message."""

    __slots__ = ("link", "delivery_tag", "queue", "message_id", "body")

    def __init__(self, link: _Link, delivery_tag: int, queue: str, message_id: str, body: bytes) -> None:
        self.link, self.delivery_tag, self.queue, self.message_id, self.body = (
            link, delivery_tag, queue, message_id, body)

    def __repr__(self) -> str:
        return f"<rabbitmq delivery {self.delivery_tag} of {self.queue}>"


class _ThreadState(threading.local):
    def __init__(self) -> None:
        self.link: Optional[_Link] = None
        self.down_since: Optional[float] = None
        self.retry_at = 0.0
        self.backoff = 0.0


# ------------------------------------------------------------------------------ broker


class RabbitBroker(Broker):
    """:class:`Broker` on RabbitMQ (see the module docstring for the design)."""

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
        pika_url, ours = self._split(url)
        queue_type = queue_type or ours.get("queue_type") or "auto"
        if queue_type not in QUEUE_TYPES:
            raise ValueError(f"queue_type must be one of {', '.join(QUEUE_TYPES)}, got {queue_type!r}")
        self.queue_type = queue_type
        try:
            self._params = pika.URLParameters(pika_url)
        except Exception as exc:  # pika raises ValueError, TypeError, ... for a bad URL
            raise ValueError(f"broker URL {self.url}: {self._redact(str(exc))}") from None
        given = set(urllib.parse.parse_qs(urllib.parse.urlsplit(pika_url).query))
        for key, value in _DEFAULTS.items():
            if key not in given:
                setattr(self._params, key, value)
        self._params.connection_attempts = 1  # we retry ourselves, with backoff
        self.where = f"{self._params.host}:{self._params.port} (vhost {self._params.virtual_host!r})"
        self.user = self._params.credentials.username
        self._known = [q for q in queues if q]
        self._used: set[str] = set()
        self._quorum: Optional[bool] = None if queue_type == "auto" else queue_type == "quorum"
        self._server_version = ""
        self._state = _ThreadState()
        self._links: set[_Link] = set()
        self._links_lock = threading.Lock()
        self._closed = False
        self._rng = random.Random()

    def __repr__(self) -> str:
        prefix = f", prefix={self.prefix!r}" if self.prefix else ""
        return f"RabbitBroker({self.url!r}{prefix})"

    # ------------------------------------------------------------------ URL and names

    @staticmethod
    def _split(url: str) -> tuple[str, dict[str, str]]:
        parts = urllib.parse.urlsplit(url)
        query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
        ours = {k: v for k, v in query if k in _OUR_QUERY_KEYS}
        rest = urllib.parse.urlencode([(k, v) for k, v in query if k not in _OUR_QUERY_KEYS])
        return urllib.parse.urlunsplit(parts._replace(query=rest)), ours

    def _redact(self, text: str) -> str:
        if self._secret and len(self._secret) >= 3:
            text = text.replace(self._secret, "***")
        return text

    def _phys(self, queue: str) -> str:
        if not queue or not isinstance(queue, str):
            raise ValueError("queue name must be a non-empty string")
        name = self.prefix + queue
        if len(name.encode()) + len(".delay.") + 9 > 255:
            raise ValueError(f"queue name {name!r} is too long for RabbitMQ (255 bytes with its suffixes)")
        return name

    @staticmethod
    def _dlq(phys: str) -> str:
        return phys + ".dlq"

    @staticmethod
    def _delay(phys: str, ms: int) -> str:
        return f"{phys}.delay.{ms}"

    # ------------------------------------------------------------------ connections

    def _connect(self) -> _Link:
        if self._closed:
            raise BrokerError(f"{self!r} is closed")
        try:
            conn = pika.BlockingConnection(self._params)
        except (pe.ProbableAuthenticationError, pe.AuthenticationError) as exc:
            raise BrokerError(
                f"RabbitMQ at {self.where} refused the login of user {self.user!r}: wrong user name or password "
                f"(note that RabbitMQ's 'guest' user may only log in from localhost) [{self._redact(_describe(exc))}]"
            ) from None
        except pe.ProbableAccessDeniedError as exc:
            vhost = self._params.virtual_host
            detail = self._redact(_describe(exc))
            if "not found" in detail:
                raise BrokerError(
                    f"virtual host {vhost!r} does not exist on RabbitMQ at {self._params.host}:{self._params.port}: "
                    f"create it (rabbitmqctl add_vhost {vhost} && rabbitmqctl set_permissions -p {vhost} "
                    f"{self.user} '.*' '.*' '.*') or fix broker.url (the default vhost '/' is written %2F) [{detail}]"
                ) from None
            raise BrokerError(
                f"user {self.user!r} may not use virtual host {vhost!r} on RabbitMQ at "
                f"{self._params.host}:{self._params.port}: grant it (rabbitmqctl set_permissions -p {vhost} "
                f"{self.user} '.*' '.*' '.*') [{detail}]") from None
        except (pe.AMQPError, OSError) as exc:
            raise BrokerUnavailable(f"cannot reach RabbitMQ at {self.where}: {self._redact(_describe(exc))}") from None
        try:
            main = conn.channel()
            main.confirm_delivery()
            main.basic_qos(prefetch_count=1)
            if self._quorum is None or not self._server_version:
                self._resolve_queue_type(conn)
        except BrokerError:
            self._close_quietly(conn)
            raise
        except _LINK_ERRORS as exc:
            self._close_quietly(conn)
            raise BrokerUnavailable(f"RabbitMQ at {self.where}: {self._redact(_describe(exc))}") from None
        return _Link(conn, main)

    def _resolve_queue_type(self, conn: pika.BlockingConnection) -> None:
        version = _text(conn._impl.server_properties.get("version", ""))
        numbers = tuple(int(n) for n in re.findall(r"\d+", version)[:2]) or (0, 0)
        quorum_ok = numbers >= (3, 10)  # quorum queues with message TTL and at-least-once dead-lettering
        if self.queue_type == "quorum" and not quorum_ok:
            raise BrokerError(f"queue_type=quorum needs RabbitMQ 3.10 or newer; {self.where} runs {version or '?'}")
        if self.queue_type == "auto":
            self._quorum = quorum_ok
        if not self._server_version:
            log.info("RabbitMQ %s at %s: %s durable queues", version or "?", self.where,
                     "quorum" if self._quorum else "classic")
        self._server_version = version or "?"

    @staticmethod
    def _close_quietly(conn: Any) -> None:
        try:
            if conn.is_open:
                conn.close()
        except Exception:  # noqa: BLE001 - it is being thrown away
            pass

    def _current(self) -> Optional[_Link]:
        st = self._state
        link = st.link
        if link is None:
            return None
        if link.pid != os.getpid():  # forked: the socket is the parent's; open our own
            st.link = None
            return None
        if link.usable():
            return link
        self._lost(link, None)
        return None

    def _open_link(self) -> _Link:
        st = self._state
        link = self._connect()
        with self._links_lock:
            self._links.add(link)
        st.link = link
        if st.down_since is not None:
            log.info("reconnected to RabbitMQ at %s after %.1fs", self.where, time.monotonic() - st.down_since)
        st.down_since, st.retry_at = None, 0.0  # the backoff resets after the first operation that works
        return link

    def _link_now(self) -> _Link:
        """The thread's connection, opened now if needed (raises when that fails)."""
        return self._current() or self._open_link()

    def _lost(self, link: Optional[_Link], exc: Optional[BaseException]) -> None:
        """Forget a broken connection (its unacked messages go back to their queues)."""
        if link is None:
            return
        link.alive = False
        with self._links_lock:
            self._links.discard(link)
        st = self._state
        if st.link is link:
            st.link = None
        if link.pid == os.getpid():
            self._close_quietly(link.conn)
        if st.down_since is None and not self._closed:
            st.down_since = time.monotonic()
            why = self._redact(_describe(exc)) if exc is not None else "connection closed"
            log.warning("RabbitMQ at %s: connection lost (%s); reconnecting with backoff (messages this "
                        "connection held go back to their queues)", self.where, why)

    def _note_unreachable(self, exc: BrokerUnavailable) -> None:
        st = self._state
        st.backoff = min(_BACKOFF_MAX, st.backoff * 2) if st.backoff else _BACKOFF_FIRST
        st.retry_at = time.monotonic() + st.backoff * self._rng.uniform(0.5, 1.0)
        if st.down_since is None:
            st.down_since = time.monotonic()
            log.warning("%s; retrying with backoff", exc)
        else:
            log.debug("%s; retrying in %.2fs", exc, st.retry_at - time.monotonic())

    def _fail_fast(self, fn: Callable[[_Link], T]) -> T:
        """Run ``fn`` on the thread's connection; after a connection error, once more on a fresh one."""
        for round_ in (1, 2):
            link = self._link_now()
            try:
                return fn(link)
            except BrokerError:
                raise
            except _LINK_ERRORS as exc:
                self._lost(link, exc)
                if round_ == 2:
                    raise BrokerUnavailable(f"RabbitMQ at {self.where}: {self._redact(_describe(exc))}") from None
        raise AssertionError("unreachable")  # pragma: no cover

    # ------------------------------------------------------------------ declarations

    def _aux(self, link: _Link) -> Any:
        if link.aux is None or not link.aux.is_open:
            link.aux = link.conn.channel()
        return link.aux

    def _base_args(self) -> dict[str, Any]:
        return {"x-queue-type": "quorum"} if self._quorum else {}

    def _declare(self, link: _Link, name: str, args: dict[str, Any]) -> None:
        if name in link.declared:
            return
        try:
            self._aux(link).queue_declare(name, durable=True, arguments=args)
        except pe.ChannelClosedByBroker as exc:
            link.aux = None
            raise self._refused(exc, name) from None
        link.declared.add(name)

    def _refused(self, exc: pe.ChannelClosedByBroker, name: str) -> BrokerError:
        text = self._redact(f"{exc.reply_code} {exc.reply_text}")
        if exc.reply_code == 406 and "inequivalent" in exc.reply_text:
            return BrokerError(
                f"queue {name!r} exists on RabbitMQ at {self.where} with other arguments than mqi-host declares "
                f"({'quorum' if self._quorum else 'classic'}): {text}. Delete it when it is empty, or choose the "
                f"matching type with ?queue_type=classic|quorum in broker.url")
        if exc.reply_code == 403:
            return BrokerError(f"user {self.user!r} may not use queue {name!r} on RabbitMQ at {self.where}: {text} "
                               f"(rabbitmqctl set_permissions)")
        return BrokerUnavailable(f"RabbitMQ at {self.where} refused queue {name!r}: {text}")

    def _declare_main(self, link: _Link, phys: str) -> None:
        self._declare(link, phys, self._base_args())

    def _declare_target(self, link: _Link, phys: str, kind: str, ms: Optional[int]) -> str:
        """Declare what a message for ``phys`` of ``kind`` (main, delay, dlq) needs; return its routing key."""
        if kind == "dlq":
            name = self._dlq(phys)
            self._declare(link, name, self._base_args())
            return name
        self._declare_main(link, phys)
        if kind == "main":
            return phys
        assert ms is not None
        name = self._delay(phys, ms)
        args = {**self._base_args(), "x-message-ttl": ms, "x-dead-letter-exchange": "",
                "x-dead-letter-routing-key": phys}
        if self._quorum:
            args.update({"x-dead-letter-strategy": "at-least-once", "x-overflow": "reject-publish"})
        self._declare(link, name, args)
        return name

    def _probe(self, link: _Link, name: str) -> Optional[int]:
        """Ready messages in ``name``, None when the queue does not exist."""
        try:
            return int(self._aux(link).queue_declare(name, passive=True).method.message_count)
        except pe.ChannelClosedByBroker as exc:
            link.aux = None
            if exc.reply_code == 404:
                return None
            raise self._refused(exc, name) from None

    # ------------------------------------------------------------------ publishing

    @staticmethod
    def _props(message_id: str, headers: dict[str, Any]) -> pika.BasicProperties:
        return pika.BasicProperties(content_type="application/json", delivery_mode=2, message_id=message_id,
                                    headers=headers)

    def _send(self, link: _Link, channel: Any, phys: str, kind: str, ms: Optional[int], data: bytes,
              props: pika.BasicProperties) -> None:
        """One confirmed publish on ``channel``; declares what it needs, redeclares once if unroutable."""
        for round_ in (1, 2):
            key = self._declare_target(link, phys, kind, ms)
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

    def _publish_patient(self, queue: str, kind: str, ms: Optional[int], data: bytes,
                         props: pika.BasicProperties) -> None:
        phys = self._phys(queue)
        deadline = time.monotonic() + self.reconnect_seconds
        backoff = _BACKOFF_FIRST
        while True:
            link: Optional[_Link] = None
            try:
                link = self._link_now()
                self._send(link, link.main, phys, kind, ms, data, props)
                self._state.backoff = 0.0
                return
            except BrokerUnavailable as exc:
                last: BaseException = exc
            except BrokerError:
                raise
            except _LINK_ERRORS as exc:
                self._lost(link, exc)
                last = exc
            left = deadline - time.monotonic()
            if left <= 0:
                raise BrokerUnavailable(
                    f"could not publish to {queue!r}: RabbitMQ at {self.where} unavailable for "
                    f"{self.reconnect_seconds:.0f}s ({self._redact(str(last) if isinstance(last, BrokerError) else _describe(last))})")
            time.sleep(min(left, backoff * self._rng.uniform(0.5, 1.0)))
            backoff = min(_BACKOFF_MAX, backoff * 2)

    def publish(self, queue: str, body: dict, *, message_id: Optional[str] = None, delay: float = 0.0) -> str:
        if not isinstance(body, dict):
            raise TypeError(f"message body must be a dict, got {type(body).__name__}")
        self._phys(queue)
        data = json.dumps(body, ensure_ascii=False, allow_nan=False).encode("utf-8")
        message_id = message_id or uuid.uuid4().hex
        ms = bucket_ms(delay, stochastic=False) if delay and delay > 0 else None
        self._used.add(queue)
        self._publish_patient(queue, "delay" if ms else "main", ms, data, self._props(message_id, {H_ATTEMPTS: 0}))
        return message_id

    # ------------------------------------------------------------------ consuming

    def _wait_for_one(self, link: _Link, phys: str, seconds: float) -> Optional[tuple]:
        """Wait up to ``seconds`` for one message with a temporary consumer (prefetch 1)."""
        box: list[tuple] = []

        def on_message(_ch: Any, method: Any, props: Any, body: bytes) -> None:
            box.append((method, props, body))

        consumer = link.main.basic_consume(phys, on_message, auto_ack=False)
        try:
            end = time.monotonic() + seconds
            while not box:
                left = end - time.monotonic()
                if left <= 0:
                    break
                link.conn.process_data_events(time_limit=left)
        finally:
            if link.main.is_open:
                # With prefetch 1 and the message we got unacked, nothing else can be in flight;
                # a message pushed in the instant between a timeout and the cancel is given back
                # by pika (it then counts as one more delivery).
                link.main.basic_cancel(consumer)
        for extra in box[1:]:  # not expected with prefetch 1
            link.main.basic_reject(extra[0].delivery_tag, requeue=True)
        return box[0] if box else None

    def get(self, queue: str, *, timeout: float = 0.0) -> Optional[Delivery]:
        phys = self._phys(queue)
        self._used.add(queue)
        deadline = time.monotonic() + max(0.0, float(timeout))
        st = self._state
        while True:
            link = self._current()
            if link is None and time.monotonic() >= st.retry_at:
                try:
                    link = self._open_link()
                except BrokerUnavailable as exc:
                    self._note_unreachable(exc)
            if link is None:
                now = time.monotonic()
                if now >= deadline:
                    return None
                time.sleep(max(0.0, min(st.retry_at - now, deadline - now)) or 0.01)
                continue
            try:
                self._declare_main(link, phys)
                method, props, body = link.main.basic_get(phys, auto_ack=False)
                if method is None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return None
                    got = self._wait_for_one(link, phys, left)
                    if got is None:
                        return None
                    method, props, body = got
                delivery = self._admit(link, queue, phys, method, props, body)
            except BrokerUnavailable as exc:  # a queue refused for now (e.g. while the broker restarts)
                self._lost(link, exc)
                self._note_unreachable(exc)
                continue
            except BrokerError:
                raise
            except _LINK_ERRORS as exc:
                self._lost(link, exc)
                self._note_unreachable(BrokerUnavailable(f"RabbitMQ at {self.where}: {self._redact(_describe(exc))}"))
                continue
            st.backoff = 0.0
            if delivery is not None:
                return delivery

    def _admit(self, link: _Link, queue: str, phys: str, method: Any, props: Any, body: bytes) -> Optional[Delivery]:
        """Turn a fetched message into a Delivery, or settle it here (dead-letter, classic re-issue)."""
        link.unacked.add(method.delivery_tag)
        headers = props.headers or {}
        base = max(0, _int(headers.get(H_ATTEMPTS)))
        message_id = _text(props.message_id) or uuid.uuid4().hex
        tag = _Tag(link, method.delivery_tag, queue, message_id, body)
        if self._quorum:
            attempt = base + max(0, _int(headers.get("x-delivery-count"))) + 1
        else:
            attempt = base + (1 if method.redelivered else 0) + 1
        if attempt > self.retry.max_attempts:
            self._dead_letter(link, tag, f"delivered {attempt - 1} time(s) without an ack: the consumer died "
                                         f"or lost its connection each time", attempt - 1)
            return None
        if method.redelivered and not self._quorum:
            # classic queues only flag a redelivery: re-issue the message with the crashed
            # attempt counted, so that a message that kills its consumers still dead-letters
            props2 = self._props(message_id, {H_ATTEMPTS: base + 1})
            self._send(link, link.main, phys, "main", None, body, props2)
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

    def _held(self, delivery: Delivery, verb: str) -> tuple[_Tag, Optional[_Link]]:
        tag = delivery.tag
        if not isinstance(tag, _Tag):
            raise ValueError(f"not a delivery of a RabbitBroker: tag {tag!r}")
        if tag.link.thread != threading.get_ident() or tag.link.pid != os.getpid():
            raise BrokerError(f"{verb} of message {delivery.message_id} must happen on the thread that got it "
                              f"(pika connections are not thread-safe)")
        link = self._current()
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
        except _LINK_ERRORS as exc:
            self._lost(link, exc)
            log.warning("ack of message %s on queue %s lost with the connection: it will be delivered again",
                        delivery.message_id, delivery.queue)

    def _settle(self, link: _Link, tag: _Tag, kind: str, ms: Optional[int], props: pika.BasicProperties) -> None:
        """Publish the copy (confirmed), THEN ack the original: one live copy, never none."""
        self._send(link, link.main, self._phys(tag.queue), kind, ms, tag.body, props)
        link.main.basic_ack(tag.delivery_tag)
        link.unacked.discard(tag.delivery_tag)

    def _dead_letter(self, link: _Link, tag: _Tag, reason: str, attempts: int) -> None:
        headers = {H_QUEUE: tag.queue, H_REASON: reason[:_CLIP], H_ATTEMPTS: int(attempts),
                   H_DEAD_AT: f"{time.time():.6f}", H_DEAD_ID: uuid.uuid4().hex[:16]}
        self._settle(link, tag, "dlq", None, self._props(tag.message_id, headers))
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
                props = self._props(tag.message_id, {H_ATTEMPTS: attempt, H_LAST_ERROR: str(reason)[:_CLIP]})
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
            except _LINK_ERRORS as exc2:
                self._lost(link, exc2)
            return True
        except _LINK_ERRORS as exc:
            self._lost(link, exc)
            log.warning("nack of message %s on queue %s: connection lost; RabbitMQ returns the message to its "
                        "queue", delivery.message_id, delivery.queue)
            return True

    def extend(self, delivery: Delivery, seconds: float) -> None:
        """No lease to extend on RabbitMQ: service the connection (heartbeats) instead."""
        link = self._current()
        if link is None:
            return
        try:
            link.conn.process_data_events(0)
        except _LINK_ERRORS as exc:
            self._lost(link, exc)

    # ------------------------------------------------------------------ inspection

    def depth(self, queue: str) -> int:
        """Ready + delayed messages of ``queue`` (messages a consumer holds are not visible over AMQP)."""
        phys = self._phys(queue)

        def run(link: _Link) -> int:
            total = self._probe(link, phys) or 0
            for ms in DELAY_BUCKETS_MS:
                total += self._probe(link, self._delay(phys, ms)) or 0
            return total

        return self._fail_fast(run)

    def _all_queues(self) -> list[str]:
        return sorted(set(self._known) | self._used)

    def queues(self) -> list:
        """Known and used queues that exist, as :class:`~mqi_framework.broker.sqlite.QueueStats`
        (``leased`` is always 0: RabbitMQ does not report it over AMQP)."""
        from .sqlite import QueueStats

        def run(link: _Link) -> list:
            out = []
            for queue in self._all_queues():
                phys = self._phys(queue)
                ready = self._probe(link, phys)
                dead = self._probe(link, self._dlq(phys))
                if ready is None and dead is None:
                    continue
                delayed = sum(self._probe(link, self._delay(phys, ms)) or 0 for ms in DELAY_BUCKETS_MS)
                out.append(QueueStats(queue, (ready or 0) + delayed, ready or 0, delayed, 0, dead or 0))
            return out

        return self._fail_fast(run)

    # ------------------------------------------------------------------ dead letters

    def _drain(self, link: _Link, queue: str) -> tuple[Any, list[tuple[int, bytes, DeadLetter]]]:
        """Take every dead letter of ``queue`` (unacked) on a channel of its own."""
        name = self._dlq(self._phys(queue))
        channel = link.conn.channel()
        try:
            channel.queue_declare(name, passive=True)
        except pe.ChannelClosedByBroker as exc:
            if exc.reply_code == 404:
                return None, []
            raise self._refused(exc, name) from None
        channel.confirm_delivery()
        items = []
        while True:
            method, props, body = channel.basic_get(name, auto_ack=False)
            if method is None:
                break
            items.append((method.delivery_tag, body, self._letter(queue, props, body)))
        return channel, items

    @staticmethod
    def _letter(queue: str, props: Any, body: bytes) -> DeadLetter:
        headers = props.headers or {}
        try:
            data = json.loads(body)
        except ValueError:
            data = {"unreadable": body.decode("utf-8", "replace")}
        try:
            dead_at = float(headers.get(H_DEAD_AT) or 0.0)
        except (TypeError, ValueError):
            dead_at = 0.0
        return DeadLetter(id=_text(headers.get(H_DEAD_ID)) or _text(props.message_id),
                          queue=_text(headers.get(H_QUEUE)) or queue, message_id=_text(props.message_id),
                          body=data, reason=_text(headers.get(H_REASON)), attempts=_int(headers.get(H_ATTEMPTS)),
                          dead_at=dead_at)

    @staticmethod
    def _close_channel(channel: Any) -> None:
        if channel is not None:
            try:
                if channel.is_open:
                    channel.close()  # everything not acked goes back to the DLQ, in order
            except _LINK_ERRORS:
                pass

    def dlq_list(self, queue: Optional[str] = None) -> list[DeadLetter]:
        names = [queue] if queue is not None else self._all_queues()

        def run(link: _Link) -> list[DeadLetter]:
            letters: list[DeadLetter] = []
            for name in names:
                channel, items = self._drain(link, name)
                self._close_channel(channel)
                letters.extend(letter for _, _, letter in items)
            return sorted(letters, key=lambda d: (d.dead_at, d.id))

        return self._fail_fast(run)

    def _dlq_apply(self, ids: Optional[Iterable[str]], replay: bool) -> int:
        wanted = None if ids is None else {str(i) for i in ids}
        names = self._all_queues()

        def run(link: _Link) -> int:
            done = 0
            for name in names:
                if wanted is not None and not wanted:
                    break
                channel, items = self._drain(link, name)
                try:
                    for delivery_tag, body, letter in items:
                        if wanted is not None and letter.id not in wanted:
                            continue
                        if replay:
                            props = self._props(letter.message_id or uuid.uuid4().hex, {H_ATTEMPTS: 0})
                            self._send(link, channel, self._phys(letter.queue), "main", None, body, props)
                        channel.basic_ack(delivery_tag)
                        done += 1
                        if wanted is not None:
                            wanted.discard(letter.id)
                finally:
                    self._close_channel(channel)
            return done

        count = self._fail_fast(run)
        if count and replay:
            log.info("replayed %d dead letter(s)", count)
        return count

    def dlq_replay(self, ids: Optional[Iterable[str]] = None) -> int:
        return self._dlq_apply(ids, replay=True)

    def dlq_purge(self, ids: Optional[Iterable[str]] = None) -> int:
        return self._dlq_apply(ids, replay=False)

    # ------------------------------------------------------------------ administration

    def delete_queue(self, queue: str) -> None:
        """Delete ``queue``, its DLQ and its delay queues, messages included (tests, decommissioning)."""
        phys = self._phys(queue)

        def run(link: _Link) -> None:
            channel = self._aux(link)
            for name in [phys, self._dlq(phys)] + [self._delay(phys, ms) for ms in DELAY_BUCKETS_MS]:
                channel.queue_delete(name)
                link.declared.discard(name)

        self._fail_fast(run)

    def close(self) -> None:
        self._closed = True
        with self._links_lock:
            links, self._links = list(self._links), set()
        for link in links:
            link.alive = False
            if link.pid == os.getpid():
                self._close_quietly(link.conn)
        self._state.link = None

    def __enter__(self) -> "RabbitBroker":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
