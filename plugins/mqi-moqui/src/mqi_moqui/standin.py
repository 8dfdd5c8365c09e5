"""The Moqui engine emulator: runs anywhere, needs no GPU, behaves like upstream's ``tps_env``.

    mqi-moqui-emulator INPUT_FILE      (also: mqi-standin-tps, python -m mqi_moqui.standin)

It reads the input file with upstream Moqui's key names and defaults (moquimc,
``moqui/base/environments/mqi_tps_env.hpp``; :data:`UPSTREAM_DEFAULTS`), fails where the
engine fails, with its texts and exit codes, and writes what it writes:

* the RT Ion Plan is looked for in ``ParentDir/DicomDir`` by Modality: none is
  ``There is no RTPLAN in the path`` (an uncaught ``std::runtime_error``: exit 134);
* ``Machine`` (default ``InstitutionName:TreatmentMachineName``) must name the ``pbs`` model
  (``PBS`` or ``pbs:<beam data file>``), else ``Valid machine is not available.``;
* an existing ``OutputDir`` without ``OverwriteResults true`` is ``Output directory exists.``;
* no ``Scorer`` (upstream's default) scores nothing: no dose file, and still the success line;
* ``ParticlesPerHistory`` at its default (-1) gives one history per spot and a negative dose
  scale, as upstream;
* the dose is float64 (``save_to_bin<double>``) in ``OutputDir/<BeamName>_<index>_<Scorer>``
  (``index``: the number of beamline geometries, 0 without range shifter or aperture) as
  ``.raw`` (values only), ``.mhd`` + ``.raw`` or ``.mha`` (MetaImage, ``MET_DOUBLE``), scaled
  by ``ParticlesPerHistory * RBE * NumberOfFraction`` as upstream, computed from the
  plan's spots with a simple analytical pencil beam in water (Bragg-Kleeman range, Gaussian
  spots): it depends on the plan, but it is not a Monte Carlo dose;
* progress ``Generating particles for (i of N batches)``, success ``Time taken by MC engine:
  <n> milli-seconds``, exit 0.

A file ``STANDIN_MODE`` in the beam's log folder (or ``MQI_STANDIN_MODE``) makes it fail the
way a real run can (:data:`MODES`). ``MQI_STANDIN_SECONDS`` (default 1.0) is the run time,
``MQI_STANDIN_BATCHES`` (default 5) the number of batches. What it does not model is listed
in docs/real-moqui.md.
"""

from __future__ import annotations

import array
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

from mqi_framework.toolkit import write_atomic

#: keys upstream reads and their defaults, as in mqi_tps_env.hpp (string values)
UPSTREAM_DEFAULTS: dict[str, str] = {
    "GPUID": "0", "RandomSeed": "-1", "UseAbsolutePath": "false", "TotalThreads": "-1",
    "MaxHistoriesPerBatch": "0", "ParentDir": "", "DicomDir": "", "OutputDir": "", "OutputFormat": "raw",
    "OverwriteResults": "false", "SimulationType": "perBeam", "BeamNumbers": "", "ParticlesPerHistory": "-1",
    "SourceType": "FluenceMap", "Machine": "", "Calibration": "default", "Scorer": "", "RBE": "1.1",
    "NumberOfFraction": "-1", "ReadStructure": "false", "ScoreToCTGrid": "true",
    "logFilePath": "",  # read by the log-driven fork only (upstream ignores it)
}
MODES = {
    "ok": "a normal run",
    "fail": "prints 'ERROR: simulated failure', exit 1",
    "fatal": "prints 'FATAL ERROR ...', exit 1",
    "segv": "prints 'Segmentation fault', exit 139",
    "abort": "an uncaught std::runtime_error (terminate ... what(): ...), exit 134",
    "oom": "CUDA out of memory ('CUDA error: ... out of memory'), exit 255",
    "gpuassert": "'GPUassert: out of memory <file> <line>', exit 2",
    "writefail": "'Cannot write :<file>' and no dose, exit 0 (as upstream)",
    "hang": "never ends (prints progress now and then)",
    "lying": "success log, but exit 3 (a non-zero exit is never success)",
    "nooutput": "success log and exit 0, but no dose file",
}
MODE_FILE = "STANDIN_MODE"
#: modes that end the run half-way with this line and exit code (what a real run prints)
CRASHES = {
    "fail": ("ERROR: simulated failure", 1),
    "fatal": ("FATAL ERROR: simulated fatal error in the MC engine", 1),
    "segv": ("Segmentation fault", 139),
    "oom": ("CUDA error: cudaMalloc(&d_tracks, bytes) failed: out of memory", 255),
    "gpuassert": ("GPUassert: out of memory moqui/base/mqi_treatment_session.hpp 412", 2),
}
GRID = (24, 24, 24)  # x, y (lateral), z (depth)


