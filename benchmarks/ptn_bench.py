"""Decoding and analysing a beam's delivery logs (issue 16.4): a 40-layer, 20,000-spot beam
built from the spot map of a real public plan (the Eclipse SOBP plan of the mqi-moqui test
fixtures, its 24 layers repeated with shifted energies and trimmed to 20,000 spots), written
as synthetic .ptn files, then decoded and compared with the plan. Baseline, in the same run:
a per-record ``struct.unpack`` loop decoding the same files.

    python benchmarks/ptn_bench.py [--rounds 3]

Goal: decode + analysis of the beam under 1 s. Exit status 1 when it is missed.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pydicom

from mqi_moqui.delivery_analysis import Levels, PlannedLayer, analyse_beam, planned_layers
from mqi_moqui.ptn import Calibration, decode, decode_naive, write_ptn

ROOT = Path(__file__).resolve().parents[1]
SOBP = ROOT / "plugins/mqi-moqui/tests/fixtures/plans/RN.1.2.246.352.71.5.37402163639.162240.20220929101251.dcm"
CAL = Calibration(x_offset=32768, y_offset=32768, x_gain=0.01, y_gain=0.01, mu_per_nc=1.0)
GOAL_SECONDS = 1.0


def beam(layers_wanted: int = 40, spots_wanted: int = 20000) -> list[PlannedLayer]:
    ds = pydicom.dcmread(SOBP)
    meterset = float(ds.FractionGroupSequence[0].ReferencedBeamSequence[0].BeamMeterset)
    real = planned_layers(ds.IonBeamSequence[0], meterset)
    layers = [real[i % len(real)] for i in range(layers_wanted)]
    per_layer = spots_wanted // layers_wanted
    out = []
    for i, layer in enumerate(layers):
        # a real layer's spots, repeated to size; each repetition 0.7 mm further along x, so that
        # no two planned spots of a layer lie on each other
        take = np.resize(np.arange(len(layer.mu)), per_layer)
        repetition = np.arange(per_layer) // len(layer.mu)
        out.append(PlannedLayer(layer.energy - 0.5 * (i // len(real)), layer.x[take] + 0.7 * repetition,
                                layer.y[take], layer.mu[take]))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    planned = beam()
    with tempfile.TemporaryDirectory() as tmp:
        files = []
        for number, layer in enumerate(planned, 1):
            path = Path(tmp) / f"G1_X_001_001_{number:03d}.ptn"
            write_ptn(path, number, layer.x, layer.y, layer.mu, CAL, 2)
            files.append(path)
        data = [path.read_bytes() for path in files]
        fast, slow = [], []
        for _ in range(args.rounds):
            started = time.perf_counter()
            delivered = {n: decode(raw, CAL, 2, f"{n}.ptn") for n, raw in enumerate(data, 1)}
            result = analyse_beam(1, planned, delivered, Levels())
            fast.append(time.perf_counter() - started)
            started = time.perf_counter()
            for raw in data:
                decode_naive(raw, CAL, 2)
            slow.append(time.perf_counter() - started)
    spots = sum(len(layer.mu) for layer in planned)
    records = sum(len(raw) for raw in data) // 16
    print(f"beam: {len(planned)} layers, {spots} spots, {records} records ({sum(map(len, data)) / 1e6:.1f} MB)")
    print(f"numpy decode + analysis: {min(fast):.3f} s (min of {args.rounds}); level {result['level']}")
    print(f"struct.unpack loop, decode only: {min(slow):.3f} s; ratio {min(slow) / min(fast):.1f}x")
    ok = min(fast) < GOAL_SECONDS
    print(f"goal: decode + analysis < {GOAL_SECONDS:g} s: {'met' if ok else 'MISSED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
