"""The conductor's outbox: commands written in the same SQLite transaction as the state
change that causes them, then relayed to the broker (each publish confirmed) and marked
sent. A crash between the publish and the mark re-sends a command: consumers treat a
duplicate as a no-op (the worker's ledger, :mod:`mqi_framework.ledger`)."""

from __future__ import annotations

import json
import sqlite3
import uuid

from mqi_framework.broker.base import Broker

__all__ = ["prune", "relay", "write"]


def write(conn: sqlite3.Connection, queue: str, body: dict, now: float) -> None:
    """Add a command to the outbox (inside the caller's transaction)."""
    conn.execute("INSERT INTO outbox(queue, message_id, body, created_at) VALUES (?, ?, ?, ?)",
                 (queue, uuid.uuid4().hex, json.dumps(body), now))


def relay(conn: sqlite3.Connection, broker: Broker, now: float, limit: int = 500) -> int:
    """Publish unsent outbox rows in order (each confirmed by the broker), then mark them sent."""
    rows = conn.execute(
        "SELECT id, queue, message_id, body FROM outbox WHERE sent_at IS NULL ORDER BY id LIMIT ?", (limit,)
    ).fetchall()
    for row in rows:
        broker.publish(row["queue"], json.loads(row["body"]), message_id=row["message_id"])
        # A crash right here re-sends the message: consumers treat duplicates as no-ops.
        conn.execute("UPDATE outbox SET sent_at = ? WHERE id = ?", (now, row["id"]))
    return len(rows)


def prune(conn: sqlite3.Connection, horizon: float) -> None:
    """Forget rows sent before ``horizon``."""
    conn.execute("DELETE FROM outbox WHERE sent_at IS NOT NULL AND sent_at < ?", (horizon,))