class EngineAbort(Exception):
    """An uncaught std::runtime_error: upstream prints terminate/what() and aborts (exit 134)."""


def say(line: str) -> None:
    print(line, flush=True)


def read_input(path: Path) -> dict[str, str]:
    """``Key value`` lines (blank lines and ``#`` comments skipped; the first occurrence wins)."""
    values: dict[str, str] = {}
    for raw in path.read_text(encoding="utf-8", errors="replace").splitlines():
        line = raw.strip().lstrip("\ufeff")
        if not line or line.startswith("#") or line.startswith("//"):
            continue
        parts = line.split(None, 1)
        values.setdefault(parts[0], parts[1].strip() if len(parts) > 1 else "")
    return values


def _bool(value: str) -> bool:
    return value.strip().lower() in ("true", "1", "yes", "on")


def _joined(settings: dict[str, str], key: str) -> Path:
    """A path key as upstream resolves it: under ParentDir unless UseAbsolutePath."""
    value = settings[key]
    if _bool(settings["UseAbsolutePath"]):
        return Path(value)
    return Path(settings["ParentDir"] + "/" + value)


def choose_mode(log_dir: Path) -> str:
    mode_file = log_dir / MODE_FILE
    if mode_file.is_file():
        mode = mode_file.read_text(encoding="utf-8", errors="replace").strip().lower()
        if mode:
            return mode
    return (os.environ.get("MQI_STANDIN_MODE") or "ok").strip().lower()


def _number_env(name: str, default: float, kind: type = float) -> Any:
    try:
        return max(kind(0 if kind is float else 1), kind(os.environ.get(name, default)))
    except ValueError:
        return default


def _float(value: str, default: float) -> float:
    try:
        return float(value)
    except ValueError:
        return default


def _fractions(settings: dict[str, str], ds: Any) -> float:
    """NumberOfFraction; at or below 0 (upstream's default) the plan's NumberOfFractionsPlanned."""
    n = _float(settings["NumberOfFraction"], -1)
    if n > 0:
        return n
    groups = ds.get("FractionGroupSequence") or []
    return float(groups[0].get("NumberOfFractionsPlanned", 1) or 1) if groups else 1.0


def find_rtplan(dicom_dir: Path) -> Any:
    """The RT plan of ``dicom_dir`` (by Modality, as upstream scans the folder), or raise."""
    import pydicom

    if dicom_dir.is_dir():
        for path in sorted(dicom_dir.iterdir()):
            if not path.is_file():
                continue
            try:
                ds = pydicom.dcmread(str(path), stop_before_pixels=True)
            except Exception:  # noqa: BLE001 - not DICOM: upstream skips it too
                continue
            if str(ds.get("Modality", "")) == "RTPLAN":
                return ds
    raise EngineAbort("There is no RTPLAN in the path. Exiting.")


def _beam(ds: Any, number: int) -> tuple[int, Any]:
    for index, beam in enumerate(ds.get("IonBeamSequence") or []):
        if int(beam.get("BeamNumber", -1)) == number:
            return index, beam
    raise EngineAbort(f"Beam number {number} is not in the plan")


def water_range_mm(energy_mev: float) -> float:
    """CSDA range of protons in water, Bragg-Kleeman rule (R = 0.0022 E^1.77 cm)."""
    return 10.0 * 0.0022 * energy_mev ** 1.77


