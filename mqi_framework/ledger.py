"""A worker's own memory: a small SQLite file per worker, ``<workspace>/workers/<name>.db``.

Workers never read the conductor's tables (``cases``, ``beams``, ``steps``): what a worker
must remember across a restart it keeps here, written by itself alone.

``tombstones``
    attempts the conductor cancelled (``cancel_step``): a ``run_step`` for one of them that
    arrives later is dropped and reported cancelled, never run.
``finished``
    attempts this worker ran and reported a final outcome for: a re-delivered ``run_step``
    of one of them (its ack was lost) is dropped, not run again.
``jobs``
    the executor's started jobs (the command and the job handle), polled on every tick and
    re-attached after a restart, until reported final.
``starting``
    commands whose job the executor was asked to start and whose handle is not yet in
    ``jobs`` (the worker may have died in between): a cancel of one of them re-attaches
    by job key and kills what it finds, never assuming that nothing started.
``announced``
    the scanner's announced case folder names, so that a restart does not announce every
    folder again (the conductor would ignore them, but the names may be patient ids: the
    file is mode 0600, its folder 0700).

The file runs in WAL mode. Rows older than :data:`KEEP_DAYS` are pruned (open jobs never).
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from pathlib import Path
from typing import Iterable, Optional

from mqi_framework import protocols as p

__all__ = ["KEEP_DAYS", "Ledger", "ledger_path"]

KEEP_DAYS = 7.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS tombstones (
    step_id INTEGER NOT NULL, attempt INTEGER NOT NULL, at REAL NOT NULL, PRIMARY KEY (step_id, attempt));
CREATE TABLE IF NOT EXISTS finished (
    step_id INTEGER NOT NULL, attempt INTEGER NOT NULL, outcome TEXT NOT NULL, at REAL NOT NULL,
    PRIMARY KEY (step_id, attempt));
CREATE TABLE IF NOT EXISTS jobs (
    step_id INTEGER NOT NULL, attempt INTEGER NOT NULL, body TEXT NOT NULL, handle TEXT NOT NULL,
    started_at REAL NOT NULL, PRIMARY KEY (step_id, attempt));
CREATE TABLE IF NOT EXISTS starting (
    step_id INTEGER NOT NULL, attempt INTEGER NOT NULL, body TEXT NOT NULL, at REAL NOT NULL,
    PRIMARY KEY (step_id, attempt));
CREATE TABLE IF NOT EXISTS announced (name TEXT PRIMARY KEY, at REAL NOT NULL);
"""


def ledger_path(workspace: Path, worker: str) -> Path:
    """Where worker ``worker`` keeps its ledger."""
    return Path(workspace) / "workers" / f"{worker}.db"


