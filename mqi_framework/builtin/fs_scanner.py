"""``core.fs`` scanner: case folders in inbox directories.

A folder is ready when it holds the marker (``_CASE_READY``) or when nothing in its tree
changed for ``settle_seconds``. The scan is stateless (restart-safe): the conductor
deduplicates by folder name. Symlinked case folders are skipped: a case never leaves its
inbox. Folder names may be patient identifiers, so they are logged at debug level only.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Iterator, Optional

import attrs

from mqi_framework import hookimpl
from mqi_framework.protocols import CaseCandidate, Scanner

log = logging.getLogger(__name__)


#: how often an inbox that stays unreadable is mentioned again in the log
REPEAT_WARNING_SECONDS = 600


@attrs.frozen
class FsScannerSettings:
    """Settings of the ``core.fs`` scanner."""

    inboxes: list[str] = attrs.field(factory=list)  # folders holding case folders (relative: to the config file)
    settle_seconds: float = 30.0  # no change for this long makes a folder ready without a marker
    marker: str = "_CASE_READY"  # a file of this name in a case folder makes it ready at once
    ignore_hidden: bool = True  # skip folders whose names start with '.'


def newest_mtime(folder: str) -> float:
    """Newest modification time of anything in the tree (symlinks not followed)."""
    newest = os.stat(folder, follow_symlinks=False).st_mtime
    stack = [folder]
    while stack:
        with os.scandir(stack.pop()) as entries:
            for entry in entries:
                stat = entry.stat(follow_symlinks=False)
                newest = max(newest, stat.st_mtime)
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
    return newest


class FsScanner(Scanner):
    """Polls the configured inbox folders."""

    name = "core.fs"
    settings_class = FsScannerSettings

    def __init__(self, settings: Optional[FsScannerSettings], context) -> None:  # type: ignore[no-untyped-def]
        super().__init__(settings or FsScannerSettings(), context)
        base = context.config_path.parent if context.config_path else Path(context.workspace)
        self.inboxes = [(base / inbox).resolve() for inbox in self.settings.inboxes]
        #: inbox -> when it was last said to be unreadable (said again every REPEAT_WARNING_SECONDS)
        self._unreadable: dict[Path, float] = {}

    def check(self) -> list[str]:
        if not self.inboxes:
            return ["no inboxes configured (settings.inboxes)"]
        problems = []
        for inbox in self.inboxes:
            if not inbox.is_dir():
                problems.append(f"inbox {inbox} does not exist")
            elif not os.access(inbox, os.R_OK | os.X_OK):
                problems.append(f"inbox {inbox} is not readable")
        return problems

    def scan(self) -> Iterator[CaseCandidate]:
        now = time.time()
        for inbox in self.inboxes:
            try:
                entries = list(os.scandir(inbox))
            except OSError as exc:
                said = self._unreadable.get(inbox)
                if said is None or now - said >= REPEAT_WARNING_SECONDS:
                    log.warning("inbox %s cannot be read: %s (no case is taken from it until it can; said again "
                                "every %d minutes)", inbox, exc.strerror or exc, REPEAT_WARNING_SECONDS // 60)
                    self._unreadable[inbox] = now
                continue
            if self._unreadable.pop(inbox, None) is not None:
                log.info("inbox %s can be read again", inbox)
            for entry in sorted(entries, key=lambda e: e.name):
                candidate = self._candidate(inbox, entry, now)
                if candidate is not None:
                    yield candidate

    def _candidate(self, inbox: Path, entry: os.DirEntry, now: float) -> Optional[CaseCandidate]:
        if self.settings.ignore_hidden and entry.name.startswith("."):
            return None
        try:
            if entry.is_symlink():
                log.warning("inbox %s holds a symlinked folder; skipped (cases never leave their inbox)", inbox)
                return None
            if not entry.is_dir(follow_symlinks=False):
                return None
            path = Path(entry.path)
            if os.path.lexists(os.path.join(entry.path, self.settings.marker)):
                return CaseCandidate(entry.name, path, inbox, True, "marker")
            settled = now - newest_mtime(entry.path) >= self.settings.settle_seconds
        except FileNotFoundError:  # removed while we looked: next round
            return None
        except OSError as exc:
            log.debug("cannot look into a case folder of %s: %s", inbox, exc)
            return None
        return CaseCandidate(entry.name, path, inbox, settled, "settled" if settled else "changing")


@hookimpl
def mqi_register_scanners(register):  # type: ignore[no-untyped-def]
    register(FsScanner)
