"""Fixtures for the mqi-ssh tests: an ``ssh`` executor pointed at the session's real sshd
(fixture ``sshd`` from :mod:`mqi_ssh.testing`), with a remote root in a temp dir. Jobs left
running by a test are killed when it ends."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from mqi_framework import configload
from mqi_framework.protocols import PluginContext
from mqi_ssh.executor import SshExecutor, SshExecutorSettings
from mqi_ssh.testing import kill_remote_jobs


@pytest.fixture
def remote_root(tmp_path: Path) -> Iterator[Path]:
    root = tmp_path / "remote root"  # a space on purpose: every path must be quoted
    root.mkdir()
    yield root
    kill_remote_jobs(root)


@pytest.fixture
def make_executor(sshd_running: Any, remote_root: Path, tmp_path: Path) -> Iterator[Callable[..., SshExecutor]]:
    made: list[SshExecutor] = []

    def make(host: dict | None = None, **settings: Any) -> SshExecutor:
        host_settings = sshd_running.host_settings(**{"root": str(remote_root), **(host or {})})
        data = {"hosts": {"gpu1": host_settings}, "kill_grace_seconds": 1, "poll_interval_seconds": 0.05, **settings}
        executor = SshExecutor(configload.structure(SshExecutorSettings, data, path="settings"),
                               PluginContext(workspace=tmp_path))
        made.append(executor)
        return executor

    yield make
    for executor in made:
        executor.close()
