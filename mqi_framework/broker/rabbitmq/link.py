"""Connections to RabbitMQ: one per thread and process, dropped and rebuilt when they fail.

pika's ``BlockingConnection`` is not thread-safe, so :class:`Connections` opens one
:class:`Link` (a connection and its channels) per thread that uses the broker, lazily on
first use, and per process (a forked child never touches its parent's socket). A link whose
connection or channel failed is forgotten, which gives the messages it held back to their
queues, and a later operation opens a new one; failed attempts back off exponentially.

:func:`connection_parameters` makes pika's parameters from ``broker.url`` (our defaults for
heartbeat and timeouts, one attempt per connect). Connecting turns pika's errors into
:class:`BrokerError` (wrong credentials, missing virtual host or permissions: a person must
act) or :class:`BrokerUnavailable` (try again later), with the password redacted.

This module is also the one place that reads a private attribute of pika
(:func:`server_version`), which is why ``pyproject.toml`` bounds pika's version.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
import urllib.parse
from typing import Any, Callable, Optional, TypeVar

import pika
import pika.exceptions as pe

from ..base import BrokerError, BrokerUnavailable
from .message import as_text

log = logging.getLogger(__name__)
if logging.getLogger("pika").level == logging.NOTSET:
    # pika logs every failed connection attempt as ERROR with a traceback; this package reports
    # connection loss and recovery itself (one warning per outage, one line on reconnecting)
    logging.getLogger("pika").setLevel(logging.CRITICAL)

T = TypeVar("T")

BACKOFF_FIRST, BACKOFF_MAX = 0.1, 3.0

_OUR_QUERY_KEYS = ("queue_type",)  # broker.url query keys for the broker, not for pika
_DEFAULTS = {"heartbeat": 60, "blocked_connection_timeout": 30, "socket_timeout": 5}

# errors that mean "this connection or channel is gone": the link is dropped and rebuilt
LINK_ERRORS = (pe.AMQPConnectionError, pe.AMQPChannelError, pe.ChannelError, OSError)


def split_url(url: str) -> tuple[str, dict[str, str]]:
    """``url`` without the query keys that are the broker's, and those keys with their values."""
    parts = urllib.parse.urlsplit(url)
    query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    ours = {k: v for k, v in query if k in _OUR_QUERY_KEYS}
    rest = urllib.parse.urlencode([(k, v) for k, v in query if k not in _OUR_QUERY_KEYS])
    return urllib.parse.urlunsplit(parts._replace(query=rest)), ours


def connection_parameters(pika_url: str) -> pika.URLParameters:
    """pika's parameters for ``pika_url``, with our defaults where the URL sets none (raises what pika raises)."""
    params = pika.URLParameters(pika_url)
    given = set(urllib.parse.parse_qs(urllib.parse.urlsplit(pika_url).query))
    for key, value in _DEFAULTS.items():
        if key not in given:
            setattr(params, key, value)
    params.connection_attempts = 1  # we retry ourselves, with backoff
    return params


def describe(exc: BaseException) -> str:
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


def close_quietly(conn: Any) -> None:
    try:
        if conn.is_open:
            conn.close()
    except Exception:  # noqa: BLE001 - it is being thrown away
        pass


def server_version(conn: pika.BlockingConnection) -> str:
    """The RabbitMQ version the server announced when ``conn`` opened ("" when it named none)."""
    # PRIVATE PIKA ATTRIBUTE, the only one this package reads. BlockingConnection offers no
    # public accessor for the server properties of connection.start (only the capability
    # flags, e.g. publisher_confirms_supported); they live on the SelectConnection it wraps,
    # ``_impl``. pyproject.toml bounds pika below its next minor release for this: check that
    # ``conn._impl.server_properties`` still exists before raising the bound.
    return as_text(conn._impl.server_properties.get("version", ""))


class Link:
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

    def wait_for_one(self, phys: str, seconds: float) -> Optional[tuple]:
        """Wait up to ``seconds`` for one message with a temporary consumer (prefetch 1)."""
        box: list[tuple] = []

        def on_message(_ch: Any, method: Any, props: Any, body: bytes) -> None:
            box.append((method, props, body))

        consumer = self.main.basic_consume(phys, on_message, auto_ack=False)
        try:
            end = time.monotonic() + seconds
            while not box:
                left = end - time.monotonic()
                if left <= 0:
                    break
                self.conn.process_data_events(time_limit=left)
        finally:
            if self.main.is_open:
                # With prefetch 1 and the message we got unacked, nothing else can be in flight;
                # a message pushed in the instant between a timeout and the cancel is given back
                # by pika (it then counts as one more delivery).
                self.main.basic_cancel(consumer)
        for extra in box[1:]:  # not expected with prefetch 1
            self.main.basic_reject(extra[0].delivery_tag, requeue=True)
        return box[0] if box else None


class ThreadState(threading.local):
    def __init__(self) -> None:
        self.link: Optional[Link] = None
        self.down_since: Optional[float] = None
        self.retry_at = 0.0
        self.backoff = 0.0