def pencil_beam_dose(beam: Any, histories_scale: float) -> tuple[array.array, tuple, tuple, tuple]:
    """A dose (float64 values, x fastest), its grid dims, spacing and offset (mm), from the
    beam's spots: per layer a depth curve peaking at the range, times Gaussian spots."""
    layers: list[tuple[float, list[tuple[float, float, float]]]] = []
    energy = 0.0
    for point in beam.get("IonControlPointSequence") or []:
        energy = float(point.get("NominalBeamEnergy", energy) or energy)
        weights = point.get("ScanSpotMetersetWeights")
        positions = point.get("ScanSpotPositionMap")
        if weights is None or positions is None:
            continue
        weights = [float(w) for w in (weights if hasattr(weights, "__iter__") else [weights])]
        coords = [float(v) for v in positions]
        spots = [(coords[2 * i], coords[2 * i + 1], w) for i, w in enumerate(weights) if w > 0 and 2 * i + 1 < len(coords)]
        if spots:
            layers.append((energy, spots))
    if not layers:
        raise EngineAbort("No spot with a meterset weight in the beam")
    xs = [x for _, spots in layers for x, _, _ in spots]
    ys = [y for _, spots in layers for _, y, _ in spots]
    depth = max(water_range_mm(e) for e, _ in layers) + 20.0
    nx, ny, nz = GRID
    lo_x, lo_y = min(xs) - 20.0, min(ys) - 20.0
    dx, dy, dz = (max(xs) + 20.0 - lo_x) / nx, (max(ys) + 20.0 - lo_y) / ny, depth / nz
    centres_x = [lo_x + (i + 0.5) * dx for i in range(nx)]
    centres_y = [lo_y + (j + 0.5) * dy for j in range(ny)]
    centres_z = [(k + 0.5) * dz for k in range(nz)]
    dose = [0.0] * (nx * ny * nz)
    sigma = 5.0
    for energy, spots in layers:
        reach = water_range_mm(energy)
        width = max(2.0, 0.012 * reach)
        curve = [(1.0 + 3.0 * math.exp(-((z - reach) / width) ** 2)) if z < reach else
                 4.0 * math.exp(-((z - reach) / (0.5 * width)) ** 2) for z in centres_z]
        lateral = [0.0] * (nx * ny)
        for sx, sy, w in spots:
            gx = [math.exp(-((x - sx) / sigma) ** 2 / 2) for x in centres_x]
            gy = [w * math.exp(-((y - sy) / sigma) ** 2 / 2) for y in centres_y]
            for j, vy in enumerate(gy):
                if vy < 1e-12:
                    continue
                row = j * nx
                for i, vx in enumerate(gx):
                    lateral[row + i] += vx * vy
        for k, c in enumerate(curve):
            if c < 1e-12:
                continue
            base = k * nx * ny
            for idx, v in enumerate(lateral):
                dose[base + idx] += c * v
    values = array.array("d", (v * histories_scale for v in dose))
    return values, (nx, ny, nz), (dx, dy, dz), (lo_x + dx / 2, lo_y + dy / 2, dz / 2)


def write_dose(output_dir: Path, stem: str, values: array.array, dims: tuple, spacing: tuple, offset: tuple,
               output_format: str) -> Path:
    """Write ``values`` (float64, little endian) as ``stem.raw`` and, for mhd, its header."""
    output_dir.mkdir(parents=True, exist_ok=True)
    data = array.array("d", values)
    if sys.byteorder != "little":
        data.byteswap()
    raw = output_dir / f"{stem}.raw"
    write_atomic(raw, data.tobytes())
    # upstream's headers, line for line (some lines have no "=")
    coords, steps, size = (" ".join(f"{v:g}" for v in vs) for vs in (offset, spacing, dims))
    if output_format == "mha":
        raw.unlink()
        header = "\n".join(["ObjectType = Image", "NDims = 3", "BinaryData = True", "BinaryDataByteOrderMSB = False",
                            "CompressedData = False", "TransformMatrix = 1 0 0 0 1 0 0 0 1", f"Origin = {coords}",
                            "CenterOfRotation = 0 0 0", "AnatomicOrientation = RAI", f"DimSize = {size}",
                            "ElementType = MET_DOUBLE", "HeaderSize = -1", f"ElementSpacing = {steps}",
                            "ElementDataFile = LOCAL"]) + "\n"
        write_atomic(output_dir / f"{stem}.mha", header.encode("ascii") + data.tobytes())
        return output_dir / f"{stem}.mha"
    if output_format == "mhd":
        header = "\n".join(["ObjectType = Image", "NDims = 3", "BinaryData = True", "BinaryDataByteOrderMSB = False",
                            "CompressedData = False", "TransformMatrix 1 0 0 0 1 0 0 0 1", f"Offset {coords}",
                            "CenterOfRotation 0 0 0", "AnatomicOrientation = RAI", f"DimSize = {size}",
                            "ElementType = MET_DOUBLE", f"ElementSpacing = {steps}",
                            f"ElementDataFile = {raw.name}"]) + "\n"
        write_atomic(output_dir / f"{stem}.mhd", header, encoding="ascii")
        return output_dir / f"{stem}.mhd"
    return raw


