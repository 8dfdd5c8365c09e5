"""The one format of a log line about a case: ``case=… beam=… step=… attempt=… job=…``
(fields that do not apply are left out; never a folder name, which may be a patient id).

The conductor, the roles and every executor write their lines through these functions, so
that ``grep 'case=case-000042 '`` finds everything about a case in every log.
"""

from __future__ import annotations

import re
from typing import Any, Optional

__all__ = ["fields", "from_command", "from_job_key", "job_key"]

_JOB_KEY = re.compile(r"^(?P<case>case-\d+)-(?P<step>.+)-b(?P<beam>\d+)-a(?P<attempt>\d+)$")


def fields(case: Any = None, beam: Any = None, step: Any = None, attempt: Any = None, job: Any = None) -> str:
    """``case=… beam=… step=… attempt=… job=…`` with the fields that are given (beam 0: none)."""
    parts = [f"{name}={value}" for name, value in
             (("case", case), ("beam", beam or None), ("step", step), ("attempt", attempt), ("job", job))
             if value is not None]
    return " ".join(parts)


def job_key(case: str, step: str, beam: Optional[int], attempt: int) -> str:
    """The key of a step attempt's job (``case-000042-simulate-b3-a1``): unique, and the same
    on every re-delivery of the command, so an executor never starts one attempt twice."""
    return f"{case}-{step}-b{beam or 0}-a{attempt}"


def from_command(body: dict) -> str:
    """The fields of a step command (``run_step`` message)."""
    return fields(body.get("case"), body.get("beam"), body.get("step"), body.get("attempt"), body.get("job_key"))


def from_job_key(key: str) -> str:
    """The fields of a job, from its key (an executor knows only the key); a key of another
    shape is logged as ``job=<key>`` alone."""
    match = _JOB_KEY.match(key)
    if match is None:
        return fields(job=key)
    return fields(match["case"], int(match["beam"]), match["step"], int(match["attempt"]), key)
