"""The embedded default broker: a durable message queue in one SQLite file.

Several processes (conductor, workers, CLI, dashboard) open the same file. Every
operation is one short transaction; the ones that read-then-write (``get``, ``nack``,
dead-lettering, replay) start with ``BEGIN IMMEDIATE`` so the write lock is taken up
front and two processes can never lease the same message. The file runs in WAL mode
with ``synchronous=FULL``: once ``publish`` returns, the message survives a crash or a
power loss (this is the embedded equivalent of a publisher confirm).

Leases: ``get`` stamps the row with ``leased_until`` and a fresh random
``lease_token``; ``Delivery.tag`` is ``(row id, lease_token)``. ``ack``, ``nack`` and
``extend`` only act when the token still matches, so a consumer whose lease ran out and
whose message went to another consumer cannot delete or re-queue the other consumer's
message: the call has no effect and logs a warning.

Threads: one ``SqliteBroker`` holds one connection, opened with
``check_same_thread=False`` and guarded by a lock, so it may be shared between threads
(calls are serialised); in practice each worker uses its own instance from one thread.
Processes must each open their own instance (never share one across ``fork``).

Why this module is over 400 lines: it is one class implementing the whole
:class:`~mqi_framework.broker.base.Broker` contract on one table, and publishing, leasing,
delays and dead-lettering are the same rows changed in the same short transactions; split
apart, the lease-token rule above would have to be kept true in several files.

Clocks: lease and visibility times are wall-clock epoch seconds (``time.time()``)
because they are compared across processes; keep the hosts' clocks sane (NTP).
"""

from __future__ import annotations

import contextlib
import json
import logging
import secrets
import sqlite3
import threading
import time
import uuid
from pathlib import Path
from typing import Iterable, Iterator, Optional


from .base import Broker, BrokerError, DeadLetter, Delivery, QueueStats, RetryPolicy

log = logging.getLogger(__name__)

