"""pytest fixtures for plugin authors (loaded automatically through the ``pytest11`` entry point).

* ``mqi_pm`` – a fresh :class:`~mqi_framework.plugins.PluginHost` with only the hookspecs;
* ``register_plugin`` – register a throw-away plugin for one test (unregistered afterwards);
* ``mqi_workspace`` – a temporary workspace with a fast config (``.config_path``, ``.inbox``,
  ``.cli(...)``, ``.state()``);
* ``mqi_cli`` – run ``mqi-host`` in a subprocess and get the CompletedProcess.
"""

from __future__ import annotations

import json
import os
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
        from mqi_framework.workspace import write_workspace

        self.config = config
        write_workspace(self.folder, config)

    def cli(self, *args: str, **kwargs: Any) -> subprocess.CompletedProcess:
        return run_cli(*args, "-c", str(self.config_path), **kwargs)

    def cases(self) -> list[dict]:
        proc = self.cli("cases", "--json")
        if proc.returncode != 0:
            return []
        return json.loads(proc.stdout)

    def state(self) -> sqlite3.Connection:
        from mqi_framework.store import connect

        return connect(self.folder / "state.db", readonly=True)


@pytest.fixture
def mqi_pm() -> Iterator[Any]:
    from mqi_framework.plugins import PluginHost

    yield PluginHost(load_entry_points=False)


@pytest.fixture
def register_plugin(mqi_pm: Any) -> Iterator[Callable[..., str]]:
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
    from mqi_framework.workspace import fast_config

    return Workspace(tmp_path / "ws", fast_config())


@pytest.fixture
def mqi_cli() -> Callable[..., subprocess.CompletedProcess]:
    return run_cli
