"""Which delivery folders make up each beam's delivery, and whether the delivered layers are
the plan's (issue 14.2).

A delivery folder says which layers it holds in ``PlanRange.txt`` (one row per layer:
``LAYER_NO`` counted from 1 in the beam's layer order, ``LAYER_ENERGY`` in MeV) or, without
one, in PlanInfo.txt's ``START_LAYER_NUMBER``/``STOP_LAYER_NUMBER``. Each delivered layer
must exist in the plan's beam with the plan's energy (within ``energy_tolerance`` MeV); a
mismatch holds the case with the layer, both energies and the folder's position. A beam
delivered in two sessions (an interlock, a resume) has two folders with disjoint layer
ranges: they are merged in layer order. Overlapping ranges are a rejection (which one is the
delivery?), and so are two folders for one beam whose layers are not stated. A beam whose
folders together hold only some of its layers is not delivered yet: the case waits.
"""

from __future__ import annotations

import csv
import io
from typing import Optional, Sequence

import attrs

from mqi_framework.protocols import CaseRejected

PLAN_RANGE = "PlanRange.txt"
START_KEY, STOP_KEY = "START_LAYER_NUMBER", "STOP_LAYER_NUMBER"


@attrs.frozen
class Delivery:
    """One delivery folder of a beam: its name in the case folder, its position among the
    case's delivery folders (how messages name it), and the layers it holds (1-based, None
    when it does not say) with the energies PlanRange.txt gives for them."""

    folder: str
    position: int
    layers: Optional[frozenset[int]] = None
    energies: dict[int, float] = attrs.field(factory=dict)

    @property
    def label(self) -> str:
        return f"delivery folder #{self.position}"


def parse_int(value: str) -> Optional[int]:
    """An integer written as ``3``, ``3.0`` or `` 3 ``; None for anything else."""
    try:
        return int(value.strip())
    except ValueError:
        try:
            number = float(value)
        except ValueError:
            return None
        return int(number) if number.is_integer() else None


def plan_range_table(data: bytes) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """PlanRange.txt as its upper-cased header and its rows ``(number, cells)``: BOM, CRLF and
    blank lines tolerated, cells stripped and padded to the header's width."""
    text = data.decode("utf-8-sig", errors="replace")
    rows = [row for row in csv.reader(io.StringIO(text)) if any(cell.strip() for cell in row)]
    if not rows:
        return [], []
    header = [cell.strip().upper() for cell in rows[0]]
    return header, [(line, [cell.strip() for cell in row] + [""] * len(header))
                    for line, row in enumerate(rows[1:], 2)]


def read_plan_range(data: bytes, what: str) -> dict[int, float]:
    """Layer number → energy (MeV) from PlanRange.txt's ``LAYER_NO`` and ``LAYER_ENERGY``
    columns (BOM, CRLF and blank lines tolerated); a file without those columns, with a
    value that is not a number, or naming one layer with two energies is a rejection."""
    header, rows = plan_range_table(data)
    if not header:
        return {}
    if "LAYER_NO" not in header or "LAYER_ENERGY" not in header:
        raise CaseRejected(f"{what} has no LAYER_NO and LAYER_ENERGY columns; export the delivery again")
    number_at, energy_at = header.index("LAYER_NO"), header.index("LAYER_ENERGY")
    layers: dict[int, float] = {}
    for line, cells in rows:
        layer = parse_int(cells[number_at])
        try:
            energy = float(cells[energy_at])
        except ValueError:
            energy = float("nan")
        if layer is None or layer < 1 or not energy == energy or energy <= 0:
            raise CaseRejected(f"{what} line {line}: layer {cells[number_at]!r} / energy {cells[energy_at]!r} is not "
                               "a layer number and an energy; export the delivery again")
        if layer in layers and abs(layers[layer] - energy) > 1e-6:
            raise CaseRejected(f"{what} names layer {layer} twice with different energies "
                               f"({layers[layer]:g} and {energy:g} MeV); export the delivery again")
        layers[layer] = energy
    return layers


