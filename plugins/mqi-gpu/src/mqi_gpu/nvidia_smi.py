"""Parsing of ``nvidia-smi --query-gpu=<QUERY_FIELDS> --format=csv,noheader,nounits``.

One line per physical GPU, fields separated by ``", "``::

    0, GPU-3f8b2c1e-..., NVIDIA RTX A6000, 49140, 1, 48675, 31, 0

Values nvidia-smi cannot give are written in brackets. ``[N/A]`` and ``[Not Supported]``
mean "this board does not report it" (a GeForce card, a GPU in MIG mode has no
utilisation): the value becomes None and the GPU stays healthy. ``[Unknown Error]``,
``[GPU is lost]``, ``[GPU requires reset]`` and ``ERR!`` mean the GPU is broken: it is
reported unhealthy. Lines that are no GPU (warnings, ``MIG-`` instance lines some wrappers
print, truncated output) are skipped and listed in :attr:`SmiOutput.skipped`.
"""

from __future__ import annotations

import re
from typing import Optional

import attrs

QUERY_FIELDS = ("index", "uuid", "name", "memory.total", "memory.used", "memory.free", "temperature.gpu",
                "utilization.gpu")
QUERY_ARGS = ("--query-gpu=" + ",".join(QUERY_FIELDS), "--format=csv,noheader,nounits")

#: values meaning "not reported by this board": None, the GPU stays healthy
NOT_REPORTED = {"[n/a]", "n/a", "[not supported]", "not supported", ""}
#: values meaning "the GPU is broken"
ERROR_VALUE = re.compile(r"^\[?(unknown error|gpu is lost|gpu requires reset|err!|insufficient permissions)\]?$",
                         re.I)


@attrs.frozen
class SmiGpu:
    """One parsed GPU line. Numbers are None where nvidia-smi reported none."""

    index: int
    uuid: str
    name: str
    memory_total_mb: Optional[int]
    memory_used_mb: Optional[int]
    memory_free_mb: Optional[int]
    temperature_c: Optional[int]
    utilization_pct: Optional[int]
    errors: tuple[str, ...] = ()  # "memory.used: [GPU is lost]", ... (non-empty: unhealthy)


@attrs.frozen
class SmiOutput:
    gpus: list[SmiGpu]
    skipped: list[str] = attrs.field(factory=list)  # lines that are not a GPU, for the log


def _number(field: str, value: str, errors: list[str]) -> Optional[int]:
    text = value.strip()
    if text.lower() in NOT_REPORTED:
        return None
    if ERROR_VALUE.match(text):
        errors.append(f"{field}: {text}")
        return None
    try:
        return int(round(float(text)))
    except ValueError:
        if text.startswith("["):  # a bracketed message we do not know: treat it as an error
            errors.append(f"{field}: {text}")
        else:
            errors.append(f"{field}: unreadable value {text!r}")
        return None


def _text(field: str, value: str, errors: list[str]) -> str:
    text = value.strip()
    if ERROR_VALUE.match(text):
        errors.append(f"{field}: {text}")
        return ""
    return "" if text.lower() in NOT_REPORTED else text


def parse_line(line: str) -> Optional[SmiGpu]:
    """One GPU from one line, or None when the line is not a GPU line."""
    parts = [p.strip() for p in line.split(",")]
    if len(parts) < len(QUERY_FIELDS) or not parts[0].isdigit():
        return None
    if len(parts) > len(QUERY_FIELDS):  # a comma inside the product name
        extra = len(parts) - len(QUERY_FIELDS)
        parts = parts[:2] + [", ".join(parts[2:3 + extra])] + parts[3 + extra:]
    errors: list[str] = []
    uuid = _text("uuid", parts[1], errors)
    if uuid.startswith("MIG-"):
        return None  # a MIG instance, not a GPU: whole GPUs are scheduled
    return SmiGpu(
        index=int(parts[0]), uuid=uuid, name=_text("name", parts[2], errors),
        memory_total_mb=_number("memory.total", parts[3], errors),
        memory_used_mb=_number("memory.used", parts[4], errors),
        memory_free_mb=_number("memory.free", parts[5], errors),
        temperature_c=_number("temperature.gpu", parts[6], errors),
        utilization_pct=_number("utilization.gpu", parts[7], errors),
        errors=tuple(errors),
    )


def parse(text: str) -> SmiOutput:
    """Every GPU line of ``text``; other non-empty lines go to ``skipped``."""
    gpus: list[SmiGpu] = []
    skipped: list[str] = []
    seen: set[int] = set()
    for raw in text.splitlines():
        line = raw.strip()
        if not line:
            continue
        gpu = parse_line(line)
        if gpu is None or gpu.index in seen:
            skipped.append(line[:200])
            continue
        seen.add(gpu.index)
        gpus.append(gpu)
    return SmiOutput(gpus=gpus, skipped=skipped)
