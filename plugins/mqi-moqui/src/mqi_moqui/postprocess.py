"""Post-processing of one downloaded beam: check the dose file and summarise it.

``python -m mqi_moqui.postprocess BEAM_DIR`` reads the dose written by Moqui (raw float32,
or the .raw next to an .mhd header) under ``BEAM_DIR/output`` and writes
``BEAM_DIR/output/summary.json`` (voxels, max, mean, sum). A missing, empty or non-finite
dose is an error (exit 1): a beam is never "done" without a usable result.
"""

from __future__ import annotations

import argparse
import array
import json
import math
import sys
from pathlib import Path
from typing import Optional, Sequence

from mqi_framework.toolkit import write_atomic


def summarise(dose_file: Path) -> dict:
    values = array.array("f")
    data = dose_file.read_bytes()
    if len(data) == 0 or len(data) % values.itemsize:
        raise ValueError(f"{dose_file.name}: {len(data)} bytes is not a whole number of float32 voxels")
    values.frombytes(data)
    if sys.byteorder != "little":
        values.byteswap()
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"{dose_file.name}: dose contains NaN or infinite values")
    total = math.fsum(values)
    return {"file": dose_file.name, "voxels": len(values), "max": max(values), "mean": total / len(values),
            "sum": total}


def find_dose(output_dir: Path) -> Optional[Path]:
    candidates = sorted(p for p in output_dir.glob("*.raw") if p.is_file())
    return candidates[0] if candidates else None


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mqi_moqui.postprocess", description=__doc__.splitlines()[0])
    parser.add_argument("beam_dir", type=Path, help="the downloaded beam folder (holds output/)")
    args = parser.parse_args(argv)
    output_dir = args.beam_dir / "output"
    dose = find_dose(output_dir) if output_dir.is_dir() else None
    if dose is None:
        print(f"ERROR: no dose file (*.raw) in {output_dir}", flush=True)
        return 1
    try:
        summary = summarise(dose)
    except (OSError, ValueError) as exc:
        print(f"ERROR: {exc}", flush=True)
        return 1
    target = output_dir / "summary.json"
    write_atomic(target, json.dumps(summary, indent=2))
    print(f"dose {summary['file']}: {summary['voxels']} voxels, max {summary['max']:.4g}, "
          f"mean {summary['mean']:.4g}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
