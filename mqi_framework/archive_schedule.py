"""Runs an archiver on an APScheduler interval (imported lazily: start-up speed matters)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from mqi_framework.protocols import Archiver

log = logging.getLogger(__name__)


def start_archive_scheduler(archiver: Archiver, state_db: Path, interval_seconds: float, *,
                            run_now: bool = True) -> Any:
    """Start a BackgroundScheduler running ``archiver.run(state_db)`` every ``interval_seconds``."""
    from datetime import datetime

    from apscheduler.schedulers.background import BackgroundScheduler
    from apscheduler.triggers.interval import IntervalTrigger

    def job() -> None:
        try:
            result = archiver.run(state_db)
            log.info("archive: %s", result.message)
        except Exception:  # a failed backup is logged and tried again next time
            log.exception("archive run failed")

    scheduler = BackgroundScheduler(daemon=True)
    scheduler.add_job(job, IntervalTrigger(seconds=interval_seconds), id="archive", max_instances=1, coalesce=True,
                      next_run_time=datetime.now() if run_now else None)
    scheduler.start()
    return scheduler


def stop_archive_scheduler(scheduler: Any) -> None:
    scheduler.shutdown(wait=True)
