"""Entry point of mqi-ssh (group ``mqi_framework.plugins``, name ``ssh``): registers the
``ssh`` executor."""

from __future__ import annotations

from typing import Callable

from mqi_framework import hookimpl


@hookimpl
def mqi_register_executors(register: Callable[[type], None]) -> None:
    from mqi_ssh.executor import SshExecutor

    register(SshExecutor)