def simulate(settings: dict[str, str], mode: str) -> int:
    """One run, after the input was read; raises :class:`EngineAbort` where upstream throws."""
    if not settings["ParentDir"] and not _bool(settings["UseAbsolutePath"]):
        raise EngineAbort("ParentDir is not provided")
    dicom_dir = _joined(settings, "DicomDir")
    ds = find_rtplan(dicom_dir)
    try:
        number = int(settings["BeamNumbers"].split(",")[0])
    except ValueError:
        raise EngineAbort(f"BeamNumbers {settings['BeamNumbers']!r} is not a beam number") from None
    index, beam = _beam(ds, number)
    machine = settings["Machine"] or f"{ds.get('InstitutionName', '')}:{beam.get('TreatmentMachineName', '')}"
    if machine.split(":", 1)[0].strip().lower() != "pbs":  # upstream knows the pbs model only
        raise EngineAbort("Valid machine is not available.")
    if not settings["OutputDir"]:
        raise EngineAbort("Output directory is not provided.")
    output_dir = Path(settings["OutputDir"])
    if output_dir.exists() and not _bool(settings["OverwriteResults"]):
        raise EngineAbort("Output directory exists.")
    output_format = settings["OutputFormat"].lower()
    if output_format not in ("raw", "mhd", "mha"):
        raise EngineAbort(f"The emulator does not write OutputFormat {settings['OutputFormat']} (raw, mhd, mha)")
    try:
        per_history = float(settings["ParticlesPerHistory"])
    except ValueError:
        per_history = -1.0
    seconds = _number_env("MQI_STANDIN_SECONDS", 1.0)
    batches = _number_env("MQI_STANDIN_BATCHES", 5, int)
    say(f"MQI engine emulator (upstream keys; no GPU is used): beam {number}, GPUID {settings['GPUID']}, "
        f"machine {machine}")
    started = time.monotonic()
    if mode == "hang":
        i = 0
        while True:
            say(f"Generating particles for ({min(i, batches - 1) + 1} of {batches} batches)")
            i += 1
            time.sleep(max(0.5, min(seconds, 5.0)))
    stop_after = batches // 2 + 1 if mode in CRASHES or mode == "abort" else batches
    for i in range(1, stop_after + 1):
        say(f"Generating particles for ({i} of {batches} batches)")
        time.sleep(seconds / batches)
    if mode == "abort":
        raise EngineAbort("simulated abort in the MC engine")
    if mode in CRASHES:
        line, code = CRASHES[mode]
        say(line)
        return code
    scorer = settings["Scorer"]
    beam_name = re.sub(r"[^A-Za-z0-9_.-]", "_", str(beam.get("BeamName", "") or number))
    geometries = int(beam.get("NumberOfRangeShifters", 0) or 0) + int(beam.get("NumberOfBlocks", 0) or 0)
    stem = f"{beam_name}_{geometries}_{scorer}"
    if mode == "writefail":
        say(f"Cannot write :{output_dir / (stem + '.raw')}")
    elif scorer and mode != "nooutput":
        # ParticlesPerHistory <= 0: one history per spot and a negative scale, as upstream
        scale = (per_history if per_history > 0 else -1.0) * _float(settings["RBE"], 1.1) * _fractions(settings, ds)
        values, dims, spacing, offset = pencil_beam_dose(beam, scale * 1e-3)
        written = write_dose(output_dir, stem, values, dims, spacing, offset, output_format)
        say(f"Dose written: {written.name}")
    say(f"Time taken by MC engine: {int((time.monotonic() - started) * 1000)} milli-seconds")
    return 3 if mode == "lying" else 0


def run(input_file: Path) -> int:
    if not input_file.is_file():
        say(f"ERROR: input file not found: {input_file}")
        return 2
    try:
        settings = {**UPSTREAM_DEFAULTS, **read_input(input_file)}
    except OSError as exc:
        say(f"ERROR: cannot read input file {input_file}: {exc.strerror}")
        return 2
    mode = choose_mode(_joined(settings, "logFilePath"))
    if mode not in MODES:
        say(f"ERROR: unknown emulator mode {mode!r}; expected one of {', '.join(MODES)}")
        return 2
    try:
        return simulate(settings, mode)
    except EngineAbort as exc:
        say("terminate called after throwing an instance of 'std::runtime_error'")
        say(f"  what():  {exc}")
        return 134


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help") or len(args) != 1:
        print(__doc__.strip())
        print("\nmodes (STANDIN_MODE file or MQI_STANDIN_MODE):")
        for name, what in MODES.items():
            print(f"  {name:10} {what}")
        return 0 if args and args[0] in ("-h", "--help") else 2
    try:
        return run(Path(args[0]))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
