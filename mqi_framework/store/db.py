"""SQLite connection set-up, transactions and numbered migrations.

The state database runs in WAL mode with ``synchronous=FULL`` (a committed state change
survives power loss) and a generous busy timeout, because the conductor, workers, the
CLI and the dashboard open it from separate processes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sqlite3
import time
from importlib import resources
from pathlib import Path
from typing import Iterator

log = logging.getLogger(__name__)

BUSY_TIMEOUT_MS = 30_000
_MIGRATION_NAME = re.compile(r"^(\d{3})_[a-z0-9_]+\.sql$")


class StoreError(Exception):
    """The state database is unusable (newer schema than this code, corrupt, unwritable)."""


def connect(path: Path | str, *, readonly: bool = False) -> sqlite3.Connection:
    """Open the state database with our pragmas. Autocommit mode: use :func:`transaction`."""
    path = Path(path)
    if readonly:
        if not path.exists():
            raise StoreError(f"state database {path} does not exist yet (has `mqi-host run` been started?)")
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=BUSY_TIMEOUT_MS / 1000,
                               isolation_level=None, check_same_thread=False)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(str(path), timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None,
                               check_same_thread=False)
    conn.row_factory = sqlite3.Row
    conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    if not readonly:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA foreign_keys=ON")
    return conn


@contextlib.contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """One write transaction (BEGIN IMMEDIATE: the write lock is taken up front, so two
    processes never both read-then-write the same rows)."""
    for attempt in range(50):
        try:
            conn.execute("BEGIN IMMEDIATE")
            break
        except sqlite3.OperationalError as exc:  # busy beyond busy_timeout: rare, retry
            if "locked" not in str(exc) or attempt == 49:
                raise
            time.sleep(0.05)
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    else:
        conn.execute("COMMIT")


def migrations() -> list[tuple[int, str, str]]:
    """(version, file name, SQL) for every numbered migration, in order."""
    folder = resources.files("mqi_framework.store").joinpath("migrations")
    found = []
    for entry in folder.iterdir():
        match = _MIGRATION_NAME.match(entry.name)
        if match:
            found.append((int(match.group(1)), entry.name, entry.read_text(encoding="utf-8")))
    return sorted(found)


def migrate(conn: sqlite3.Connection) -> int:
    """Apply pending migrations, each in its own transaction; return the schema version."""
    known = migrations()
    latest = known[-1][0] if known else 0
    current = conn.execute("PRAGMA user_version").fetchone()[0]
    if current > latest:
        raise StoreError(
            f"the state database has schema version {current}, newer than this mqi-host knows ({latest}); "
            f"upgrade mqi-host or restore a backup"
        )
    for version, name, sql in known:
        if version <= current:
            continue
        with transaction(conn):
            # Another process may have migrated while we waited for the write lock.
            if conn.execute("PRAGMA user_version").fetchone()[0] >= version:
                continue
            log.info("applying state database migration %s", name)
            for statement in _split_sql(sql):
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version={version}")
    return conn.execute("PRAGMA user_version").fetchone()[0]


def _split_sql(sql: str) -> list[str]:
    """Split a migration into statements (sqlite3.executescript would commit on its own)."""
    statements, buf = [], []
    for line in sql.splitlines():
        stripped = line.strip()
        if stripped.startswith("--") or not stripped:
            continue
        buf.append(line)
        joined = "\n".join(buf)
        if stripped.endswith(";") and sqlite3.complete_statement(joined):
            statements.append(joined)
            buf = []
    if buf:
        statements.append("\n".join(buf))
    return statements


def open_state(path: Path | str) -> sqlite3.Connection:
    """Open (creating and migrating when needed) the state database."""
    conn = connect(path)
    migrate(conn)
    return conn


def backup(state_db: Path | str, target: Path | str) -> Path:
    """A consistent copy of the state database at ``target``, safe while other processes
    write (the SQLite backup API copies the WAL's committed transactions too, which a plain
    file copy would miss). Written to ``target.part``, checked with ``PRAGMA integrity_check``,
    made durable and renamed; raises StoreError when the copy is not sound (no file is left)."""
    from mqi_framework.files import fsync_dir, part_path

    target = Path(target)
    part = part_path(target)
    part.unlink(missing_ok=True)
    try:
        source = sqlite3.connect(f"file:{Path(state_db)}?mode=ro", uri=True, timeout=BUSY_TIMEOUT_MS / 1000)
    except sqlite3.Error as exc:
        raise StoreError(f"state database {state_db} cannot be opened for a backup: {exc}") from None
    try:
        dest = sqlite3.connect(part)
        try:
            source.backup(dest)
            status = dest.execute("PRAGMA integrity_check").fetchone()[0]
        finally:
            dest.close()
    except sqlite3.Error as exc:
        part.unlink(missing_ok=True)
        raise StoreError(f"backup of {state_db} failed: {exc}") from None
    finally:
        source.close()
    if status != "ok":
        part.unlink(missing_ok=True)
        raise StoreError(f"backup of {state_db} failed its integrity check: {status}")
    with open(part, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(part, target)
    fsync_dir(target.parent)
    return target
