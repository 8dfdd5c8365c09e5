"""Entry point of mqi-sftp (group ``mqi_framework.plugins``, name ``sftp``): registers the
``sftp`` transfer."""

from __future__ import annotations

from typing import Callable

from mqi_framework import hookimpl


@hookimpl
def mqi_register_transfers(register: Callable[[type], None]) -> None:
    from mqi_sftp.transfer import SftpTransfer

    register(SftpTransfer)
