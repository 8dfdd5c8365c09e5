"""Fixtures for the mqi-sftp tests: an ``sftp`` transfer pointed at the session's real sshd
(fixture ``sshd`` from :mod:`mqi_ssh.testing`), with a remote root in a temp dir."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from mqi_framework import configload
from mqi_framework.protocols import PluginContext
from mqi_sftp.transfer import SftpTransfer, SftpTransferSettings


@pytest.fixture
def remote_root(tmp_path: Path) -> Path:
    root = tmp_path / "remote root"
    root.mkdir()
    return root


@pytest.fixture
def make_transfer(sshd_running: Any, remote_root: Path, tmp_path: Path) -> Iterator[Callable[..., SftpTransfer]]:
    made: list[SftpTransfer] = []

    def make(host: dict | None = None, **settings: Any) -> SftpTransfer:
        host_settings = sshd_running.host_settings(**{"root": str(remote_root), **(host or {})})
        data = {"hosts": {"gpu1": host_settings}, **settings}
        transfer = SftpTransfer(configload.structure(SftpTransferSettings, data, path="settings"),
                                PluginContext(workspace=tmp_path))
        made.append(transfer)
        return transfer

    yield make
    for transfer in made:
        transfer.close()
