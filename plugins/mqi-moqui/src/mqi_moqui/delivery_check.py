"""The delivery analysis of a case, as the ``moqui`` interpreter runs it before anything is
simulated (issue 16.2): each delivered beam's ``.ptn`` layer files, named by its PlanRange.txt
(``LAYER_NO``, ``DOSE1_RANGE``, ``SCAN_OUT_FL_NM``), decoded with the calibration of the
treatment room PlanInfo.txt names (``TCSC_MACHINE``) and compared with the plan's layers.
Enabled by the interpreter's ``delivery_calibrations`` setting; the result per beam goes into
the case's info (without the per-spot lists) and its flags into the case's notes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from mqi_framework.protocols import CaseRejected

from mqi_moqui.deliveries import parse_int, plan_range_table
from mqi_moqui.delivery_analysis import Levels, analyse_beam, planned_layers
from mqi_moqui.ptn import Calibration, DeliveredLayer, decode, read_calibration

ROOM_KEY = "TCSC_MACHINE"
#: per-spot lists stay in the full result, out of the case's info
_PER_SPOT = ("position_errors_mm", "spot_mu_diff_pct")


def layer_files(plan_range: bytes, what: str) -> dict[int, tuple[str, int]]:
    """Layer number -> (``.ptn`` file name, dose range code) from PlanRange.txt."""
    header, rows = plan_range_table(plan_range)
    if not header:
        return {}
    for column in ("LAYER_NO", "DOSE1_RANGE", "SCAN_OUT_FL_NM"):
        if column not in header:
            raise CaseRejected(f"{what} has no {column} column: the layers' log files cannot be found")
    at = {c: header.index(c) for c in ("LAYER_NO", "DOSE1_RANGE", "SCAN_OUT_FL_NM")}
    out: dict[int, tuple[str, int]] = {}
    for line, cells in rows:
        layer, code = parse_int(cells[at["LAYER_NO"]]), parse_int(cells[at["DOSE1_RANGE"]])
        if layer is None or code is None:
            raise CaseRejected(f"{what} line {line}: layer or range code is not a number")
        out[layer] = (cells[at["SCAN_OUT_FL_NM"]], code)
    return out


def beam_meterset(ds: Any, beam_number: int) -> Optional[float]:
    for group in ds.get("FractionGroupSequence") or []:
        for ref in group.get("ReferencedBeamSequence") or []:
            if int(ref.get("ReferencedBeamNumber", -1)) == beam_number and ref.get("BeamMeterset") is not None:
                return float(ref.BeamMeterset)
    return None


def load_calibrations(paths: dict[str, str], base: Optional[Path]) -> dict[str, Calibration]:
    """Each room's calibration file (relative paths from ``base``, the config's folder)."""
    out = {}
    for room, name in paths.items():
        path = Path(name) if base is None or Path(name).is_absolute() else base / name
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise CaseRejected(f"the delivery calibration of room {room} ({path}) cannot be read: {exc.strerror}; "
                               "fix delivery_calibrations in the prepare worker's settings") from None
        out[room] = read_calibration(data, f"the delivery calibration of room {room}")
    return out


def check_beam(ds: Any, beam_number: int, folders: list[Path], plan_info: dict[str, str],
               calibrations: dict[str, Calibration], levels: Levels, label: str) -> dict[str, Any]:
    """The delivery analysis of one beam from its delivery folders (in layer order)."""
    room = plan_info.get(ROOM_KEY, "").strip()
    if room not in calibrations:
        raise CaseRejected(f"{label} (beam {beam_number}) was delivered in room {room or '(PlanInfo.txt names none)'}, "
                           f"which has no calibration (delivery_calibrations: {', '.join(sorted(calibrations))})")
    calibration = calibrations[room]
    delivered: dict[int, DeliveredLayer] = {}
    for folder in folders:
        range_file = folder / "PlanRange.txt"
        if not range_file.is_file():
            raise CaseRejected(f"{label} (beam {beam_number}) has no PlanRange.txt: its log files cannot be found")
        for layer, (name, code) in layer_files(range_file.read_bytes(), f"{label}: PlanRange.txt").items():
            path = folder / name
            if Path(name).name != name or not path.is_file() or path.is_symlink():
                raise CaseRejected(f"{label} (beam {beam_number}): the log file of layer {layer} named by "
                                   "PlanRange.txt is not in the delivery folder; export the delivery again")
            delivered[layer] = decode(path.read_bytes(), calibration, code, f"{label}: the log of layer {layer}")
    beam = next(b for b in ds.IonBeamSequence if int(b.BeamNumber) == beam_number)
    meterset = beam_meterset(ds, beam_number)
    return analyse_beam(beam_number, planned_layers(beam, meterset), delivered, levels, meterset)


def for_case_info(result: dict[str, Any]) -> dict[str, Any]:
    """The result without its per-spot lists, for the case's info."""
    return {**result, "layers": [{k: v for k, v in layer.items() if k not in _PER_SPOT} for layer in result["layers"]]}
