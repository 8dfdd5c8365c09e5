"""Checking an RT Ion Plan against itself before anything is simulated, and reading what a
physicist needs to know of it (issue 14.1).

pydicom reads sequences lazily and stops quietly at the end of a truncated file, so a plan
cut short inside ``IonBeamSequence`` still "reads". :func:`check_plan` therefore walks every
element (forcing the parse) and checks each treatment beam's control points for the
consistency the DICOM standard (PS3.3 C.8.8.25) requires: the number of control points,
their indices, non-decreasing cumulative meterset weights ending at the beam's
``FinalCumulativeMetersetWeight``, an energy on the first control point, and as many spot
weights as spot positions. Fraction groups must reference beams that exist.

Everything recorded here is free of patient data (numbers, angles, energies).
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Optional

import attrs

from mqi_framework.protocols import CaseRejected

__all__ = ["BeamSummary", "FractionGroup", "PlanSummary", "check_plan", "required_beams"]

#: tolerance of the meterset-weight comparisons (relative)
_REL = 1e-3


@attrs.frozen
class BeamSummary:
    """One beam of the plan, as checked."""

    number: int
    name: str
    treatment: bool
    radiation_type: str = ""
    scan_mode: str = ""
    machine: str = ""
    gantry_angle: Optional[float] = None
    couch_angle: Optional[float] = None
    isocenter: Optional[tuple[float, ...]] = None
    range_shifters: int = 0
    layers: int = 0
    spots: int = 0
    energies: tuple[float, ...] = ()
    final_meterset_weight: float = 0.0

    def info(self) -> dict[str, Any]:
        """The beam for the case's info (PHI-free)."""
        return {"number": self.number, "radiation_type": self.radiation_type, "scan_mode": self.scan_mode,
                "machine": self.machine, "gantry_angle": self.gantry_angle, "couch_angle": self.couch_angle,
                "isocenter": list(self.isocenter) if self.isocenter else None,
                "range_shifters": self.range_shifters, "layers": self.layers, "spots": self.spots,
                "energy_min": min(self.energies) if self.energies else None,
                "energy_max": max(self.energies) if self.energies else None}


@attrs.frozen
class FractionGroup:
    """A fraction group: its number, fractions planned and the beams it delivers (with their
    metersets, None where the plan gives none)."""

    number: int
    fractions: Optional[int]
    beams: dict[int, Optional[float]]

    def info(self) -> dict[str, Any]:
        return {"number": self.number, "fractions": self.fractions, "beams": sorted(self.beams),
                "metersets": {str(b): m for b, m in sorted(self.beams.items())}}


@attrs.frozen
class PlanSummary:
    """What :func:`check_plan` found: every beam and every fraction group."""

    beams: dict[int, BeamSummary]
    fraction_groups: list[FractionGroup]

    @property
    def treatment(self) -> dict[int, BeamSummary]:
        return {n: b for n, b in self.beams.items() if b.treatment}


