"""Entry point of mqi-gpu (group ``mqi_framework.plugins``, name ``gpu``): registers the
``nvidia-smi`` curator."""

from __future__ import annotations

from typing import Callable

from mqi_framework import hookimpl


@hookimpl
def mqi_register_curators(register: Callable[[type], None]) -> None:
    from mqi_gpu.curator import NvidiaSmiCurator

    register(NvidiaSmiCurator)
