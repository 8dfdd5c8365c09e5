"""``mqi-host run``: the conductor and every enabled worker as supervised processes.

Each process is ``python -m mqi_framework.cli worker NAME -c CONFIG`` in its own session
(terminal signals reach only the host, which drains the children in order). The health
monitor restarts a process that exited or stopped heart-beating, with exponential
backoff; every restart is logged, counted in the ``workers`` table and written to the
audit log.
"""

from __future__ import annotations

import fcntl
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import attrs

from mqi_framework.config import LoadedConfig
from mqi_framework.store import open_state, transaction
from mqi_framework.store import records as rec
from mqi_framework.worker import CONDUCTOR

log = logging.getLogger(__name__)

STABLE_AFTER_SECONDS = 60.0  # a process that ran this long gets its backoff reset


@attrs.define
class Supervised:
    name: str
    proc: Optional[subprocess.Popen] = None
    started_at: float = 0.0
    restarts: int = 0
    backoff: float = 0.0
    restart_at: Optional[float] = None


class WorkspaceBusy(Exception):
    """Another ``mqi-host run`` already supervises this workspace."""


class ProcessHost:
    """Starts, watches and stops the host's processes."""

    def __init__(self, loaded: LoadedConfig, *, extra_env: Optional[dict] = None) -> None:
        self.loaded = loaded
        self.sup = loaded.config.supervision
        self.names = [CONDUCTOR] + [n for n, w in loaded.config.workers.items() if w.enabled]
        self.children = {name: Supervised(name) for name in self.names}
        self.conn = open_state(loaded.database_path)
        self.log_dir = loaded.workspace_path(loaded.config.logging.directory)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.extra_env = extra_env or {}
        self.stopping = False
        self._lock = None

    def command(self, name: str) -> list[str]:
        assert self.loaded.path is not None
        return [sys.executable, "-m", "mqi_framework.cli", "worker", name, "-c", str(self.loaded.path)]

    def spawn(self, child: Supervised) -> None:
        log_path = self.log_dir / f"{child.name}.log"
        with open(log_path, "ab") as out:
            env = dict(os.environ, **self.extra_env)
            child.proc = subprocess.Popen(self.command(child.name), stdin=subprocess.DEVNULL, stdout=out,
                                          stderr=subprocess.STDOUT, start_new_session=True, env=env)
        child.started_at = time.monotonic()
        child.restart_at = None
        rec.worker_state(self.conn, child.name, "process", pid=child.proc.pid, state="starting", heartbeat=False)
        log.info("started %s (pid %d, log %s)", child.name, child.proc.pid, log_path)

    def lock(self) -> None:
        """Hold ``<workspace>/host.lock`` while running: two hosts on one workspace would
        fight over the same workers and jobs."""
        path = self.loaded.workspace / "host.lock"
        self._lock = open(path, "a+")
        try:
            fcntl.flock(self._lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.seek(0)
            holder = self._lock.read().strip() or "?"
            self._lock.close()
            raise WorkspaceBusy(f"another mqi-host run (pid {holder}) is using the workspace {self.loaded.workspace}; "
                                f"stop it first") from None
        self._lock.seek(0)
        self._lock.truncate()
        self._lock.write(f"{os.getpid()}\n")
        self._lock.flush()

    def start(self) -> None:
        if getattr(self, "_lock", None) is None:
            self.lock()
        for child in self.children.values():
            self.spawn(child)

    def monitor_once(self) -> None:
        """Check every child once: restart the dead when their backoff ran out, kill the hung."""
        now = time.monotonic()
        for child in self.children.values():
            if child.proc is None:
                if child.restart_at is not None and now >= child.restart_at and not self.stopping:
                    self.spawn(child)
                continue
            code = child.proc.poll()
            if code is not None:
                self._schedule_restart(child, f"exited with code {code}", code)
                continue
            if self._hung(child, now):
                log.error("%s stopped heart-beating for %.0fs: killing it", child.name, self.sup.hung_after_seconds)
                self._kill_group(child.proc, signal.SIGKILL)
                child.proc.wait()
                self._schedule_restart(child, "hung (no heartbeat)", -9)

    def _hung(self, child: Supervised, now: float) -> bool:
        if now - child.started_at < self.sup.hung_after_seconds:
            return False
        row = self.conn.execute("SELECT heartbeat_at, pid FROM workers WHERE name = ?", (child.name,)).fetchone()
        if row is None or row["heartbeat_at"] is None or row["pid"] != child.proc.pid:
            return True
        return time.time() - row["heartbeat_at"] > self.sup.hung_after_seconds

    def _schedule_restart(self, child: Supervised, why: str, code: int) -> None:
        ran = time.monotonic() - child.started_at
        child.proc = None
        if ran >= STABLE_AFTER_SECONDS:
            child.backoff = 0.0
        child.backoff = min(self.sup.restart_backoff_max_seconds,
                            max(self.sup.restart_backoff_seconds, child.backoff * 2))
        child.restart_at = time.monotonic() + child.backoff
        child.restarts += 1
        with transaction(self.conn):
            self.conn.execute("UPDATE workers SET state = 'restarting', restarts = restarts + 1, last_exit = ?, "
                              "message = ? WHERE name = ?", (code, why, child.name))
            rec.add_event(self.conn, "worker.restart", f"{child.name} {why}; restart #{child.restarts} in "
                          f"{child.backoff:.1f}s", actor="host")
        log.warning("%s %s; restarting in %.1fs (restart #%d)", child.name, why, child.backoff, child.restarts)

    def stop(self) -> None:
        """Drain: SIGTERM to workers first, the conductor last, SIGKILL after drain_seconds."""
        self.stopping = True
        order = [c for c in self.children.values() if c.name != CONDUCTOR] + [self.children[CONDUCTOR]]
        for child in order:
            if child.proc is not None and child.proc.poll() is None:
                self._kill_group(child.proc, signal.SIGTERM)
        deadline = time.monotonic() + self.sup.drain_seconds
        for child in order:
            if child.proc is None:
                continue
            try:
                child.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("%s did not stop within %.0fs: killing it", child.name, self.sup.drain_seconds)
                self._kill_group(child.proc, signal.SIGKILL)
                child.proc.wait()
            rec.worker_state(self.conn, child.name, "process", pid=None, state="stopped", heartbeat=False)
        log.info("all processes stopped")

    @staticmethod
    def _kill_group(proc: subprocess.Popen, sig: int) -> None:
        # The child leads its own session; jobs it started detached have sessions of their own
        # and are deliberately not touched (the restarted worker re-attaches to them).
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass

    def run_forever(self, *, until: Optional[callable] = None, poll_seconds: float = 0.5) -> int:
        """Supervise until SIGTERM/SIGINT (or ``until()`` returns True), then drain."""
        def _signal(*_: object) -> None:
            self.stopping = True

        previous = {sig: signal.signal(sig, _signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            self.start()
            while not self.stopping:
                self.monitor_once()
                if until is not None and until():
                    break
                time.sleep(poll_seconds)
        finally:
            self.stop()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return 0


def tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""