class Ledger:
    """One worker's ledger (see the module docstring). Used from one thread."""

    def __init__(self, path: Path, *, clock=time.time) -> None:
        self.path = Path(path)
        self.clock = clock
        self.path.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(self.path.parent, 0o700)
        # created 0600 before SQLite opens it (SQLite gives its -wal and -shm files the same mode)
        os.close(os.open(str(self.path), os.O_RDWR | os.O_CREAT, 0o600))
        os.chmod(self.path, 0o600)
        self.conn = sqlite3.connect(str(self.path), timeout=30, isolation_level=None)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=FULL")
        self.conn.executescript(_SCHEMA)
        self.prune()

    def close(self) -> None:
        self.conn.close()

    # ---------------------------------------------------------------- cancellation

    def cancel(self, step_id: int, attempt: int) -> None:
        self.conn.execute("INSERT OR IGNORE INTO tombstones VALUES (?, ?, ?)", (step_id, attempt, self.clock()))

    def is_cancelled(self, step_id: int, attempt: int) -> bool:
        return self._has("tombstones", step_id, attempt)

    # ---------------------------------------------------------------- finished attempts

    def finish(self, step_id: int, attempt: int, outcome: str) -> None:
        """Remember that this attempt's final outcome was reported (and drop its open job)."""
        with self.conn:
            self.conn.execute("BEGIN IMMEDIATE")
            self.conn.execute("INSERT OR REPLACE INTO finished VALUES (?, ?, ?, ?)",
                              (step_id, attempt, outcome, self.clock()))
            self.conn.execute("DELETE FROM jobs WHERE step_id = ? AND attempt = ?", (step_id, attempt))

    def is_finished(self, step_id: int, attempt: int) -> bool:
        return self._has("finished", step_id, attempt)

    # ---------------------------------------------------------------- executor jobs

    def job_starting(self, body: dict) -> None:
        """Remember, before the executor is asked, that the job of ``body`` may start."""
        self.conn.execute("INSERT OR REPLACE INTO starting VALUES (?, ?, ?, ?)",
                          (body["step_id"], body["attempt"], json.dumps(body), self.clock()))

    def starting(self, step_id: int, attempt: int) -> Optional[dict]:
        """The command of a job that may have started without its handle being recorded."""
        row = self.conn.execute("SELECT body FROM starting WHERE step_id = ? AND attempt = ?",
                                (step_id, attempt)).fetchone()
        return None if row is None else json.loads(row[0])

    def unconfirmed_starts(self) -> list[dict]:
        """Commands whose start was asked for and never answered (no handle recorded, no
        outcome reported), oldest first: their jobs may run."""
        rows = self.conn.execute(
            "SELECT body FROM starting s WHERE NOT EXISTS (SELECT 1 FROM jobs j WHERE j.step_id = s.step_id AND "
            "j.attempt = s.attempt) AND NOT EXISTS (SELECT 1 FROM finished f WHERE f.step_id = s.step_id AND "
            "f.attempt = s.attempt) ORDER BY at").fetchall()
        return [json.loads(r[0]) for r in rows]

    def job_started(self, body: dict, handle: p.JobHandle) -> None:
        with self.conn:
            self.conn.execute("BEGIN IMMEDIATE")
            self.conn.execute(
                "INSERT OR REPLACE INTO jobs VALUES (?, ?, ?, ?, ?)",
                (body["step_id"], body["attempt"], json.dumps(body),
                 json.dumps({"executor": handle.executor, "job_key": handle.job_key, "data": handle.data}),
                 self.clock()))
            self.conn.execute("DELETE FROM starting WHERE step_id = ? AND attempt = ?",
                              (body["step_id"], body["attempt"]))

    def job(self, step_id: int, attempt: int) -> Optional[tuple[dict, p.JobHandle]]:
        row = self.conn.execute("SELECT body, handle FROM jobs WHERE step_id = ? AND attempt = ?",
                                (step_id, attempt)).fetchone()
        return None if row is None else _job(row)

    def open_jobs(self) -> list[tuple[dict, p.JobHandle]]:
        """The started jobs not yet reported final, oldest first."""
        return [_job(r) for r in self.conn.execute("SELECT body, handle FROM jobs ORDER BY started_at, step_id")]

    # ---------------------------------------------------------------- scanner

    def announced(self) -> set[str]:
        return {r[0] for r in self.conn.execute("SELECT name FROM announced")}

    def announce(self, name: str) -> None:
        self.conn.execute("INSERT OR IGNORE INTO announced VALUES (?, ?)", (name, self.clock()))

    def forget_except(self, names: Iterable[str]) -> int:
        """Forget announced names not in ``names`` (folders gone from the inbox); how many."""
        keep = set(names)
        gone = [n for n in self.announced() if n not in keep]
        with self.conn:
            self.conn.execute("BEGIN IMMEDIATE")
            self.conn.executemany("DELETE FROM announced WHERE name = ?", [(n,) for n in gone])
        return len(gone)

    # ---------------------------------------------------------------- upkeep

    def prune(self, keep_days: float = KEEP_DAYS) -> None:
        horizon = self.clock() - keep_days * 86400
        with self.conn:
            self.conn.execute("BEGIN IMMEDIATE")
            self.conn.execute("DELETE FROM tombstones WHERE at < ?", (horizon,))
            self.conn.execute("DELETE FROM finished WHERE at < ?", (horizon,))
            self.conn.execute("DELETE FROM starting WHERE at < ?", (horizon,))

    def _has(self, table: str, step_id: int, attempt: int) -> bool:
        return self.conn.execute(f"SELECT 1 FROM {table} WHERE step_id = ? AND attempt = ?",
                                 (step_id, attempt)).fetchone() is not None


def _job(row: tuple) -> tuple[dict, p.JobHandle]:
    handle = json.loads(row[1])
    return json.loads(row[0]), p.JobHandle(handle["executor"], handle["job_key"], handle.get("data") or {})
