"""Engine profiles: which input keys each Moqui build reads, and how a case is laid out for it
(issue 14.3; docs/real-moqui.md).

``moquimc``
    Upstream MGHPhysicsResearch/moquimc (read at 4ec8185,
    ``moqui/base/environments/mqi_tps_env.hpp``): recalculates the plan. Reads ``Machine``,
    ``Scorer`` (a list), ``RBE`` and ``NumberOfFraction`` (both multiply the dose),
    ``UnitWeights``; ignores ``logFilePath`` and ``GantryNum``.
``moqui-logs``
    The log-driven fork jokh38/moqui_rev (read at 8c844e5, same file): takes spot positions and
    counts from converted machine logs under ``ParentDir/logFilePath`` (the k-th folder in
    sorted order for beam number k, one ``<layer>_<energy>MeV.csv`` per layer), the beam model
    from ``GantryNum`` (1 or 2; anything else silently 2). It reads no ``Machine``,
    ``Calibration``, ``RBE``, ``NumberOfFraction`` or ``UnitWeights``, and one ``Scorer``
    (default EnergyDeposition). With ``UseAbsolutePath true`` it never sets its log folder and
    throws "Log Dir is not provided", so paths are always relative here.

Both read the CT (and the plan) from ``ParentDir/DicomDir``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

from mqi_framework.protocols import CaseRejected

PROFILES = ("moquimc", "moqui-logs")

#: keys each profile writes, in this order (a key not listed is never written by the host)
KEYS: dict[str, tuple[str, ...]] = {
    "moquimc": ("GPUID", "RandomSeed", "UseAbsolutePath", "ParentDir", "DicomDir", "OutputDir", "OutputFormat",
                "OverwriteResults", "SimulationType", "BeamNumbers", "SourceType", "Machine", "Calibration", "Scorer",
                "ParticlesPerHistory", "MaxHistoriesPerBatch", "TotalThreads", "RBE", "NumberOfFraction"),
    "moqui-logs": ("GPUID", "RandomSeed", "UseAbsolutePath", "ParentDir", "DicomDir", "logFilePath", "GantryNum",
                   "OutputDir", "OutputFormat", "OverwriteResults", "SimulationType", "BeamNumbers", "SourceType",
                   "Scorer", "ParticlesPerHistory", "MaxHistoriesPerBatch", "TotalThreads"),
}
#: the fork's converted-log tree, relative to ParentDir (one folder per beam number)
FORK_LOGS = "fork_logs"
#: a converted layer file as the fork reads it: ``<layer>_<energy>MeV.csv``
FORK_CSV = re.compile(r"^(?P<layer>\d{1,4})_(?P<energy>\d+(?:\.\d+)?)MeV\.csv$")


def fork_field_folder(beam_number: int) -> str:
    """The folder of beam ``beam_number`` under :data:`FORK_LOGS`: zero-padded, so that the
    fork's lexicographic sort puts it at index ``beam_number - 1``."""
    return f"Field{beam_number:03d}"


def fork_csv_files(folders: list[Path], beam: int) -> dict[str, Path]:
    """The converted layer files (``<layer>_<energy>MeV.csv``) at the top of a beam's
    delivery folders; none is a rejection that says what the fork needs."""
    found: dict[str, Path] = {}
    for folder in folders:
        for path in sorted(folder.iterdir()):
            if FORK_CSV.match(path.name) and path.is_file() and not path.is_symlink():
                if path.name in found:
                    raise CaseRejected(f"beam {beam}: two of its delivery folders hold {path.name}")
                found[path.name] = path
    if not found:
        raise CaseRejected(
            f"beam {beam}: engine profile moqui-logs reads the delivery as converted logs "
            "(<layer>_<energy>MeV.csv per layer, as the fork's converter writes them) and the delivery folder "
            "has none; convert the .ptn logs with the site's converter into the delivery folder, or use "
            "engine_profile: moquimc, then retry the case")
    return found


def fork_csv_energies(names: list[str]) -> dict[int, float]:
    """Layer → energy from converted layer file names."""
    out: dict[int, float] = {}
    for name in names:
        match = FORK_CSV.match(name)
        if match:
            out[int(match["layer"])] = float(match["energy"])
    return out


def gantry_number(mapping: dict[str, int], machine: str) -> Optional[int]:
    """``GantryNum`` of a treatment machine from the site's mapping (None: not mapped)."""
    return mapping.get(machine)
