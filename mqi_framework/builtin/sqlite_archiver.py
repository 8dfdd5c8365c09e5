"""``core.sqlite`` archiver: consistent online backups of the state database with the
SQLite backup API (safe while other processes write), verified, with retention."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Optional

import attrs

from mqi_framework import hookimpl
from mqi_framework.protocols import ArchiveResult, Archiver
from mqi_framework.store.db import StoreError, backup

log = logging.getLogger(__name__)
PREFIX = "state-"


@attrs.frozen
class SqliteArchiverSettings:
    """Settings of the ``core.sqlite`` archiver."""

    backup_dir: Optional[str] = None  # default: <workspace>/backups
    keep_last: int = 7  # newest backups kept
    max_age_days: Optional[float] = None  # older backups are removed (the newest is always kept)
    interval_seconds: float = 3600.0  # seconds between backups (the first one runs at the worker's start)


class SqliteArchiver(Archiver):
    """Backs up the state database on a schedule and prunes old backups."""

    name = "core.sqlite"
    settings_class = SqliteArchiverSettings

    def __init__(self, settings: Optional[SqliteArchiverSettings], context) -> None:  # type: ignore[no-untyped-def]
        super().__init__(settings or SqliteArchiverSettings(), context)
        folder = Path(self.settings.backup_dir) if self.settings.backup_dir else Path("backups")
        self.backup_dir = folder if folder.is_absolute() else Path(context.workspace) / folder

    def check(self) -> list[str]:
        problems = []
        if self.settings.keep_last < 1:
            problems.append("keep_last must be at least 1")
        try:
            self.backup_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            problems.append(f"backup folder {self.backup_dir} cannot be created: {exc}")
        return problems

    def run(self, state_db: Path) -> ArchiveResult:
        self.backup_dir.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        target = self.backup_dir / f"{PREFIX}{stamp}.db"
        n = 1
        while target.exists():
            n += 1
            target = self.backup_dir / f"{PREFIX}{stamp}-{n}.db"
        try:
            backup(state_db, target)
        except StoreError as exc:
            raise RuntimeError(str(exc)) from None
        removed = self._retention(keep=target)
        message = f"backed up to {target.name}; removed {len(removed)} old backup(s)"
        log.info("%s", message)
        return ArchiveResult(backup_path=target, removed=removed, message=message)

    def _retention(self, keep: Path) -> list[Path]:
        backups = sorted(self.backup_dir.glob(f"{PREFIX}*.db"), key=lambda p: p.stat().st_mtime, reverse=True)
        removed = []
        now = time.time()
        for index, path in enumerate(backups):
            if path == keep:
                continue
            too_many = index >= self.settings.keep_last
            too_old = (self.settings.max_age_days is not None
                       and now - path.stat().st_mtime > self.settings.max_age_days * 86400)
            if too_many or too_old:
                path.unlink(missing_ok=True)
                removed.append(path)
        return removed


@hookimpl
def mqi_register_archivers(register):  # type: ignore[no-untyped-def]
    register(SqliteArchiver)
