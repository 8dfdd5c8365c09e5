"""The Moqui engine emulator: runs anywhere, needs no GPU, behaves like upstream's ``tps_env``.

    mqi-moqui-emulator INPUT_FILE      (also: mqi-standin-tps, python -m mqi_moqui.standin)

It reads the input file with upstream Moqui's key names and defaults (moquimc,
``moqui/base/environments/mqi_tps_env.hpp``; :data:`UPSTREAM_DEFAULTS`), fails where the
engine fails, with its texts and exit codes, and writes what it writes:

* ``ParentDir/DicomDir`` is scanned by Modality as upstream does: the CT slices first (without
  a CT upstream's grid is never set, undefined behaviour: here an uncaught ``std::bad_alloc``),
  then the RT Ion Plan: none is ``There is no RTPLAN in the path`` (an uncaught
  ``std::runtime_error``: exit 134);
* ``Machine`` (default ``InstitutionName:TreatmentMachineName``) must name the ``pbs`` model
  (``PBS`` or ``pbs:<beam data file>``), else ``Valid machine is not available.``;
* an existing ``OutputDir`` without ``OverwriteResults true`` is ``Output directory exists.``;
* no ``Scorer`` (upstream's default) scores nothing: no dose file, and still the success line;
* ``ParticlesPerHistory`` at its default (-1) gives one history per spot and a negative dose
  scale, as upstream;
* the dose is float64 (``save_to_bin<double>``) in ``OutputDir/<BeamName>_<index>_<Scorer>``
  (``index``: the number of beamline geometries, 0 without range shifter or aperture) as
  ``.raw`` (values only), ``.mhd`` + ``.raw`` or ``.mha`` (MetaImage, ``MET_DOUBLE``), scaled
  by ``ParticlesPerHistory * RBE * NumberOfFraction`` as upstream, on the CT's grid (upstream
  forces ScoreToCTGrid), computed from the plan's spots with a simple analytical pencil beam
  in water (Bragg-Kleeman range, Gaussian spots, the CT's densities ignored): it depends on
  the plan and the grid, but it is not a Monte Carlo dose;
* progress ``Generating particles for (i of N batches)``, success ``Time taken by MC engine:
  <n> milli-seconds``, exit 0.

An input with ``logFilePath`` or ``GantryNum`` is run as the log-driven fork runs it
(:data:`FORK_DEFAULTS`): the spots come from ``ParentDir/logFilePath``'s folder at sorted index
``BeamNumber - 1`` (``<layer>_<energy>MeV.csv``, ``time,x,y,count`` tuples), no ``Machine`` is
needed and the dose is scaled by ``ParticlesPerHistory`` only.

A file ``STANDIN_MODE`` in the beam's log folder (``logs/`` beside the input; or
``MQI_STANDIN_MODE``) makes it fail the
way a real run can (:data:`MODES`). ``MQI_STANDIN_SECONDS`` (default 1.0) is the run time,
``MQI_STANDIN_BATCHES`` (default 5) the number of batches. What it does not model is listed
in docs/real-moqui.md.
"""

