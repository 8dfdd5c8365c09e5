"""``mqi-host run``: the conductor and every enabled worker as supervised processes.

Each process is ``python -m mqi_framework.cli worker NAME -c CONFIG`` in its own session
(terminal signals reach only the host, which drains the children in order). The health
monitor restarts a process that exited or stopped heart-beating, with exponential
backoff; every restart is logged, counted in the ``workers`` table and written to the
audit log.

The host owns its workers. Each gets SIGTERM when the host dies, however it dies (Linux
parent-death signal), and the host records every child's pid and kernel start time in
``<workspace>/host-children.json``: a host that starts after one that was SIGKILLed (or
whose workers outlived it anyway) stops those leftovers before it starts its own, so two
sets of workers never share a workspace. Detached jobs are not workers and are left alone.
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

import attrs

from mqi_framework.config import LoadedConfig
from mqi_framework.files import write_atomic
from mqi_framework.jobrunner import process_start_time
from mqi_framework.store import open_state, transaction
from mqi_framework.store import records as rec
from mqi_framework.worker import CONDUCTOR

log = logging.getLogger(__name__)

STABLE_AFTER_SECONDS = 60.0  # a process that ran this long gets its backoff reset
#: the exit code of ``mqi-host worker`` for a configuration, plugin or state-database problem
#: (cli.EXIT_USAGE): restarting cannot help, so the host stops with the worker's reason
CONFIGURATION_EXIT = 2
CHILDREN_FILE = "host-children.json"
LEFTOVER_GRACE_SECONDS = 10.0  # a leftover worker gets this long to drain after SIGTERM
_PR_SET_PDEATHSIG = 1


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
        #: why the host stopped on its own (a worker that cannot start), or None
        self.fatal: Optional[str] = None
        self._lock = None

    def command(self, name: str) -> list[str]:
        assert self.loaded.path is not None
        return [sys.executable, "-m", "mqi_framework.cli", "worker", name, "-c", str(self.loaded.path)]

    def spawn(self, child: Supervised) -> None:
        log_path = self.log_dir / f"{child.name}.log"
        with open(log_path, "ab") as out:
            env = dict(os.environ, **self.extra_env)
            child.proc = subprocess.Popen(self.command(child.name), stdin=subprocess.DEVNULL, stdout=out,
                                          stderr=subprocess.STDOUT, start_new_session=True, env=env,
                                          preexec_fn=_die_with(os.getpid()))
        child.started_at = time.monotonic()
        child.restart_at = None
        self._record_children()
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
        self.stop_leftovers()
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
            if code == CONFIGURATION_EXIT and not self.stopping:
                self._stop_for_configuration(child)
                return
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

    def _stop_for_configuration(self, child: Supervised) -> None:
        """A worker refused to run for a configuration reason: say which and why (the last
        ``error:`` line of its log), and stop the host instead of restarting it forever."""
        reason = last_error(tail(self.log_dir / f"{child.name}.log", 40)) or f"it exited with code {CONFIGURATION_EXIT}"
        self.fatal = f"{child.name} cannot run: {reason}"
        child.proc = None
        with transaction(self.conn):
            self.conn.execute("UPDATE workers SET state = 'stopped', last_exit = ?, message = ? WHERE name = ?",
                              (CONFIGURATION_EXIT, reason, child.name))
            rec.add_event(self.conn, "host.stopped", f"{self.fatal}; the host stops (fix the configuration, then "
                          "start it again)", actor="host")
        log.error("%s; stopping the host (fix the configuration, then start it again)", self.fatal)
        self.stopping = True

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

    # ---------------------------------------------------------------- ownership of the workers

    def _record_children(self) -> None:
        children = {c.name: {"pid": c.proc.pid, "start_time": process_start_time(c.proc.pid)}
                    for c in self.children.values() if c.proc is not None}
        write_atomic(self.loaded.workspace / CHILDREN_FILE, json.dumps({"host": os.getpid(), "children": children}),
                     mode=0o600)

    def stop_leftovers(self) -> list[str]:
        """Stop the workers a previous host of this workspace left running (called with the
        lock held, so that host is gone); return their names. A recorded pid counts only
        while its kernel start time is the recorded one (pids are reused)."""
        try:
            recorded = json.loads((self.loaded.workspace / CHILDREN_FILE).read_text())["children"]
        except (OSError, ValueError, KeyError, TypeError):
            return []
        alive = {name: int(c["pid"]) for name, c in recorded.items()
                 if isinstance(c, dict) and c.get("start_time") and process_start_time(int(c["pid"])) == c["start_time"]}
        for pid in alive.values():
            _signal_group(pid, signal.SIGTERM)
        deadline = time.monotonic() + LEFTOVER_GRACE_SECONDS
        while time.monotonic() < deadline and any(_alive(pid, recorded[n]["start_time"]) for n, pid in alive.items()):
            time.sleep(0.1)
        for name, pid in alive.items():
            if _alive(pid, recorded[name]["start_time"]):
                log.error("leftover %s (pid %d) did not stop within %.0fs: killing it", name, pid,
                          LEFTOVER_GRACE_SECONDS)
                _signal_group(pid, signal.SIGKILL)
        if alive:
            names = ", ".join(f"{n} (pid {p})" for n, p in sorted(alive.items()))
            log.warning("stopped workers a previous host left running: %s", names)
            with transaction(self.conn):
                rec.add_event(self.conn, "host.leftovers_stopped", f"stopped workers a previous host left running: "
                              f"{names}", actor="host")
        return sorted(alive)

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
        return CONFIGURATION_EXIT if self.fatal else 0


def last_error(text: str) -> str:
    """The last ``error: ...`` a command printed, with its indented continuation lines, as
    one line (``error: invalid configuration ... (1 problem): mqi.yaml:12: ...``)."""
    lines = text.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("error:")]
    if not starts:
        return ""
    parts = [lines[starts[-1]][len("error:"):].strip()]
    parts += [line.strip() for line in lines[starts[-1] + 1:] if line[:1].isspace() and line.strip()]
    return " ".join(parts)


def tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _die_with(host_pid: int) -> Any:
    """A ``preexec_fn`` that makes the child get SIGTERM when the host dies (Linux), and exit
    at once if the host is already gone. The setting is not inherited by what the child forks,
    so detached jobs are not affected."""

    def arm() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        except (OSError, AttributeError):  # not Linux: the leftover check on the next start still applies
            return
        if os.getppid() != host_pid:
            os._exit(0)

    return arm


def _alive(pid: int, start_time: str) -> bool:
    return process_start_time(pid) == start_time


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)  # a worker leads its own session
    except (ProcessLookupError, PermissionError):
        pass
