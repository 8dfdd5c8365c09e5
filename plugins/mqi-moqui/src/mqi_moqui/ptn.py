"""Sumitomo-style scanning records (``.ptn``): decoding into delivered spots, and writing them
from spots (issue 16, first part).

There is no public ``.ptn`` sample. This module follows the format as its public descriptions
give it, and :func:`write_ptn` writes files the same way, so that tests can go plan -> log ->
decoded spots and back:

* no header; records of 8 big-endian ``uint16``: raw X, raw Y, raw X size, raw Y size, dose
  monitor 1, dose monitor 2, a word whose low 8 bits are the layer number, and a status word
  (bit 15 beam on planned, bit 14 beam on actual, bits 0-6 scan number);
* one record per sample interval (``sample_ms``; site files give 0.06 ms);
* position mm = (raw - offset) x gain, with offsets and gains from the site's calibration file
  for the room or gantry (``scv_init_G<n>.txt``-style ``KEY VALUE`` lines: XPOSOFFSET,
  YPOSOFFSET, XPOSGAIN, YPOSGAIN, ...);
* dose-monitor counts -> MU: a count is a fraction of the full scale current of the layer's
  range code (PlanRange.txt ``DOSE1_RANGE`` 1-5: 160, 470, 1400, 4200, 12600 nA over
  65535 counts), integrated over the sample interval and multiplied by the machine's
  ``mu_per_nc`` (a calibration value). This conversion is the host's model of the hardware;
  a site checks it against its own machine before trusting absolute MU.

A delivered spot is a run of consecutive samples with the actual beam on and one scan number.
Decoding is vectorised with numpy: no Python loop per sample.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional, Sequence

import attrs
import numpy as np

from mqi_framework.protocols import CaseRejected

RECORD = np.dtype(">u2")
FIELDS = 8
RECORD_BYTES = FIELDS * RECORD.itemsize
#: full-scale current (nA) of dose-monitor range codes 1-5
RANGE_FULL_SCALE_NA = {1: 160.0, 2: 470.0, 3: 1400.0, 4: 4200.0, 5: 12600.0}
COUNTS_FULL_SCALE = 65535.0
BEAM_ON_PLANNED, BEAM_ON_ACTUAL, SCAN_MASK = 1 << 15, 1 << 14, 0x7F
#: calibration keys a reader needs
CALIBRATION_KEYS = ("XPOSOFFSET", "YPOSOFFSET", "XPOSGAIN", "YPOSGAIN")


@attrs.frozen
class Calibration:
    """Offsets and gains of one gantry's position monitors, and the machine's MU per nC."""

    x_offset: float
    y_offset: float
    x_gain: float
    y_gain: float
    mu_per_nc: float = 1.0
    sample_ms: float = 0.06

    def raw_x(self, mm: np.ndarray) -> np.ndarray:
        return mm / self.x_gain + self.x_offset

    def raw_y(self, mm: np.ndarray) -> np.ndarray:
        return mm / self.y_gain + self.y_offset

    def mu_per_count(self, range_code: int) -> float:
        """MU of one dose-monitor count over one sample interval at ``range_code``."""
        if range_code not in RANGE_FULL_SCALE_NA:
            raise CaseRejected(f"dose monitor range code {range_code} is not one of 1-5")
        nanoamperes = RANGE_FULL_SCALE_NA[range_code] / COUNTS_FULL_SCALE
        return nanoamperes * self.sample_ms * 1e-3 * self.mu_per_nc  # nA x s = nC


_LINE = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*(?:[=:,]\s*|\s+)([-+0-9.eE]+)\s*$")


def read_calibration(data: bytes, what: str, *, mu_per_nc: float = 1.0, sample_ms: float = 0.06) -> Calibration:
    """A calibration file (``KEY VALUE``, ``KEY=VALUE`` or ``KEY,VALUE`` lines; BOM, CRLF,
    comments and other keys tolerated); one that lacks a needed key is a rejection naming it."""
    values: dict[str, float] = {}
    for line in data.decode("utf-8-sig", errors="replace").splitlines():
        match = _LINE.match(line.split("#", 1)[0])
        if match:
            values.setdefault(match.group(1).upper(), float(match.group(2)))
    missing = [key for key in CALIBRATION_KEYS if key not in values]
    if missing:
        raise CaseRejected(f"{what} has no {', '.join(missing)}: not a position-monitor calibration file")
    if values["XPOSGAIN"] == 0 or values["YPOSGAIN"] == 0:
        raise CaseRejected(f"{what}: a position gain of 0 is not a calibration")
    return Calibration(values["XPOSOFFSET"], values["YPOSOFFSET"], values["XPOSGAIN"], values["YPOSGAIN"],
                       mu_per_nc=values.get("MUPERNC", mu_per_nc), sample_ms=values.get("TIMEGAIN", sample_ms))


@attrs.frozen
class DeliveredLayer:
    """The spots of one layer file, in delivery order: positions (mm), MU, the time each
    started (ms from the file's start), their scan numbers; and the layer number the records
    carry."""

    layer: int
    x: np.ndarray
    y: np.ndarray
    mu: np.ndarray
    start_ms: np.ndarray
    scan: np.ndarray
    samples: int

    @property
    def spots(self) -> int:
        return len(self.mu)


def decode(data: bytes, calibration: Calibration, range_code: int, what: str) -> DeliveredLayer:
    """Decode one ``.ptn`` layer file; a truncated file, or one without any actual beam-on
    sample, is a rejection naming ``what``."""
    if len(data) % RECORD_BYTES:
        raise CaseRejected(f"{what} is {len(data)} bytes, not a whole number of {RECORD_BYTES}-byte records: the "
                           "file is truncated; export the delivery again")
    records = np.frombuffer(data, dtype=RECORD).reshape(-1, FIELDS)
    if not len(records):
        raise CaseRejected(f"{what} holds no record")
    status = records[:, 7]
    on = (status & BEAM_ON_ACTUAL) != 0
    if not on.any():
        raise CaseRejected(f"{what}: the beam is never on (no record has the actual beam-on bit)")
    scan = (status & SCAN_MASK).astype(np.int16)
    # a spot starts where the beam turns on, or where the scan number changes while it is on
    starts = on & (np.concatenate(([True], ~on[:-1])) | np.concatenate(([True], scan[1:] != scan[:-1])))
    spot_id = np.cumsum(starts) - 1
    index = np.flatnonzero(on)
    ids = spot_id[index]
    dose = records[index, 4].astype(np.float64)
    counts = np.bincount(ids, weights=dose)
    weight = np.where(counts > 0, counts, 1.0)
    n = np.bincount(ids)
    # a spot's position: the dose-weighted mean of its samples (the plain mean if it has no dose)
    raw_x = records[index, 0].astype(np.float64)
    raw_y = records[index, 1].astype(np.float64)
    mean_x = np.where(counts > 0, np.bincount(ids, weights=raw_x * dose) / weight, np.bincount(ids, weights=raw_x) / n)
    mean_y = np.where(counts > 0, np.bincount(ids, weights=raw_y * dose) / weight, np.bincount(ids, weights=raw_y) / n)
    first = np.flatnonzero(starts)
    layers = records[index, 6] & 0xFF
    return DeliveredLayer(
        layer=int(np.bincount(layers).argmax()),
        x=(mean_x - calibration.x_offset) * calibration.x_gain,
        y=(mean_y - calibration.y_offset) * calibration.y_gain,
        mu=counts * calibration.mu_per_count(range_code),
        start_ms=first * calibration.sample_ms,
        scan=scan[first],
        samples=len(records))


def decode_naive(data: bytes, calibration: Calibration, range_code: int) -> list[tuple[float, float, float]]:
    """The same spots with a ``struct.unpack`` loop per record: the benchmark's baseline."""
    import struct

    spots: list[list[float]] = []
    previous_on, previous_scan = False, -1
    scale = calibration.mu_per_count(range_code)
    for offset in range(0, len(data) - RECORD_BYTES + 1, RECORD_BYTES):
        x, y, _, _, d1, _, _, status = struct.unpack_from(">8H", data, offset)
        on, scan = bool(status & BEAM_ON_ACTUAL), status & SCAN_MASK
        if on:
            if not previous_on or scan != previous_scan:
                spots.append([0.0, 0.0, 0.0])
            spot = spots[-1]
            spot[0] += x * d1
            spot[1] += y * d1
            spot[2] += d1
        previous_on, previous_scan = on, scan
    return [((sx / c - calibration.x_offset) * calibration.x_gain, (sy / c - calibration.y_offset) * calibration.y_gain,
             c * scale) for sx, sy, c in spots if c > 0]


def write_ptn(path: Path, layer: int, x_mm: Sequence[float], y_mm: Sequence[float], mu: Sequence[float],
              calibration: Calibration, range_code: int, *, samples_per_spot: int = 8, gap_samples: int = 2,
              scan_start: int = 1, interrupt_after: Optional[int] = None) -> None:
    """Write a ``.ptn`` file delivering ``mu`` at the given spots: each spot at least
    ``samples_per_spot`` beam-on records whose integer dose counts sum to its MU, ``gap_samples`` beam-off records between
    spots. With ``interrupt_after`` the layer stops after that many spots (an interlock), having
    delivered half of the next one, and starts again from its first spot, delivering what
    remained of each spot: the duplicated spot sequence a resumed layer shows."""
    x = np.asarray(x_mm, dtype=float)
    y = np.asarray(y_mm, dtype=float)
    target = np.asarray(mu, dtype=float)
    scale = calibration.mu_per_count(range_code)
    passes: list[np.ndarray] = [target]
    if interrupt_after is not None:
        first = np.zeros_like(target)
        first[:interrupt_after] = target[:interrupt_after]
        if interrupt_after < len(target):
            first[interrupt_after] = target[interrupt_after] / 2
        passes = [first, target - first]
    rows = []
    scan = scan_start
    for number, delivered in enumerate(passes):
        # the restarted pass visits the spots already done again, with no dose: the
        # duplicated spot sequence of a resumed layer
        visit = np.arange(len(delivered)) if number else np.flatnonzero(delivered > 0)
        for i in visit:
            total = int(round(delivered[i] / scale))
            n = max(samples_per_spot if total else 1, -(-total // 60000))  # no sample beyond full scale
            per = np.full(n, total // n)
            per[: total - per.sum()] += 1  # integer counts summing exactly to the spot's MU
            block = np.zeros((n + gap_samples, FIELDS))
            block[:, 0] = np.round(calibration.raw_x(x[i]))
            block[:, 1] = np.round(calibration.raw_y(y[i]))
            block[:, 2:4] = 100
            block[:n, 4] = per
            block[:n, 5] = per
            block[:, 6] = layer & 0xFF
            block[:n, 7] = BEAM_ON_PLANNED | BEAM_ON_ACTUAL | (scan & SCAN_MASK)
            block[n:, 7] = scan & SCAN_MASK
            rows.append(block)
            scan = (scan % SCAN_MASK) + 1
    Path(path).write_bytes(np.concatenate(rows).astype(RECORD).tobytes())