class Connections:
    """The links of one broker object: the calling thread's, opened on demand, and all of them
    for :meth:`close`.

    ``on_open`` is called with every new connection before it is used (the topology learns
    the server's version there); a :class:`BrokerError` it raises fails the connect.
    ``owner`` names the broker in the error about using it after ``close()``.
    """

    def __init__(self, params: pika.URLParameters, *, owner: object, where: str, user: str,
                 redact: Callable[[str], str], on_open: Callable[[pika.BlockingConnection], None],
                 rng: random.Random) -> None:
        self.params = params
        self.owner = owner
        self.where = where
        self.user = user
        self.redact = redact
        self.on_open = on_open
        self.rng = rng
        self.state = ThreadState()
        self.links: set[Link] = set()
        self.lock = threading.Lock()
        self.closed = False

    def connect(self) -> Link:
        if self.closed:
            raise BrokerError(f"{self.owner!r} is closed")
        try:
            conn = pika.BlockingConnection(self.params)
        except (pe.ProbableAuthenticationError, pe.AuthenticationError) as exc:
            raise BrokerError(
                f"RabbitMQ at {self.where} refused the login of user {self.user!r}: wrong user name or password "
                f"(note that RabbitMQ's 'guest' user may only log in from localhost) [{self.redact(describe(exc))}]"
            ) from None
        except pe.ProbableAccessDeniedError as exc:
            vhost = self.params.virtual_host
            detail = self.redact(describe(exc))
            if "not found" in detail:
                raise BrokerError(
                    f"virtual host {vhost!r} does not exist on RabbitMQ at {self.params.host}:{self.params.port}: "
                    f"create it (rabbitmqctl add_vhost {vhost} && rabbitmqctl set_permissions -p {vhost} "
                    f"{self.user} '.*' '.*' '.*') or fix broker.url (the default vhost '/' is written %2F) [{detail}]"
                ) from None
            raise BrokerError(
                f"user {self.user!r} may not use virtual host {vhost!r} on RabbitMQ at "
                f"{self.params.host}:{self.params.port}: grant it (rabbitmqctl set_permissions -p {vhost} "
                f"{self.user} '.*' '.*' '.*') [{detail}]") from None
        except (pe.AMQPError, OSError) as exc:
            raise BrokerUnavailable(f"cannot reach RabbitMQ at {self.where}: {self.redact(describe(exc))}") from None
        try:
            main = conn.channel()
            main.confirm_delivery()
            main.basic_qos(prefetch_count=1)
            self.on_open(conn)
        except BrokerError:
            close_quietly(conn)
            raise
        except LINK_ERRORS as exc:
            close_quietly(conn)
            raise BrokerUnavailable(f"RabbitMQ at {self.where}: {self.redact(describe(exc))}") from None
        return Link(conn, main)

    def current(self) -> Optional[Link]:
        st = self.state
        link = st.link
        if link is None:
            return None
        if link.pid != os.getpid():  # forked: the socket is the parent's; open our own
            st.link = None
            return None
        if link.usable():
            return link
        self.lost(link, None)
        return None

    def open_link(self) -> Link:
        st = self.state
        link = self.connect()
        with self.lock:
            self.links.add(link)
        st.link = link
        if st.down_since is not None:
            log.info("reconnected to RabbitMQ at %s after %.1fs", self.where, time.monotonic() - st.down_since)
        st.down_since, st.retry_at = None, 0.0  # the backoff resets after the first operation that works
        return link

    def link_now(self) -> Link:
        """The thread's connection, opened now if needed (raises when that fails)."""
        return self.current() or self.open_link()

    def lost(self, link: Optional[Link], exc: Optional[BaseException]) -> None:
        """Forget a broken connection (its unacked messages go back to their queues)."""
        if link is None:
            return
        link.alive = False
        with self.lock:
            self.links.discard(link)
        st = self.state
        if st.link is link:
            st.link = None
        if link.pid == os.getpid():
            close_quietly(link.conn)
        if st.down_since is None and not self.closed:
            st.down_since = time.monotonic()
            why = self.redact(describe(exc)) if exc is not None else "connection closed"
            log.warning("RabbitMQ at %s: connection lost (%s); reconnecting with backoff (messages this "
                        "connection held go back to their queues)", self.where, why)

    def note_unreachable(self, exc: BrokerUnavailable) -> None:
        st = self.state
        st.backoff = min(BACKOFF_MAX, st.backoff * 2) if st.backoff else BACKOFF_FIRST
        st.retry_at = time.monotonic() + st.backoff * self.rng.uniform(0.5, 1.0)
        if st.down_since is None:
            st.down_since = time.monotonic()
            log.warning("%s; retrying with backoff", exc)
        else:
            log.debug("%s; retrying in %.2fs", exc, st.retry_at - time.monotonic())

    def fail_fast(self, fn: Callable[[Link], T]) -> T:
        """Run ``fn`` on the thread's connection; after a connection error, once more on a fresh one."""
        for round_ in (1, 2):
            link = self.link_now()
            try:
                return fn(link)
            except BrokerError:
                raise
            except LINK_ERRORS as exc:
                self.lost(link, exc)
                if round_ == 2:
                    raise BrokerUnavailable(f"RabbitMQ at {self.where}: {self.redact(describe(exc))}") from None
        raise AssertionError("unreachable")  # pragma: no cover

    def close(self) -> None:
        """Close every connection this object opened (in this process); no new ones after this."""
        self.closed = True
        with self.lock:
            links = list(self.links)
            self.links.clear()
        for link in links:
            link.alive = False
            if link.pid == os.getpid():
                close_quietly(link.conn)
        self.state.link = None
