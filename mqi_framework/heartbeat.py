"""A worker's heartbeat, written by a thread of its own.

The worker's main thread only marks that it is alive (:meth:`Heartbeat.alive`, cheap, no
I/O) at every turn of its loop and whenever a long piece of work reports progress. The
thread writes the time of that mark into ``workers.heartbeat_at`` every
``supervision.heartbeat_seconds``, with its own connection, so a locked state database
delays the heartbeat but never the work. While the main thread is in a declared wait
(:mod:`mqi_framework.waits`) the thread writes the current time and says what it waits for;
a main thread stuck anywhere else leaves an old time there, and the host kills it as hung.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Optional

from mqi_framework.store import connect
from mqi_framework.store import records as rec
from mqi_framework.waits import current_wait

log = logging.getLogger(__name__)

__all__ = ["Heartbeat"]


class Heartbeat:
    """Heartbeats of worker ``name`` into the state database at ``database``."""

    def __init__(self, database: Path, name: str, kind: str, every: float) -> None:
        self.database = database
        self.name = name
        self.kind = kind
        self.every = every
        self._alive_at = time.time()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def alive(self) -> None:
        """The main thread is alive now."""
        self._alive_at = time.time()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"{self.name}-heartbeat", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=max(5.0, self.every * 2))

    def beat_once(self, conn: sqlite3.Connection) -> None:
        """Write one heartbeat (what the thread does every ``every`` seconds)."""
        alive_at, message = self._alive_at, ""
        wait = current_wait()
        if wait is not None:  # alive now, however long ago the main thread marked it
            reason, since = wait
            alive_at = time.time()
            message = f"waiting: {reason} ({alive_at - since:.0f}s)"
        rec.worker_state(conn, self.name, self.kind, pid=os.getpid(), state="running", message=message,
                         alive_at=alive_at)

    def _run(self) -> None:
        conn: Optional[sqlite3.Connection] = None
        while not self._stop.wait(self.every):
            try:
                if conn is None:
                    conn = connect(self.database)
                self.beat_once(conn)
            except sqlite3.Error as exc:  # locked or briefly unavailable: the next beat tries again
                log.debug("%s: heartbeat not written (%s)", self.name, exc)
            except Exception:  # never let the heartbeat thread die quietly
                log.exception("%s: heartbeat failed", self.name)
        if conn is not None:
            conn.close()
