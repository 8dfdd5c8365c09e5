"""Judging a Moqui run's log: failure markers, the success line, batch progress."""

from __future__ import annotations

import re
from typing import Optional

from mqi_framework.protocols import LogVerdict

_PROGRESS = re.compile(r"Generating particles for \((\d+) of (\d+) batches\)")
FAILURE_MARKERS = ("FATAL ERROR", "ERROR:", "Segmentation fault")
SUCCESS_MARKER = "Time taken by MC engine"


def judge_log(text: str) -> LogVerdict:
    """Judge a Moqui log (or its tail): failure markers win, then the success marker, else unknown."""
    progress: Optional[float] = None
    for match in _PROGRESS.finditer(text):
        done, total = int(match.group(1)), int(match.group(2))
        if total > 0:
            progress = max(0.0, min(1.0, done / total))
    for line in text.splitlines():
        if any(marker in line for marker in FAILURE_MARKERS):
            return LogVerdict("failure", line.strip()[:500], progress)
    if SUCCESS_MARKER in text:
        return LogVerdict("success", "", 1.0)
    return LogVerdict("unknown", "", progress)
