"""The step retry policy: what follows a failed attempt (``docs/concepts.md``, "Retries").

This is the only place that decides whether a step is tried again. A failed attempt uses
one of the step's ``retry.max_attempts``; a permanent one ends the step at once; an
``unreachable`` one (its host could not be reached) is free while the unreachable streak
is younger than :data:`UNREACHABLE_GIVE_UP_SECONDS`, and counts like any failure after.
The next attempt follows after ``backoff_seconds × 2^(n−1)``, at most
``max_backoff_seconds``, times a jitter of 0.5–1.0 (``n``: the attempt number, or the
length of the unreachable streak). Broker redelivery is not a step retry: see
:mod:`mqi_framework.worker`.
"""

from __future__ import annotations

import random
import sqlite3
from typing import Optional

import attrs

from mqi_framework.config import RetrySettings

__all__ = ["UNREACHABLE_GIVE_UP_SECONDS", "Decision", "backoff", "decide", "unreachable_streak"]

UNREACHABLE_GIVE_UP_SECONDS = 3600.0  # unreachable attempts are free this long, then they count


@attrs.frozen
class Decision:
    """Try again after ``delay`` seconds (``retry``), or fail the step for good."""

    retry: bool
    delay: float = 0.0
    #: the attempt did not count against ``retry.max_attempts`` (an unreachable host)
    free: bool = False
    #: why, for the audit entry (empty for an ordinary retry)
    note: str = ""


def backoff(retry: RetrySettings, n: int, rng: random.Random) -> float:
    """The wait before the next attempt, ``n`` counting from 1."""
    raw = min(retry.max_backoff_seconds, retry.backoff_seconds * (2 ** max(0, n - 1)))
    return raw * rng.uniform(0.5, 1.0)


def unreachable_streak(conn: sqlite3.Connection, step_id: int) -> tuple[int, Optional[float]]:
    """How many of the step's last attempts in a row found their host unreachable, and when
    the first of them was dispatched (None for no streak)."""
    streak, since = 0, None
    for a in conn.execute("SELECT outcome, dispatched_at FROM attempts WHERE step_id = ? ORDER BY attempt DESC",
                          (step_id,)):
        if a["outcome"] != "unreachable":
            break
        streak, since = streak + 1, a["dispatched_at"]
    return streak, since


def decide(conn: sqlite3.Connection, row: sqlite3.Row, retry: RetrySettings, *, outcome: str, permanent: bool,
           now: float, rng: random.Random) -> Decision:
    """What follows the failed (or unreachable) attempt of step ``row``, whose outcome is
    already recorded in ``attempts``."""
    if outcome == "unreachable" and not permanent:
        streak, since = unreachable_streak(conn, row["id"])
        if since is not None and now - since < UNREACHABLE_GIVE_UP_SECONDS:
            return Decision(True, backoff(retry, streak, rng), free=True,
                            note=f"unreachable for {now - since:.0f}s: not counted")
    if row["attempt"] < row["max_attempt"] and not permanent:
        return Decision(True, backoff(retry, row["attempt"], rng))
    return Decision(False)
