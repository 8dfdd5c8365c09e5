"""Judging a Moqui run's log: what the engine prints when it fails, the success line, and
batch progress. The texts are upstream Moqui's (MGHPhysicsResearch/moquimc) and the C++ and
CUDA runtimes' (docs/real-moqui.md lists where each comes from):

* success: ``Time taken by MC engine: <n> milli-seconds`` (the stand-in says ``... s``);
* an uncaught exception: ``terminate called after throwing an instance of
  'std::runtime_error'`` then ``what():  <reason>``, exit 134: the reason is quoted;
* CUDA out of memory: ``CUDA error: ... out of memory`` or ``GPUassert: out of memory <file>
  <line>``: a transient failure (another job held the GPU), retried;
* a dose that could not be written: ``Cannot write :...``, ``Cannot open file!``, ``Error
  occurred at writing time!``: upstream exits 0 after these, so the log alone makes it a
  failure;
* deterministic failures (no RTPLAN in the DICOM folder, no valid machine, an output folder
  that exists): permanent: retrying the same input cannot help, the step fails at once.
"""

from __future__ import annotations

import re
from typing import Optional

from mqi_framework.protocols import LogVerdict

_PROGRESS = re.compile(r"Generating particles for \((\d+) of (\d+) batches\)")
_WHAT = re.compile(r"what\(\):\s*(.*)")
SUCCESS_MARKER = "Time taken by MC engine"

#: (text in a line, what the step's message says, permanent): first match wins
KNOWN_FAILURES: tuple[tuple[str, str, bool], ...] = (
    ("There is no RTPLAN", "the engine found no RT Ion Plan in DicomDir", True),
    ("Valid machine is not available", "the engine has no model of the plan's treatment machine (Machine)", True),
    ("Output directory exists", "the output folder exists and OverwriteResults is false", True),
    ("out of memory", "the GPU ran out of memory", False),
    ("Cannot write", "the engine could not write the dose", False),
    ("Cannot open file!", "the engine could not open a file to write", False),
    ("Error occurred at writing time!", "the engine could not write the dose", False),
)
#: lines that mean failure without a known reason (quoted as they are)
FAILURE_MARKERS = ("FATAL ERROR", "ERROR:", "Segmentation fault", "terminate called after throwing", "GPUassert",
                   "CUDA error")


def judge_log(text: str) -> LogVerdict:
    """Judge a Moqui log (or its tail): failures win over the success line; a known failure
    names its cause (and whether retrying can help), an unknown one quotes its line."""
    progress: Optional[float] = None
    for match in _PROGRESS.finditer(text):
        done, total = int(match.group(1)), int(match.group(2))
        if total > 0:
            progress = max(0.0, min(1.0, done / total))
    lines = text.splitlines()
    reason = next((m.group(1).strip() for line in lines for m in [_WHAT.search(line)] if m), "")
    for needle, meaning, permanent in KNOWN_FAILURES:
        for line in lines:
            if needle in line:
                quoted = reason if reason and needle in reason else line.strip()
                return LogVerdict("failure", f"{meaning}: {quoted[:400]}", progress, permanent=permanent)
    if reason:
        return LogVerdict("failure", f"the engine aborted: {reason[:450]}", progress)
    for line in lines:
        if any(marker in line for marker in FAILURE_MARKERS):
            return LogVerdict("failure", line.strip()[:500], progress)
    if SUCCESS_MARKER in text:
        return LogVerdict("success", "", 1.0)
    return LogVerdict("unknown", "", progress)