def _number(value: Any, what: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise CaseRejected(f"the RT Ion Plan is inconsistent: {what} is not a number") from None
    if not math.isfinite(number):
        raise CaseRejected(f"the RT Ion Plan is inconsistent: {what} is not finite")
    return number


def _floats(value: Any) -> list[float]:
    if value is None:
        return []
    if isinstance(value, (int, float)):
        return [float(value)]
    return [float(v) for v in value]


def force_parse(ds: Any) -> None:
    """Convert every element of ``ds``, nested ones included, so that a file cut short fails
    here, with a reason, and not half-way through a simulation."""
    try:
        for _ in ds.iterall():
            pass
    except Exception as exc:  # pydicom raises a zoo of errors on a cut file
        raise CaseRejected(f"the RT Ion Plan is truncated or corrupt ({type(exc).__name__} while reading it); "
                           "export the plan again from the TPS, then retry the case") from None


def _sequence(container: Any, keyword: str, where: str) -> list:
    """The items of sequence ``keyword`` of ``container`` (empty when absent); an element of
    that name that is not a sequence of items is a malformed plan, said so."""
    value = container.get(keyword)
    if value is None:
        return []
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__") or \
            not all(hasattr(item, "get") for item in value):
        raise CaseRejected(f"the RT Ion Plan is malformed: {where}{keyword} is not a sequence of items "
                           f"({type(value).__name__}); export the plan again")
    return list(value)


def _beam(item: Any, position: int) -> BeamSummary:
    number = item.get("BeamNumber")
    if number is None:
        raise CaseRejected(f"beam {position} of the RT Ion Plan has no BeamNumber; export the plan again")
    number = int(number)
    label = f"beam {number}"
    delivery_type = str(item.get("TreatmentDeliveryType", "TREATMENT") or "TREATMENT").upper()
    treatment = delivery_type == "TREATMENT"
    common = dict(number=number, name=str(item.get("BeamName", "") or ""), treatment=treatment,
                  radiation_type=str(item.get("RadiationType", "") or "").upper(),
                  scan_mode=str(item.get("ScanMode", "") or "").upper(),
                  machine=str(item.get("TreatmentMachineName", "") or ""),
                  range_shifters=int(item.get("NumberOfRangeShifters", 0) or 0))
    if not treatment:
        return BeamSummary(**common)  # type: ignore[arg-type]

    points = _sequence(item, "IonControlPointSequence", f"{label}'s ")
    declared = item.get("NumberOfControlPoints")
    if not points:
        raise CaseRejected(f"the RT Ion Plan is inconsistent: {label} has no control points "
                           "(IonControlPointSequence); the file may be cut short: export the plan again")
    if declared is None or int(declared) != len(points):
        raise CaseRejected(f"the RT Ion Plan is inconsistent: {label} declares {declared} control points but has "
                           f"{len(points)}; the file may be cut short: export the plan again")
    if len(points) < 2:
        raise CaseRejected(f"the RT Ion Plan is inconsistent: {label} has {len(points)} control point (at least 2)")
    final = _number(item.get("FinalCumulativeMetersetWeight"), f"{label}'s FinalCumulativeMetersetWeight")
    if final <= 0:
        raise CaseRejected(f"the RT Ion Plan is inconsistent: {label} is a treatment beam with no meterset "
                           f"(FinalCumulativeMetersetWeight {final:g})")
    energy: Optional[float] = None
    previous = -math.inf
    layers, spots = 0, 0
    energies: list[float] = []
    first = points[0]
    for index, cp in enumerate(points):
        where = f"{label} control point {index}"
        if "ControlPointIndex" in cp and int(cp.ControlPointIndex) != index:
            raise CaseRejected(f"the RT Ion Plan is inconsistent: {where} has ControlPointIndex {cp.ControlPointIndex}")
        if "NominalBeamEnergy" in cp:
            energy = _number(cp.NominalBeamEnergy, f"{where}'s NominalBeamEnergy")
        if energy is None or energy <= 0:
            raise CaseRejected(f"the RT Ion Plan is inconsistent: {where} has no beam energy")
        cumulative = _number(cp.get("CumulativeMetersetWeight"), f"{where}'s CumulativeMetersetWeight")
        if cumulative < previous - _REL * final:
            raise CaseRejected(f"the RT Ion Plan is inconsistent: the cumulative meterset weight decreases at {where}")
        previous = cumulative
        weights = _floats(cp.get("ScanSpotMetersetWeights"))
        count = cp.get("NumberOfScanSpotPositions")
        if count is not None and int(count) != len(weights):
            raise CaseRejected(f"the RT Ion Plan is inconsistent: {where} has {count} spot positions but "
                               f"{len(weights)} spot weights")
        positions = _floats(cp.get("ScanSpotPositionMap"))
        if positions and len(positions) != 2 * len(weights):
            raise CaseRejected(f"the RT Ion Plan is inconsistent: {where} has {len(positions)} spot coordinates for "
                               f"{len(weights)} spots")
        if any(w < 0 or not math.isfinite(w) for w in weights):
            raise CaseRejected(f"the RT Ion Plan is inconsistent: {where} has a negative or non-finite spot weight")
        if sum(weights) > 0:
            layers += 1
            spots += sum(1 for w in weights if w > 0)
            energies.append(energy)
    if abs(previous - final) > _REL * final:
        raise CaseRejected(f"the RT Ion Plan is inconsistent: {label}'s last cumulative meterset weight is "
                           f"{previous:g}, its FinalCumulativeMetersetWeight {final:g}; the file may be cut short")
    if common["scan_mode"] in ("MODULATED", "MODULATED_SPEC") and spots == 0:
        raise CaseRejected(f"the RT Ion Plan is inconsistent: {label} is a scanned beam without any spot weight")
    iso = first.get("IsocenterPosition")
    return BeamSummary(
        **common,  # type: ignore[arg-type]
        gantry_angle=float(first.GantryAngle) if "GantryAngle" in first else None,
        couch_angle=float(first.PatientSupportAngle) if "PatientSupportAngle" in first else None,
        isocenter=tuple(float(v) for v in iso) if iso else None,
        layers=layers, spots=spots, energies=tuple(energies), final_meterset_weight=final)


def _fraction_groups(ds: Any, beams: dict[int, BeamSummary]) -> list[FractionGroup]:
    groups = []
    for position, item in enumerate(_sequence(ds, "FractionGroupSequence", ""), start=1):
        number = int(item.get("FractionGroupNumber", position) or position)
        referenced: dict[int, Optional[float]] = {}
        for ref in _sequence(item, "ReferencedBeamSequence", f"fraction group {number}'s "):
            beam = ref.get("ReferencedBeamNumber")
            if beam is None:
                raise CaseRejected(f"the RT Ion Plan is inconsistent: fraction group {number} references a beam "
                                   "without a number")
            beam = int(beam)
            if beam not in beams:
                raise CaseRejected(f"the RT Ion Plan is inconsistent: fraction group {number} references beam {beam}, "
                                   f"which the plan does not have (beams: {', '.join(map(str, sorted(beams)))})")
            if not beams[beam].treatment:
                raise CaseRejected(f"the RT Ion Plan is inconsistent: fraction group {number} delivers beam {beam}, "
                                   "which is not a treatment beam")
            meterset = ref.get("BeamMeterset")
            referenced[beam] = None if meterset is None else _number(meterset, f"beam {beam}'s BeamMeterset")
        if not referenced and any(b.treatment for b in beams.values()):  # (no treatment beam: said later)
            raise CaseRejected(f"the RT Ion Plan is inconsistent: fraction group {number} references no beam "
                               "(ReferencedBeamSequence); the file may be damaged: export the plan again")
        declared = item.get("NumberOfBeams")
        if declared is not None and int(declared) != len(referenced):
            raise CaseRejected(f"the RT Ion Plan is inconsistent: fraction group {number} declares {declared} beams "
                               f"but references {len(referenced)}")
        fractions = item.get("NumberOfFractionsPlanned")
        groups.append(FractionGroup(number, None if fractions is None else int(fractions), referenced))
    return groups


def check_plan(ds: Any, *, radiation_types: Iterable[str] = ("PROTON",),
               scan_modes: Iterable[str] = ("MODULATED",)) -> PlanSummary:
    """Check the whole plan (see the module docstring); raise :class:`CaseRejected` with the
    reason when it is truncated, inconsistent, or has a treatment beam of a radiation type or
    scan mode the engine does not simulate."""
    force_parse(ds)
    try:
        return _check_plan(ds, radiation_types, scan_modes)
    except CaseRejected:
        raise
    except (AttributeError, TypeError, ValueError, KeyError, IndexError) as exc:
        # a value of the wrong type or shape somewhere the checks above did not expect it
        raise CaseRejected(f"the RT Ion Plan is malformed ({type(exc).__name__} while checking it: a value of "
                           "the wrong type or shape); export the plan again from the TPS") from None


def _check_plan(ds: Any, radiation_types: Iterable[str], scan_modes: Iterable[str]) -> PlanSummary:
    items = _sequence(ds, "IonBeamSequence", "")
    if not items:
        raise CaseRejected("the RT Ion Plan has no IonBeamSequence (no beams); export the complete plan")
    beams: dict[int, BeamSummary] = {}
    for position, item in enumerate(items, start=1):
        beam = _beam(item, position)
        if beam.number in beams:
            raise CaseRejected(f"the RT Ion Plan lists beam number {beam.number} twice; export the plan again")
        beams[beam.number] = beam
    allowed_types, allowed_modes = {t.upper() for t in radiation_types}, {m.upper() for m in scan_modes}
    for beam in beams.values():
        if not beam.treatment:
            continue
        if beam.radiation_type not in allowed_types:
            raise CaseRejected(f"beam {beam.number} is a {beam.radiation_type or 'unstated'} beam; the engine profile "
                               f"simulates {', '.join(sorted(allowed_types))} only (radiation_types)")
        if beam.scan_mode not in allowed_modes:
            raise CaseRejected(f"beam {beam.number} uses scan mode {beam.scan_mode or '(none)'}; the engine profile "
                               f"simulates {', '.join(sorted(allowed_modes))} only (scan_modes)")
    return PlanSummary(beams=beams, fraction_groups=_fraction_groups(ds, beams))


def required_beams(plan: PlanSummary, policy: str, delivered: Iterable[int]) -> tuple[list[int], list[str]]:
    """The beams a case must simulate, and notes for the case's info.

    ``policy`` ``fraction_groups`` (default): the beams of the fraction groups of which at
    least one beam was delivered (all fraction groups while nothing is delivered), so a
    two-phase plan of which only phase 1 was delivered runs phase 1 and does not wait for
    phase 2; a plan without fraction groups needs all its treatment beams. ``treatment``:
    every treatment beam."""
    treatment = sorted(plan.treatment)
    notes: list[str] = []
    if policy == "treatment" or not plan.fraction_groups:
        if policy != "treatment":
            notes.append("the plan has no fraction group: every treatment beam is required")
        return treatment, notes
    done = set(delivered)
    groups = [g for g in plan.fraction_groups if done & set(g.beams)] or plan.fraction_groups
    needed = sorted({b for g in groups for b in g.beams})
    in_groups = {b for g in plan.fraction_groups for b in g.beams}
    other_groups = [b for b in treatment if b in in_groups and b not in needed]
    unreferenced = [b for b in treatment if b not in in_groups]
    if other_groups:
        notes.append(f"fraction group(s) {', '.join(str(g.number) for g in groups)} delivered: beam(s) "
                     f"{', '.join(map(str, other_groups))} of the other fraction group(s) not simulated")
    if unreferenced:
        notes.append(f"beam(s) {', '.join(map(str, unreferenced))} in no fraction group: not simulated")
    return needed, notes
