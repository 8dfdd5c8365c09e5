"""A stand-in for Moqui's ``tps_env``: runs anywhere, needs no GPU.

    mqi-standin-tps INPUT_FILE            (or: python -m mqi_moqui.standin INPUT_FILE)

Reads the ``Key value`` input file, prints progress like a Moqui build that counts batches
(``Generating particles for (i of N batches)``), writes ``OutputDir/dose_beam<n>.raw``
(float32, little endian; plus ``.mhd`` when OutputFormat is mhd) and ends with
``Time taken by MC engine: X.XX s``, exit 0.

Environment:
  MQI_STANDIN_SECONDS   total run time in seconds (default 1.0)
  MQI_STANDIN_BATCHES   number of batches N (default 5)
  MQI_STANDIN_MODE      behaviour, unless a file STANDIN_MODE in the logFilePath folder says otherwise:
      ok        normal run (default)
      fail      prints "ERROR: simulated failure", exit 1
      fatal     prints "FATAL ERROR ...", exit 1
      segv      prints "Segmentation fault", exit 139
      hang      never ends (prints progress now and then)
      lying     success log, but exit 3 (a non-zero exit is never success)
      nooutput  success log and exit 0, but no dose file

Bad input (missing file, missing keys, DicomPath or logFilePath not found): ``ERROR: ...``, exit 2.
"""

from __future__ import annotations

import array
import math
import os
import random
import re
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from mqi_framework.toolkit import write_atomic

REQUIRED_KEYS = ("GPUID", "ParentDir", "DicomPath", "logFilePath", "BeamNumbers", "OutputDir", "OutputFormat")
MODES = ("ok", "fail", "fatal", "segv", "hang", "lying", "nooutput")
MODE_FILE = "STANDIN_MODE"
DOSE_SHAPE = (16, 16, 16)
DOSE_SPACING = (2.0, 2.0, 2.0)


def say(line: str) -> None:
    print(line, flush=True)


def read_input(path: Path) -> dict[str, str]:
    """Parse ``Key value`` lines (blank lines and ``#`` comments skipped; the first occurrence wins)."""
    values: dict[str, str] = {}
    for raw in path.read_text(encoding="utf-8", errors="replace").splitlines():
        line = raw.strip().lstrip("\ufeff")
        if not line or line.startswith("#") or line.startswith("//"):
            continue
        key, _, value = line.partition(" ")
        if "\t" in key:
            key, _, rest = key.partition("\t")
            value = f"{rest} {value}"
        values.setdefault(key.strip(), value.strip())
    return values


def choose_mode(log_dir: Path) -> str:
    mode_file = log_dir / MODE_FILE
    if mode_file.is_file():
        mode = mode_file.read_text(encoding="utf-8", errors="replace").strip().lower()
        if mode:
            return mode
    return (os.environ.get("MQI_STANDIN_MODE") or "ok").strip().lower()


def _float_env(name: str, default: float) -> float:
    try:
        return max(0.0, float(os.environ.get(name, default)))
    except ValueError:
        return default


def _int_env(name: str, default: int) -> int:
    try:
        return max(1, int(os.environ.get(name, default)))
    except ValueError:
        return default


def write_dose(output_dir: Path, beam: str, seed: int, output_format: str) -> Path:
    """Write a smooth fake dose (float32, little endian) and, for mhd, its header."""
    output_dir.mkdir(parents=True, exist_ok=True)
    safe = re.sub(r"[^A-Za-z0-9_-]", "_", beam) or "0"
    rng = random.Random(f"{seed}-{beam}")
    nx, ny, nz = DOSE_SHAPE
    cx, cy, cz = (n / 2 + rng.uniform(-1, 1) for n in DOSE_SHAPE)
    peak = rng.uniform(1.5, 2.5)
    values = array.array("f", (
        peak * math.exp(-((x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2) / 30.0)
        for z in range(nz) for y in range(ny) for x in range(nx)
    ))
    if sys.byteorder != "little":
        values.byteswap()
    raw = output_dir / f"dose_beam{safe}.raw"
    write_atomic(raw, values.tobytes())
    if output_format == "mhd":
        header = "\n".join([
            "ObjectType = Image",
            "NDims = 3",
            "BinaryData = True",
            "BinaryDataByteOrderMSB = False",
            f"DimSize = {nx} {ny} {nz}",
            "ElementSpacing = " + " ".join(str(s) for s in DOSE_SPACING),
            "Offset = 0 0 0",
            "ElementType = MET_FLOAT",
            f"ElementDataFile = {raw.name}",
        ]) + "\n"
        mhd = raw.with_suffix(".mhd")
        write_atomic(mhd, header, encoding="ascii")
    return raw


def run(input_file: Path) -> int:
    if not input_file.is_file():
        say(f"ERROR: input file not found: {input_file}")
        return 2
    try:
        values = read_input(input_file)
    except OSError as exc:
        say(f"ERROR: cannot read input file {input_file}: {exc.strerror}")
        return 2
    missing = [key for key in REQUIRED_KEYS if not values.get(key)]
    if missing:
        say(f"ERROR: input file {input_file} lacks required key(s): {', '.join(missing)}")
        return 2
    for key in ("DicomPath", "logFilePath"):
        if not Path(values[key]).exists():
            say(f"ERROR: {key} does not exist: {values[key]}")
            return 2
    mode = choose_mode(Path(values["logFilePath"]))
    if mode not in MODES:
        say(f"ERROR: unknown stand-in mode {mode!r}; expected one of {', '.join(MODES)}")
        return 2
    try:
        seed = int(values.get("RandomSeed", "1"))
    except ValueError:
        seed = 1
    beam = values["BeamNumbers"]
    seconds = _float_env("MQI_STANDIN_SECONDS", 1.0)
    batches = _int_env("MQI_STANDIN_BATCHES", 5)

    say("MQI stand-in for Moqui tps_env (no GPU is used)")
    say(f"GPUID: {values['GPUID']}")
    say(f"Beam: {beam}")
    say(f"OutputFormat: {values['OutputFormat']}")
    started = time.monotonic()

    if mode == "hang":
        i = 0
        while True:
            say(f"Generating particles for ({min(i, batches - 1) + 1} of {batches} batches)")
            i += 1
            time.sleep(max(0.5, min(seconds, 5.0)))

    step = seconds / batches
    stop_after = {"fail": batches // 2 + 1, "fatal": batches // 2 + 1, "segv": batches // 2 + 1}.get(mode, batches)
    for i in range(1, stop_after + 1):
        say(f"Generating particles for ({i} of {batches} batches)")
        time.sleep(step)
    if mode == "fail":
        say("ERROR: simulated failure")
        return 1
    if mode == "fatal":
        say("FATAL ERROR: simulated fatal error in the MC engine")
        return 1
    if mode == "segv":
        say("Segmentation fault")
        return 139
    if mode != "nooutput":
        dose = write_dose(Path(values["OutputDir"]), beam, seed, values["OutputFormat"].lower())
        say(f"Dose written: {dose.name}")
    say(f"Time taken by MC engine: {time.monotonic() - started:.2f} s")
    return 3 if mode == "lying" else 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help") or len(args) != 1:
        print(__doc__.strip())
        return 0 if args and args[0] in ("-h", "--help") else 2
    try:
        return run(Path(args[0]))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