from __future__ import annotations

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
}
#: where the log-driven fork (jokh38/moqui_rev) differs: it reads the spots from converted logs
#: under logFilePath, GantryNum, one Scorer (default EnergyDeposition), and no Machine, RBE or
#: NumberOfFraction. An input with ``logFilePath`` or ``GantryNum`` is run as the fork runs it.
FORK_DEFAULTS: dict[str, str] = {
    **{k: v for k, v in UPSTREAM_DEFAULTS.items() if k not in ("Machine", "Calibration", "RBE", "NumberOfFraction")},
    "Scorer": "EnergyDeposition", "GantryNum": "2", "logFilePath": "",
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


class EngineAbort(Exception):
    """An uncaught C++ exception (``std::runtime_error`` unless ``kind`` says otherwise):
    upstream prints terminate/what() and aborts (exit 134)."""

    def __init__(self, message: str, *, kind: str = "std::runtime_error") -> None:
        super().__init__(message)
        self.kind = kind


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


def choose_mode(log_dirs: Sequence[Path]) -> str:
    """The failure mode: a ``STANDIN_MODE`` file in the first of ``log_dirs`` that has one,
    else ``MQI_STANDIN_MODE``, else ok."""
    for log_dir in log_dirs:
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


def read_dicom_dir(dicom_dir: Path) -> tuple[Any, list[Any]]:
    """The RT plan and the CT slice headers of ``dicom_dir``, by Modality, as upstream scans it
    (``read_dcm_dir``, ``mqi_ct.hpp``). Upstream loads the CT first: without one its grid sizes
    are never set (undefined behaviour; here ``std::bad_alloc``); without a plan it throws
    ``There is no RTPLAN in the path. Exiting.``"""
    import pydicom

    plan, slices = None, []
    if dicom_dir.is_dir():
        for path in sorted(dicom_dir.iterdir()):
            if not path.is_file():
                continue
            try:
                ds = pydicom.dcmread(str(path), stop_before_pixels=True)
            except Exception:  # noqa: BLE001 - not DICOM: upstream skips it too
                continue
            modality = str(ds.get("Modality", ""))
            if modality == "RTPLAN" and plan is None:
                plan = ds
            elif modality == "CT":
                slices.append(ds)
    if len(slices) < 2:
        raise EngineAbort("std::bad_alloc", kind="std::bad_alloc")
    if plan is None:
        raise EngineAbort("There is no RTPLAN in the path. Exiting.")
    return plan, slices


def ct_grid(slices: list[Any]) -> tuple[tuple[int, int, int], tuple[float, float, float], tuple[float, float, float]]:
    """The CT's grid as upstream builds it: slices sorted by z, rows/columns and pixel spacing
    from the first, the slice step from the first two (dims x, y, z; spacing; first voxel centre)."""
    ordered = sorted(slices, key=lambda ds: float(ds.ImagePositionPatient[2]))
    first = ordered[0]
    x0, y0, z0 = (float(v) for v in first.ImagePositionPatient)
    dz = float(ordered[1].ImagePositionPatient[2]) - z0
    row_spacing, column_spacing = (float(v) for v in first.PixelSpacing)
    return (int(first.Columns), int(first.Rows), len(ordered)), (column_spacing, row_spacing, dz), (x0, y0, z0)


def _beam(ds: Any, number: int) -> tuple[int, Any]:
    for index, beam in enumerate(ds.get("IonBeamSequence") or []):
        if int(beam.get("BeamNumber", -1)) == number:
            return index, beam
    raise EngineAbort(f"Beam number {number} is not in the plan")


def water_range_mm(energy_mev: float) -> float:
    """CSDA range of protons in water, Bragg-Kleeman rule (R = 0.0022 E^1.77 cm)."""
    return 10.0 * 0.0022 * energy_mev ** 1.77


def _layers(beam: Any) -> list[tuple[float, "Any"]]:
    """(energy, spots as rows of x, y, weight) of each layer with spot weight."""
    import numpy as np

    layers = []
    energy = 0.0
    for point in beam.get("IonControlPointSequence") or []:
        energy = float(point.get("NominalBeamEnergy", energy) or energy)
        weights, positions = point.get("ScanSpotMetersetWeights"), point.get("ScanSpotPositionMap")
        if weights is None or positions is None:
            continue
        w = np.atleast_1d(np.asarray(weights, dtype=float))
        xy = np.asarray(positions, dtype=float).reshape(-1, 2)[: len(w)]
        keep = w[: len(xy)] > 0
        if keep.any():
            layers.append((energy, np.column_stack([xy[keep], w[: len(xy)][keep]])))
    if not layers:
        raise EngineAbort("No spot with a meterset weight in the beam")
    return layers


def fork_layers(log_dir: Path, number: int) -> list[tuple[float, "Any"]]:
    """The delivered layers as the fork reads them: the folder at sorted index ``number - 1``
    of ``log_dir``, each ``<layer>_<energy>MeV.csv`` in name order one flat comma stream of
    ``time, x, y, count`` tuples (the count weights the spot)."""
    import numpy as np

    try:
        folders = sorted(str(p) for p in log_dir.iterdir())
    except OSError as exc:
        raise EngineAbort(f"filesystem error: directory iterator cannot open directory: {exc.strerror} [{log_dir}]",
                          kind="std::filesystem::__cxx11::filesystem_error") from None
    if len(folders) < number:
        raise EngineAbort(f"no log folder at index {number - 1} of {log_dir} (emulator: the fork reads no spots)")
    layers = []
    for path in sorted(Path(folders[number - 1]).iterdir()):
        if path.suffix != ".csv":
            continue
        energy = float(path.name.split("_", 1)[1].split("M", 1)[0])
        values = [float(v) for v in path.read_text().replace("\n", ",").split(",") if v.strip()]
        tuples = np.asarray(values[: len(values) // 4 * 4]).reshape(-1, 4)
        tuples = tuples[tuples[:, 3] > 0]
        if len(tuples):
            layers.append((energy, tuples[:, 1:4]))
    if not layers:
        raise EngineAbort(f"no spot in the log files of beam {number} (emulator)")
    return layers


def pencil_beam_dose(beam: Any, grid: tuple, histories_scale: float, spots_out: Optional[list] = None,
                     layers: Optional[list] = None) -> "Any":
    """A dose on the CT ``grid`` (float64, x fastest) from the beam's spots, in water: the beam
    enters the grid's box along the gantry direction (IEC, head-first supine), each layer a
    depth curve peaking at its Bragg-Kleeman range, each spot a Gaussian (sigma 5 mm). With
    ``spots_out`` each spot's own dose (voxel indices, values) is appended to it, for npz."""
    import numpy as np

    (nx, ny, nz), (dx, dy, dz), (x0, y0, z0) = grid
    first = (beam.get("IonControlPointSequence") or [None])[0]
    iso = np.asarray([float(v) for v in (first.get("IsocenterPosition") or (0.0, 0.0, 0.0))])
    theta = math.radians(float(first.get("GantryAngle", 0.0) or 0.0))
    direction = np.array([-math.sin(theta), math.cos(theta), 0.0])
    across = np.array([math.cos(theta), math.sin(theta), 0.0])
    low = np.array([x0 - dx / 2, y0 - dy / 2, z0 - dz / 2])
    high = low + np.array([nx * dx, ny * dy, nz * dz])
    # distance from the isocentre back to where the beam enters the box
    back = [((low if d > 0 else high)[i] - iso[i]) / -d for i, d in enumerate(direction) if abs(d) > 1e-9]
    entry = max(0.0, min(t for t in back if t >= 0) if any(t >= 0 for t in back) else 0.0)
    z, y, x = np.meshgrid(z0 + dz * np.arange(nz), y0 + dy * np.arange(ny), x0 + dx * np.arange(nx), indexing="ij")
    rel = np.stack([x - iso[0], y - iso[1], z - iso[2]], axis=-1).reshape(-1, 3)
    depth = rel @ direction + entry
    u, v = rel @ across, rel[:, 2]
    dose = np.zeros(depth.shape)
    sigma = 5.0
    for energy, spots in layers if layers is not None else _layers(beam):
        reach = water_range_mm(energy)
        width = max(2.0, 0.012 * reach)
        curve = np.where(depth < reach, 1.0 + 3.0 * np.exp(-((depth - reach) / width) ** 2),
                         4.0 * np.exp(-((depth - reach) / (0.5 * width)) ** 2))
        curve[depth < 0] = 0.0
        lit = curve > 1e-12
        lateral = np.zeros(int(lit.sum()))
        where = np.flatnonzero(lit)
        for sx, sy, w in spots:
            spot = w * np.exp(-((u[lit] - sx) ** 2 + (v[lit] - sy) ** 2) / (2 * sigma ** 2))
            lateral += spot
            if spots_out is not None:
                own = curve[lit] * spot * histories_scale
                keep = own > 1e-12 * max(float(own.max()), 1e-300)
                spots_out.append((where[keep], own[keep]))
        dose[lit] += curve[lit] * lateral
    return dose * histories_scale


def write_dose(output_dir: Path, stem: str, values: Any, dims: tuple, spacing: tuple, offset: tuple,
               output_format: str) -> Path:
    """Write ``values`` (float64, little endian, x fastest) as ``stem.raw`` and, for mhd,
    its header; for mha header and values in one file."""
    import numpy as np

    output_dir.mkdir(parents=True, exist_ok=True)
    if output_format == "npz":  # upstream's save_to_npz: spots x voxels, CSR
        spots = values
        voxels = int(np.prod(dims))
        indptr = np.cumsum([0] + [len(i) for i, _ in spots]).astype(np.uint32)
        indices = np.concatenate([i for i, _ in spots] or [np.zeros(0)]).astype(np.uint32)
        data = np.concatenate([d for _, d in spots] or [np.zeros(0)]).astype("<f8")
        target = output_dir / f"{stem}.npz"
        with open(target.with_suffix(".npz.part"), "wb") as fh:
            np.savez(fh, indices=indices, indptr=indptr, shape=np.array([len(spots), voxels], dtype=np.uint32),
                     data=data, format=np.frombuffer(b"csr", dtype="S1"))
        os.replace(target.with_suffix(".npz.part"), target)
        return target
    data = np.ascontiguousarray(values, dtype="<f8")
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


def simulate(settings: dict[str, str], mode: str, fork: bool = False) -> int:
    """One run, after the input was read; raises :class:`EngineAbort` where upstream (or,
    with ``fork``, the log-driven fork) throws."""
    if not settings["ParentDir"] and not _bool(settings["UseAbsolutePath"]):
        raise EngineAbort("ParentDir is not provided")
    if fork and _bool(settings["UseAbsolutePath"]):
        raise EngineAbort("Log Dir is not provided")  # the fork never sets it on this path
    dicom_dir = _joined(settings, "DicomDir")
    ds, slices = read_dicom_dir(dicom_dir)
    try:
        number = int(settings["BeamNumbers"].split(",")[0])
    except ValueError:
        raise EngineAbort(f"BeamNumbers {settings['BeamNumbers']!r} is not a beam number") from None
    index, beam = _beam(ds, number)
    if fork:
        machine = f"gantry {settings['GantryNum'] if settings['GantryNum'] in ('1', '2') else '2'}"
    else:
        machine = settings["Machine"] or f"{ds.get('InstitutionName', '')}:{beam.get('TreatmentMachineName', '')}"
        if machine.split(":", 1)[0].strip().lower() != "pbs":  # upstream knows the pbs model only
            raise EngineAbort("Valid machine is not available.")
    delivered = fork_layers(_joined(settings, "logFilePath"), number) if fork else None
    if not settings["OutputDir"]:
        raise EngineAbort("Output directory is not provided.")
    output_dir = Path(settings["OutputDir"])
    if output_dir.exists() and not _bool(settings["OverwriteResults"]):
        raise EngineAbort("Output directory exists.")
    output_format = settings["OutputFormat"].lower()
    if output_format not in ("raw", "mhd", "mha", "npz"):
        raise EngineAbort(f"The emulator does not write OutputFormat {settings['OutputFormat']} (raw, mhd, mha, npz)")
    try:
        per_history = float(settings["ParticlesPerHistory"])
    except ValueError:
        per_history = -1.0
    seconds = _number_env("MQI_STANDIN_SECONDS", 1.0)
    batches = _number_env("MQI_STANDIN_BATCHES", 5, int)
    say(f"MQI engine emulator ({'the log-driven fork' if fork else 'upstream'}'s keys; no GPU is used): "
        f"beam {number}, GPUID {settings['GPUID']}, "
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
        scale = per_history if per_history > 0 else -1.0
        if not fork:  # the fork scales by neither
            scale *= _float(settings["RBE"], 1.1) * _fractions(settings, ds)
        dims, spacing, offset = grid = ct_grid(slices)  # upstream scores on the CT grid (ScoreToCTGrid)
        spots: Optional[list] = [] if output_format == "npz" else None
        values = pencil_beam_dose(beam, grid, scale * 1e-3, spots, delivered)
        written = write_dose(output_dir, stem, spots if spots is not None else values, dims, spacing, offset,
                             output_format)
        say(f"Dose written: {written.name}")
    say(f"Time taken by MC engine: {int((time.monotonic() - started) * 1000)} milli-seconds")
    return 3 if mode == "lying" else 0


def run(input_file: Path) -> int:
    if not input_file.is_file():
        say(f"ERROR: input file not found: {input_file}")
        return 2
    try:
        given = read_input(input_file)
    except OSError as exc:
        say(f"ERROR: cannot read input file {input_file}: {exc.strerror}")
        return 2
    fork = "GantryNum" in given or "logFilePath" in given
    settings = {**(FORK_DEFAULTS if fork else UPSTREAM_DEFAULTS), **given}
    # the beam's staged delivery files (beams/<n>/logs beside the input), or the fork's log folder
    mode = choose_mode([input_file.parent / "logs"] + ([_joined(settings, "logFilePath")] if fork else []))
    if mode not in MODES:
        say(f"ERROR: unknown emulator mode {mode!r}; expected one of {', '.join(MODES)}")
        return 2
    try:
        return simulate(settings, mode, fork)
    except EngineAbort as exc:
        say(f"terminate called after throwing an instance of '{exc.kind}'")
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
