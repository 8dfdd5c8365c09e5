"""``site.worklist``: an example scanner a clinic writes itself.

Cases come from a worklist CSV that the record-and-verify system exports, not from
watching an inbox. Each row names a case folder (relative to ``root``) and its status::

    folder,status
    2025-04-24 patient A,ready
    2025-04-24 patient B,delivering

Only ``ready`` rows are handed to the host. A row that points outside ``root`` (``..``, an
absolute path, a symlink) is ignored with a warning: cases never leave their root.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Iterator, Optional

import attrs

from mqi_framework import hookimpl
from mqi_framework.protocols import CaseCandidate, PluginContext, Scanner
from mqi_framework.toolkit import is_within

log = logging.getLogger(__name__)


@attrs.frozen
class WorklistSettings:
    """Settings of ``site.worklist`` (validated from ``workers.<name>.settings``)."""

    worklist: str  # the CSV file (relative paths: to the config file's folder)
    root: str  # the folder that holds the case folders
    ready_status: str = "ready"


class WorklistScanner(Scanner):
    """Reads the worklist on every scan; stateless, like every scanner."""

    name = "site.worklist"
    settings_class = WorklistSettings

    def __init__(self, settings: WorklistSettings, context: PluginContext) -> None:
        super().__init__(settings, context)
        base = context.config_path.parent if context.config_path else Path(context.workspace)
        self.worklist = (base / settings.worklist).resolve()
        self.root = (base / settings.root).resolve()

    def check(self) -> list[str]:
        problems = []
        if not self.worklist.is_file():
            problems.append(f"worklist {self.worklist} does not exist")
        if not self.root.is_dir():
            problems.append(f"root {self.root} does not exist")
        return problems

    def scan(self) -> Iterator[CaseCandidate]:
        try:
            with open(self.worklist, newline="", encoding="utf-8-sig") as fh:
                rows = list(csv.DictReader(fh))
        except FileNotFoundError:
            log.warning("worklist %s is missing; nothing to scan", self.worklist)
            return
        for number, row in enumerate(rows, start=2):
            candidate = self._candidate(row, number)
            if candidate is not None:
                yield candidate

    def _candidate(self, row: dict, line: int) -> Optional[CaseCandidate]:
        folder = (row.get("folder") or "").strip()
        if not folder:
            log.warning("worklist line %d has no folder; ignored", line)
            return None
        path = self.root / folder
        if Path(folder).is_absolute() or path.is_symlink() or not is_within(self.root, path):
            log.warning("worklist line %d points outside the root; ignored", line)
            return None
        if not path.is_dir():
            return None
        ready = (row.get("status") or "").strip().lower() == self.settings.ready_status
        return CaseCandidate(case_id=path.name, path=path, inbox=self.root, ready=ready,
                             reason="worklist" if ready else "listed, not ready")


@hookimpl
def mqi_register_scanners(register):  # type: ignore[no-untyped-def]
    register(WorklistScanner)
