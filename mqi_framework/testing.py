"""pytest fixtures for plugin authors (loaded automatically through the ``pytest11`` entry point).

* ``mqi_pm`` – a fresh :class:`~mqi_framework.plugins.PluginHost` with only the hookspecs;
* ``register_plugin`` – register a throw-away plugin for one test (unregistered afterwards);
* ``mqi_workspace`` – a temporary workspace with a fast config (``.config_path``, ``.inbox``,
  ``.cli(...)``, ``.state()``);
* ``mqi_cli`` – run ``mqi-host`` in a subprocess and get the CompletedProcess;
* :class:`HostProcess` – ``mqi-host run`` on a workspace as a real subprocess, and
  :func:`wait_final` to wait until cases reach a final state.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import pytest


def run_cli(*args: str, cwd: Optional[Path] = None, env: Optional[dict] = None, timeout: float = 120,
            check: bool = False) -> subprocess.CompletedProcess:
    """Run ``python -m mqi_framework.cli ARGS`` (the same as ``mqi-host ARGS``)."""
    full_env = dict(os.environ, **(env or {}))
    proc = subprocess.run([sys.executable, "-m", "mqi_framework.cli", *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"mqi-host {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


class Workspace:
    """A temporary MQI workspace for tests."""

    def __init__(self, folder: Path, config: dict) -> None:
        from mqi_framework.workspace import write_workspace

        self.folder = folder
        self.config = config
        self.config_path = write_workspace(folder, config)
        self.inbox = folder / "inbox"

    def rewrite(self, config: dict) -> None:
        """Write ``config`` (a dict) as the workspace's mqi.yaml again."""
        from mqi_framework.workspace import write_workspace

        self.config = config
        write_workspace(self.folder, config)

    def cli(self, *args: str, **kwargs: Any) -> subprocess.CompletedProcess:
        """Run ``mqi-host ARGS -c <this workspace's config>`` in a subprocess."""
        return run_cli(*args, "-c", str(self.config_path), **kwargs)

    def cases(self) -> list[dict]:
        """``mqi-host cases --json`` of this workspace."""
        proc = self.cli("cases", "--json")
        if proc.returncode != 0:
            return []
        return json.loads(proc.stdout)

    def state(self) -> sqlite3.Connection:
        """A read-only connection to the workspace's state database."""
        from mqi_framework.store import connect

        return connect(self.folder / "state.db", readonly=True)

    def query(self, sql: str, *params: Any) -> list[sqlite3.Row]:
        """Rows of a read-only query on the state database ([] before it exists)."""
        if not (self.folder / "state.db").exists():
            return []
        conn = self.state()
        try:
            return conn.execute(sql, params).fetchall()
        except sqlite3.OperationalError as exc:
            if "no such table" in str(exc):  # created, not yet migrated by the host
                return []
            raise
        finally:
            conn.close()

    def cases_by_name(self) -> dict[str, dict]:
        """The cases by folder name (``cases --json --names``)."""
        proc = self.cli("cases", "--json", "--names", check=True)
        return {c["name"]: c for c in json.loads(proc.stdout)}

    def gpu_allocations(self) -> list[dict]:
        """The GPUs held by a step now: ``[{"idx", "allocated_step"}]``."""
        return [dict(r) for r in self.query("SELECT idx, allocated_step FROM resources WHERE allocated_step IS NOT NULL")]

    def logs(self, lines: int = 15) -> str:
        """The last ``lines`` of every process log, for assertion messages."""
        out = []
        for log in sorted((self.folder / "logs").glob("*.log")):
            out.append(f"--- {log.name}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-lines:]))
        return "\n".join(out)

    def kill_jobs(self) -> None:
        """SIGKILL every detached job the local executor started in this workspace."""
        for pid_file in (self.folder / "jobs").glob("*/pid"):
            try:
                os.killpg(int(pid_file.read_text().split()[1]), signal.SIGKILL)
            except (ValueError, IndexError, ProcessLookupError, PermissionError, OSError):
                pass


FINAL_STATES = ("done", "failed", "rejected", "cancelled")


def wait_final(ws: Workspace, count: int, timeout: float = 90) -> dict[str, dict]:
    """Wait until ``count`` cases exist and all are final; return them by folder name."""
    from mqi_framework.workspace import wait_until

    result: dict[str, dict] = {}

    def done() -> bool:
        nonlocal result
        if not (ws.folder / "state.db").exists():
            return False
        result = ws.cases_by_name()
        return len(result) >= count and all(c["state"] in FINAL_STATES for c in result.values())

    if not wait_until(done, timeout, 0.3):
        raise AssertionError(f"cases not final after {timeout}s: {result}\n{ws.logs()}")
    return result


class HostProcess:
    """``mqi-host run`` on a workspace, as a subprocess in its own session."""

    def __init__(self, ws: Workspace, env: Optional[dict] = None) -> None:
        self.ws = ws
        self.env = {**os.environ, **(env or {})}
        self.proc: Optional[subprocess.Popen] = None

    def start(self) -> "HostProcess":
        """Start ``mqi-host run`` on the workspace in its own session."""
        self._log = open(self.ws.folder / "host-stdout.log", "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "mqi_framework.cli", "run", "-c", str(self.ws.config_path)],
                                     stdout=self._log, stderr=subprocess.STDOUT, env=self.env,
                                     start_new_session=True)
        return self

    @property
    def running(self) -> bool:
        """Whether the host process still runs."""
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM (drain), SIGKILL after ``timeout``; return the exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()
        return self.proc.returncode

    def kill_everything(self) -> None:
        """SIGKILL the host and every worker, as a crash of the host machine's processes would
        (detached jobs survive, like jobs on a remote GPU server)."""
        assert self.proc is not None
        pids = [r["pid"] for r in self.ws.query("SELECT pid FROM workers WHERE pid IS NOT NULL")]
        for pid in [self.proc.pid, *pids]:
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        self.proc.wait()
        self._log.close()


@pytest.fixture
def mqi_pm() -> Iterator[Any]:
    """A fresh PluginHost with no entry points loaded: only what the test registers."""
    from mqi_framework.plugins import PluginHost

    yield PluginHost(load_entry_points=False)


@pytest.fixture
def register_plugin(mqi_pm: Any) -> Iterator[Callable[..., str]]:
    """``register(plugin, name=None)`` on ``mqi_pm``; every plugin is unregistered after the test."""
    names: list[str] = []

    def register(plugin: Any, name: Optional[str] = None) -> str:
        registered = mqi_pm.register(plugin, name=name)
        names.append(registered)
        return registered

    yield register
    for name in names:
        mqi_pm.unregister(name)


@pytest.fixture
def mqi_workspace(tmp_path: Path) -> Workspace:
    """A workspace with the quick starter config in ``tmp_path``."""
    from mqi_framework.workspace import fast_config

    return Workspace(tmp_path / "ws", fast_config())


@pytest.fixture
def mqi_cli() -> Callable[..., subprocess.CompletedProcess]:
    """``run_cli``: ``mqi-host`` in a subprocess, returning the CompletedProcess."""
    return run_cli
