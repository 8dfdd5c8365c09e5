"""``core.standin`` curator: a configured list of GPUs that are always healthy and idle,
so the whole host runs (and schedules one beam per GPU) on a machine without a GPU."""

from __future__ import annotations

from typing import Optional

import attrs

from mqi_framework import hookimpl
from mqi_framework.protocols import Curator, GpuReading


@attrs.frozen
class StandinCuratorSettings:
    """Settings of the ``core.standin`` curator."""

    gpus: int = 2  # how many stand-in GPUs
    host: str = "localhost"  # host name the GPUs are reported under (``host:index``)
    name: str = "Stand-in GPU"  # model name shown for every stand-in GPU
    memory_total_mb: int = 24576  # memory each stand-in GPU reports, all of it free (MiB)


class StandinCurator(Curator):
    """Reports ``gpus`` idle stand-in GPUs on ``host``."""

    name = "core.standin"
    settings_class = StandinCuratorSettings

    def __init__(self, settings: Optional[StandinCuratorSettings], context) -> None:  # type: ignore[no-untyped-def]
        super().__init__(settings or StandinCuratorSettings(), context)

    def check(self) -> list[str]:
        return [] if self.settings.gpus >= 1 else [f"gpus must be at least 1, got {self.settings.gpus}"]

    def observe(self) -> list[GpuReading]:
        s = self.settings
        return [
            GpuReading(host=s.host, index=i, uuid=f"GPU-standin-{s.host}-{i}", name=s.name,
                       memory_total_mb=s.memory_total_mb, memory_used_mb=0, memory_free_mb=s.memory_total_mb,
                       utilization_pct=0, temperature_c=None, healthy=True)
            for i in range(max(0, s.gpus))
        ]


@hookimpl
def mqi_register_curators(register):  # type: ignore[no-untyped-def]
    register(StandinCurator)
