"""Declared waits: a worker blocked on something known and bounded (the SSH connection
limit, a free SSH channel, a long remote command, the broker coming back) says so, and
its heartbeat goes on while it waits, so the host does not kill it as hung (issue 13.3).

A wait that is not declared does not keep the worker alive: a main thread stuck anywhere
else stops its heartbeat, and the host kills and restarts it after
``supervision.hung_after_seconds``. A declared wait keeps a worker alive for at most
:data:`MAX_DECLARED_WAIT_SECONDS`; after that it counts as hung like any other.

Usage (any thread of a worker process; waits may nest)::

    with waiting("SSH connection limit of gpu1"):
        time.sleep(5)
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
from typing import Iterator, Optional

__all__ = ["MAX_DECLARED_WAIT_SECONDS", "current_wait", "waiting"]

#: the longest a declared wait keeps a worker's heartbeat fresh
MAX_DECLARED_WAIT_SECONDS = 900.0

_lock = threading.Lock()
_active: dict[int, tuple[str, float]] = {}
_tokens = itertools.count()


@contextlib.contextmanager
def waiting(reason: str) -> Iterator[None]:
    """Declare that this thread waits for ``reason`` (a few words, no patient data) until
    the block ends."""
    token = next(_tokens)
    with _lock:
        _active[token] = (reason, time.time())
    try:
        yield
    finally:
        with _lock:
            _active.pop(token, None)


def current_wait(now: Optional[float] = None) -> Optional[tuple[str, float]]:
    """The oldest declared wait still in progress and younger than
    :data:`MAX_DECLARED_WAIT_SECONDS`, as ``(reason, since)``; None when there is none."""
    now = time.time() if now is None else now
    with _lock:
        waits = sorted(_active.values(), key=lambda w: w[1])
    for reason, since in waits:
        if now - since <= MAX_DECLARED_WAIT_SECONDS:
            return reason, since
    return None
