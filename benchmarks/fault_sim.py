"""The simulator the fault campaign (``benchmarks/faults.py``) runs: the stand-in with a ledger.

    python benchmarks/fault_sim.py LEDGER CASE BEAM ATTEMPT GPU INPUT_FILE

Appends a ``start`` line to the JSON-lines file LEDGER, runs ``python -m mqi_moqui.standin
INPUT_FILE`` and appends an ``end`` line with its exit status; exits with that status. A run
killed with its job's process group has a ``start`` line and no ``end`` line. The ledger is
the campaign's ground truth: it is written by the simulator side, never by the host.

While it runs it holds two ``flock`` locks beside the ledger, one per beam and one per GPU
index, and records on its ``start`` line whether another run held either: a second run of
the same beam at the same time, or two beams on one GPU, is seen even when both are killed
before they end.
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import time
from pathlib import Path


def append(ledger: Path, **fields: object) -> None:
    """One JSON line, appended with a single write (O_APPEND: lines of concurrent runs never mix)."""
    line = (json.dumps(fields, sort_keys=True) + "\n").encode()
    fd = os.open(ledger, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def try_lock(path: Path) -> tuple[int, bool]:
    """Open ``path`` and take an exclusive lock without waiting: (fd, whether someone held it).
    When someone did, wait for it after all, so that the lock is ours while we run."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return fd, False
    except BlockingIOError:
        return fd, True


def main(argv: list[str]) -> int:
    if len(argv) != 6:
        print(__doc__, file=sys.stderr)
        return 2
    ledger, case, beam, attempt, gpu, input_file = argv
    ledger_path = Path(ledger)
    locks = ledger_path.parent / "locks"
    locks.mkdir(exist_ok=True)
    _beam_fd, beam_busy = try_lock(locks / f"{case}-beam{beam}")
    _gpu_fd, gpu_busy = try_lock(locks / f"gpu{gpu}")
    run = f"{os.getpid()}-{time.time_ns()}"
    append(ledger_path, event="start", run=run, case=case, beam=int(beam), attempt=int(attempt), gpu=gpu,
           beam_busy=beam_busy, gpu_busy=gpu_busy, t=time.time())
    rc = subprocess.call([sys.executable, "-m", "mqi_moqui.standin", input_file])
    append(ledger_path, event="end", run=run, case=case, beam=int(beam), attempt=int(attempt), rc=rc, t=time.time())
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