BUSY_TIMEOUT_MS = 10_000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    queue         TEXT    NOT NULL,
    message_id    TEXT    NOT NULL,
    body          TEXT    NOT NULL,
    attempt       INTEGER NOT NULL DEFAULT 0,
    visible_at    REAL    NOT NULL,
    leased_until  REAL,
    lease_token   TEXT,
    created_at    REAL    NOT NULL,
    last_error    TEXT
);
CREATE INDEX IF NOT EXISTS messages_queue_visible ON messages (queue, visible_at, id);
CREATE TABLE IF NOT EXISTS dead_letters (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    queue       TEXT    NOT NULL,
    message_id  TEXT    NOT NULL,
    body        TEXT    NOT NULL,
    reason      TEXT    NOT NULL,
    attempts    INTEGER NOT NULL,
    dead_at     REAL    NOT NULL
);
CREATE INDEX IF NOT EXISTS dead_letters_queue ON dead_letters (queue, id);
"""


class SqliteBroker(Broker):
    """Durable SQLite-backed :class:`Broker` usable from many processes at once."""

    def __init__(
        self,
        path: Path | str,
        *,
        retry: RetryPolicy = RetryPolicy(),
        lease_seconds: float = 60.0,
        poll_interval: float = 0.01,
    ) -> None:
        if lease_seconds <= 0:
            raise ValueError(f"lease_seconds must be positive, got {lease_seconds!r}")
        if poll_interval <= 0:
            raise ValueError(f"poll_interval must be positive, got {poll_interval!r}")
        if retry.max_attempts < 1:
            raise ValueError(f"retry.max_attempts must be at least 1, got {retry.max_attempts!r}")
        self.path = Path(path).expanduser()
        self.retry = retry
        self.lease_seconds = float(lease_seconds)
        self.poll_interval = float(poll_interval)
        self._lock = threading.RLock()
        self._conn: Optional[sqlite3.Connection] = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(
                str(self.path),
                timeout=BUSY_TIMEOUT_MS / 1000,
                isolation_level=None,  # autocommit: we issue BEGIN ourselves
                check_same_thread=False,
            )
            self._conn = conn
            conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                log.warning("broker database %s: journal_mode is %s, not WAL", self.path, mode)
            conn.execute("PRAGMA synchronous=FULL")
        except (sqlite3.Error, OSError) as exc:
            self._close_quietly()
            raise BrokerError(f"cannot open broker database {self.path}: {exc}") from exc
        try:
            self._create_schema()
        except BrokerError:
            self._close_quietly()
            raise

    # ------------------------------------------------------------------ plumbing

    def __repr__(self) -> str:
        return f"SqliteBroker({str(self.path)!r}, lease_seconds={self.lease_seconds})"

    def _create_schema(self) -> None:
        with self._write() as conn:
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise BrokerError(f"broker {self.path} is closed")
        return self._conn

    @contextlib.contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            conn = self._connection()
            try:
                yield conn
            except sqlite3.Error as exc:
                raise BrokerError(f"broker database {self.path}: {exc}") from exc

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One short write transaction, ``BEGIN IMMEDIATE`` (write lock taken up front)."""
        with self._lock:
            conn = self._connection()
            try:
                for attempt in range(20):
                    try:
                        conn.execute("BEGIN IMMEDIATE")
                        break
                    except sqlite3.OperationalError as exc:
                        # busy beyond busy_timeout: rare, retry a little before giving up
                        if "locked" not in str(exc) and "busy" not in str(exc) or attempt == 19:
                            raise
                        time.sleep(0.05)
                try:
                    yield conn
                except BaseException:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    raise
                else:
                    conn.execute("COMMIT")
            except sqlite3.Error as exc:
                raise BrokerError(f"broker database {self.path}: {exc}") from exc

    def _close_quietly(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(sqlite3.Error):
                self._conn.close()
            self._conn = None

    @staticmethod
    def _tag(delivery: Delivery) -> tuple[int, str]:
        try:
            row_id, token = delivery.tag
            return int(row_id), str(token)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"not a delivery of a SqliteBroker: tag {delivery.tag!r}") from exc

    @staticmethod
    def _dead_letter(conn: sqlite3.Connection, row_id: int, reason: str, now: float) -> bool:
        """Move one message to ``dead_letters`` (caller holds the write transaction)."""
        row = conn.execute(
            "SELECT queue, message_id, body, attempt FROM messages WHERE id = ?", (row_id,)
        ).fetchone()
        if row is None:
            return False
        queue, message_id, body, attempt = row
        conn.execute(
            "INSERT INTO dead_letters (queue, message_id, body, reason, attempts, dead_at)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (queue, message_id, body, reason, attempt, now),
        )
        conn.execute("DELETE FROM messages WHERE id = ?", (row_id,))
        log.warning("dead-lettered message %s of queue %s after %d attempt(s): %s",
                    message_id, queue, attempt, reason)
        return True

    def _sweep_expired(self, conn: sqlite3.Connection, now: float, queue: Optional[str]) -> int:
        """Dead-letter messages whose lease ran out on their last allowed attempt."""
        sql = ("SELECT id, attempt, last_error FROM messages"
               " WHERE leased_until IS NOT NULL AND leased_until < ? AND attempt >= ?")
        args: list = [now, self.retry.max_attempts]
        if queue is not None:
            sql += " AND queue = ?"
            args.append(queue)
        moved = 0
        for row_id, attempt, last_error in conn.execute(sql, args).fetchall():
            reason = f"lease expired {attempt} times: consumer died"
            if last_error:
                reason = f"lease expired on attempt {attempt}: consumer died (earlier: {last_error})"
            moved += self._dead_letter(conn, row_id, reason, now)
        return moved

    def _sweep(self, queue: Optional[str] = None) -> None:
        """Run :meth:`_sweep_expired` only when a cheap read finds something to move."""
        now = time.time()
        sql = ("SELECT 1 FROM messages WHERE leased_until IS NOT NULL AND leased_until < ?"
               " AND attempt >= ?")
        args: list = [now, self.retry.max_attempts]
        if queue is not None:
            sql += " AND queue = ?"
            args.append(queue)
        with self._read() as conn:
            found = conn.execute(sql + " LIMIT 1", args).fetchone()
        if found:
            with self._write() as conn:
                self._sweep_expired(conn, time.time(), queue)

    # ------------------------------------------------------------------ Broker API

    def publish(self, queue: str, body: dict, *, message_id: Optional[str] = None, delay: float = 0.0) -> str:
        if not queue:
            raise ValueError("queue name must not be empty")
        if not isinstance(body, dict):
            raise TypeError(f"message body must be a dict, got {type(body).__name__}")
        text = json.dumps(body, ensure_ascii=False, allow_nan=False)
        message_id = message_id or uuid.uuid4().hex
        now = time.time()
        with self._write() as conn:
            conn.execute(
                "INSERT INTO messages (queue, message_id, body, attempt, visible_at, created_at)"
                " VALUES (?, ?, ?, 0, ?, ?)",
                (queue, message_id, text, now + max(0.0, float(delay)), now),
            )
        return message_id

    def _try_lease(self, queue: str) -> Optional[Delivery]:
        with self._write() as conn:
            now = time.time()
            self._sweep_expired(conn, now, queue)
            row = conn.execute(
                "SELECT id, message_id, body, attempt FROM messages"
                " WHERE queue = ? AND visible_at <= ?"
                " AND (leased_until IS NULL OR leased_until < ?)"
                " ORDER BY visible_at, id LIMIT 1",
                (queue, now, now),
            ).fetchone()
            if row is None:
                return None
            row_id, message_id, body, attempt = row
            token = secrets.token_hex(16)
            attempt += 1
            conn.execute(
                "UPDATE messages SET attempt = ?, leased_until = ?, lease_token = ? WHERE id = ?",
                (attempt, now + self.lease_seconds, token, row_id),
            )
        return Delivery(queue=queue, message_id=message_id, body=json.loads(body),
                        attempt=attempt, tag=(row_id, token))

    def _anything_to_lease(self, queue: str) -> bool:
        """A cheap read (no write lock): is a message visible, or a lease run out?"""
        now = time.time()
        with self._read() as conn:
            return conn.execute(
                "SELECT 1 FROM messages WHERE queue = ? AND visible_at <= ?"
                " AND (leased_until IS NULL OR leased_until < ?) LIMIT 1",
                (queue, now, now),
            ).fetchone() is not None

    def get(self, queue: str, *, timeout: float = 0.0) -> Optional[Delivery]:
        """Lease the next message; while waiting, poll every ``poll_interval`` seconds with a
        read that takes no write lock (idle consumers do not contend with writers)."""
        deadline = time.monotonic() + max(0.0, float(timeout))
        while True:
            delivery = self._try_lease(queue) if self._anything_to_lease(queue) else None
            if delivery is not None:
                return delivery
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            time.sleep(min(self.poll_interval, remaining))

    def ack(self, delivery: Delivery) -> None:
        row_id, token = self._tag(delivery)
        with self._write() as conn:
            cur = conn.execute("DELETE FROM messages WHERE id = ? AND lease_token = ?", (row_id, token))
        if cur.rowcount == 0:
            log.warning("ack of message %s on queue %s ignored: its lease expired and it was "
                        "handed to another consumer (or it is gone)", delivery.message_id, delivery.queue)

    def nack(self, delivery: Delivery, *, reason: str, retry: bool = True) -> bool:
        """Give the message back; see :meth:`Broker.nack`.

        A stale delivery (lease lost to another consumer) has no effect; it returns True
        because the message is still live (it was not dead-lettered by this call).
        """
        row_id, token = self._tag(delivery)
        with self._write() as conn:
            now = time.time()
            row = conn.execute(
                "SELECT attempt FROM messages WHERE id = ? AND lease_token = ?", (row_id, token)
            ).fetchone()
            if row is None:
                log.warning("nack of message %s on queue %s ignored: its lease expired and it was "
                            "handed to another consumer (or it is gone)", delivery.message_id, delivery.queue)
                return True
            attempt = row[0]
            if retry and attempt < self.retry.max_attempts:
                conn.execute(
                    "UPDATE messages SET visible_at = ?, leased_until = NULL, lease_token = NULL,"
                    " last_error = ? WHERE id = ?",
                    (now + self.retry.delay(attempt), reason, row_id),
                )
                return True
            if retry:
                reason = f"{reason} (gave up after {attempt} attempts)"
            self._dead_letter(conn, row_id, reason, now)
            return False

    def extend(self, delivery: Delivery, seconds: float) -> None:
        """Set the lease to end ``seconds`` from now (never shortens it)."""
        row_id, token = self._tag(delivery)
        with self._write() as conn:
            cur = conn.execute(
                "UPDATE messages SET leased_until = MAX(leased_until, ?) WHERE id = ? AND lease_token = ?",
                (time.time() + float(seconds), row_id, token),
            )
        if cur.rowcount == 0:
            log.warning("lease extension of message %s on queue %s ignored: the lease was lost",
                        delivery.message_id, delivery.queue)

    def depth(self, queue: str) -> int:
        self._sweep(queue)
        with self._read() as conn:
            return conn.execute("SELECT COUNT(*) FROM messages WHERE queue = ?", (queue,)).fetchone()[0]

    def queues(self) -> list[QueueStats]:
        """Every queue with live messages or dead letters, by name (for CLI and dashboard)."""
        self._sweep()
        now = time.time()
        with self._read() as conn:
            live = conn.execute(
                "SELECT queue, COUNT(*),"
                " SUM(CASE WHEN (leased_until IS NULL OR leased_until < ?) AND visible_at <= ? THEN 1 ELSE 0 END),"
                " SUM(CASE WHEN (leased_until IS NULL OR leased_until < ?) AND visible_at > ? THEN 1 ELSE 0 END),"
                " SUM(CASE WHEN leased_until >= ? THEN 1 ELSE 0 END)"
                " FROM messages GROUP BY queue",
                (now, now, now, now, now),
            ).fetchall()
            dead = dict(conn.execute("SELECT queue, COUNT(*) FROM dead_letters GROUP BY queue").fetchall())
        stats = {q: QueueStats(q, n, ready or 0, delayed or 0, leased or 0, dead.get(q, 0))
                 for q, n, ready, delayed, leased in live}
        for q, n in dead.items():
            stats.setdefault(q, QueueStats(q, 0, 0, 0, 0, n))
        return [stats[q] for q in sorted(stats)]

    def dlq_list(self, queue: Optional[str] = None) -> list[DeadLetter]:
        self._sweep(queue)
        sql = "SELECT id, queue, message_id, body, reason, attempts, dead_at FROM dead_letters"
        args: tuple = ()
        if queue is not None:
            sql += " WHERE queue = ?"
            args = (queue,)
        with self._read() as conn:
            rows = conn.execute(sql + " ORDER BY dead_at, id", args).fetchall()
        return [DeadLetter(id=str(i), queue=q, message_id=m, body=json.loads(b), reason=r,
                           attempts=a, dead_at=t) for i, q, m, b, r, a, t in rows]

    @staticmethod
    def _ids(ids: Iterable[str]) -> list[int]:
        out = []
        for i in ids:
            try:
                out.append(int(i))
            except (TypeError, ValueError):
                raise ValueError(f"not a dead-letter id: {i!r}") from None
        return out

    def _dlq_select(self, conn: sqlite3.Connection, ids: Optional[Iterable[str]], columns: str) -> list:
        if ids is None:
            return conn.execute(f"SELECT {columns} FROM dead_letters ORDER BY id").fetchall()
        rows = []
        for row_id in self._ids(ids):
            row = conn.execute(f"SELECT {columns} FROM dead_letters WHERE id = ?", (row_id,)).fetchone()
            if row is not None:
                rows.append(row)
        return rows

    def dlq_replay(self, ids: Optional[Iterable[str]] = None) -> int:
        if ids is not None:
            ids = list(ids)
        with self._write() as conn:
            now = time.time()
            rows = self._dlq_select(conn, ids, "id, queue, message_id, body")
            for row_id, queue, message_id, body in rows:
                conn.execute(
                    "INSERT INTO messages (queue, message_id, body, attempt, visible_at, created_at)"
                    " VALUES (?, ?, ?, 0, ?, ?)",
                    (queue, message_id, body, now, now),
                )
                conn.execute("DELETE FROM dead_letters WHERE id = ?", (row_id,))
        if rows:
            log.info("replayed %d dead letter(s)", len(rows))
        return len(rows)

    def dlq_purge(self, ids: Optional[Iterable[str]] = None) -> int:
        if ids is not None:
            ids = list(ids)
        with self._write() as conn:
            if ids is None:
                return conn.execute("DELETE FROM dead_letters").rowcount
            return sum(conn.execute("DELETE FROM dead_letters WHERE id = ?", (i,)).rowcount
                       for i in self._ids(ids))

    def close(self) -> None:
        with self._lock:
            self._close_quietly()

    def __enter__(self) -> "SqliteBroker":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