def layers_of(folder: str, position: int, plan_info: dict[str, str], plan_range: Optional[bytes]) -> Delivery:
    """The :class:`Delivery` of one folder from its PlanInfo values and PlanRange.txt bytes."""
    label = f"delivery folder #{position}"
    if plan_range is not None:
        energies = read_plan_range(plan_range, f"{label}: {PLAN_RANGE}")
        if energies:
            return Delivery(folder, position, frozenset(energies), energies)
    start, stop = parse_int(plan_info.get(START_KEY, "")), parse_int(plan_info.get(STOP_KEY, ""))
    if start is not None and stop is not None:
        if not 1 <= start <= stop:
            raise CaseRejected(f"{label}: PlanInfo.txt's {START_KEY} {start} and {STOP_KEY} {stop} are not a layer "
                               "range; export the delivery again")
        return Delivery(folder, position, frozenset(range(start, stop + 1)))
    return Delivery(folder, position)


def _ranges(layers: Sequence[int]) -> str:
    """``1-3, 7`` for [1, 2, 3, 7]."""
    parts, ordered = [], sorted(layers)
    start = prev = ordered[0]
    for n in ordered[1:] + [None]:
        if n is not None and n == prev + 1:
            prev = n
            continue
        parts.append(f"{start}" if start == prev else f"{start}-{prev}")
        if n is not None:
            start = prev = n
    return ", ".join(parts)


def check_layers(beam: int, deliveries: Sequence[Delivery], plan_energies: Sequence[float],
                 energy_tolerance: float) -> tuple[list[Delivery], list[int], list[str]]:
    """Check and order the delivery folders of ``beam`` against its planned layer energies.

    Returns the folders in layer order, the planned layers no folder holds (the beam waits
    for them), and notes for the case's info. Raises :class:`CaseRejected` on a layer the plan
    lacks, an energy that is not the plan's, overlapping folders or unstated layers of a beam
    delivered in several folders."""
    notes: list[str] = []
    for delivery in deliveries:
        if delivery.layers is None:
            continue
        extra = sorted(n for n in delivery.layers if n > len(plan_energies))
        if extra:
            raise CaseRejected(f"{delivery.label} (beam {beam}) holds layer(s) {_ranges(extra)}, but the plan's beam "
                               f"{beam} has {len(plan_energies)} layer(s): it is not this plan's delivery")
        for layer, energy in sorted(delivery.energies.items()):
            planned = plan_energies[layer - 1]
            if abs(energy - planned) > energy_tolerance:
                raise CaseRejected(
                    f"{delivery.label} (beam {beam}): layer {layer} was delivered at {energy:g} MeV, the plan's layer "
                    f"{layer} is {planned:g} MeV (tolerance {energy_tolerance:g} MeV): the delivery does not match "
                    "the plan; check the plan version, then retry the case")
    if len(deliveries) > 1:
        unstated = [d for d in deliveries if d.layers is None]
        if unstated:
            raise CaseRejected(
                f"{len(deliveries)} delivery folders name beam {beam} "
                f"({', '.join('#' + str(d.position) for d in deliveries)} in name order) and "
                f"#{unstated[0].position} does not say which layers it holds (no PlanRange.txt or "
                f"{START_KEY}/{STOP_KEY}); remove the one that is not the delivery to check, then retry the case")
        ordered = sorted(deliveries, key=lambda d: min(d.layers or {0}))
        for i, first in enumerate(ordered):
            for second in ordered[i + 1:]:
                both = (first.layers or frozenset()) & (second.layers or frozenset())
                if both:
                    raise CaseRejected(
                        f"{first.label} and {second.label} both hold layer(s) {_ranges(sorted(both))} of beam {beam}: "
                        "a resumed delivery continues where the first stopped; remove the folder that is not part "
                        "of the delivery, then retry the case")
        notes.append(f"beam {beam}: a resumed delivery, merged from {len(ordered)} folders (layers "
                     + "; ".join(_ranges(sorted(d.layers or ())) for d in ordered) + ")")
        deliveries = ordered
    if all(d.layers is None for d in deliveries):
        notes.append(f"beam {beam}: the delivered layers are not stated (no PlanRange.txt): not checked")
        return list(deliveries), [], notes
    held = set().union(*(d.layers or frozenset() for d in deliveries))
    missing = [n for n in range(1, len(plan_energies) + 1) if n not in held]
    if missing:
        notes.append(f"beam {beam}: layer(s) {_ranges(missing)} of {len(plan_energies)} not delivered yet")
    return list(deliveries), missing, notes
