"""Entry point of mqi-slurm (group ``mqi_framework.plugins``, name ``slurm``): registers the
``slurm`` executor."""

from __future__ import annotations

from typing import Callable

from mqi_framework import hookimpl


@hookimpl
def mqi_register_executors(register: Callable[[type], None]) -> None:
    from mqi_slurm.executor import SlurmExecutor

    register(SlurmExecutor)
