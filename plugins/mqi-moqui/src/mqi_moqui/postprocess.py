"""Post-processing of one downloaded beam: check the dose file and summarise it.

``python -m mqi_moqui.postprocess BEAM_DIR [--scorer Dose]`` reads the dose Moqui wrote
under ``BEAM_DIR/output`` (``<BeamName>_<index>_<Scorer>``: float64 ``.raw``, a MetaImage
``.mhd``/``.mha`` with its grid, or upstream's sparse ``.npz``; :mod:`mqi_moqui.dose`) and writes
``BEAM_DIR/output/summary.json`` (grid, voxels, max, mean, sum, voxels above zero, and
``run``: how the dose was computed, from the prepared ``BEAM_DIR/run.json``). A
missing, truncated, non-finite, negative or all-zero dose is an error (exit 1): a beam is
never "done" without a usable result.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

from mqi_framework.toolkit import write_atomic
from mqi_moqui.dose import DoseError, check_dose, find_dose, read_dose


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mqi_moqui.postprocess", description=__doc__.splitlines()[0])
    parser.add_argument("beam_dir", type=Path, help="the downloaded beam folder (holds output/)")
    parser.add_argument("--scorer", default="Dose", help="the scorer whose file is the dose (default: Dose)")
    args = parser.parse_args(argv)
    output_dir = args.beam_dir / "output"
    dose_file, others = find_dose(output_dir, args.scorer)
    if dose_file is None:
        seen = f" (found: {', '.join(others[:5])})" if others else ""
        print(f"ERROR: no {args.scorer} dose (*_{args.scorer}.mhd/.mha/.raw) in {output_dir}{seen}", flush=True)
        return 1
    try:
        dose = read_dose(dose_file)
        check_dose(dose)
    except DoseError as exc:
        print(f"ERROR: {exc}", flush=True)
        return 1
    summary = dose.summary()
    record = args.beam_dir / "run.json"
    if record.is_file() and not record.is_symlink():
        try:
            summary["run"] = json.loads(record.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            print(f"ERROR: {record.name} is not readable ({exc}); the result cannot say how it was computed",
                  flush=True)
            return 1
    write_atomic(output_dir / "summary.json", json.dumps(summary, indent=2))
    grid = "x".join(map(str, summary["dims"])) + " grid, " if "dims" in summary else ""
    print(f"dose {summary['file']}: {grid}{summary['voxels']} voxels, max {summary['max']:.4g}, "
          f"mean {summary['mean']:.4g}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
