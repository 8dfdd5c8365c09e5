"""The planning CT series and RTSTRUCT of a case, found by content and checked against the
plan, or a water phantom built for a case that has none (issue 14.3).

Both engines compute the dose on the CT: upstream moquimc loads every ``Modality CT`` file of
``DicomDir`` (``mqi_ct.hpp``: single-slice images sorted by Image Position, grid from the first
slice's Rows, Columns and Pixel Spacing) and takes the first RTSTRUCT it finds. Without a CT
its grid sizes are never set, so a run without one is undefined behaviour, not an error
message: a case without a CT is therefore rejected here unless the site asks for the
explicit phantom mode (``phantom: water``), in which the host writes a water CT series of its
own around the plan's isocentre and the case's info says so.

What is checked, each failure a rejection naming the file: one CT series (single-frame CT
Image Storage; Enhanced CT is not read by the engines), axial slices of one size and spacing
at distinct positions, the plan's frame of reference, every treatment beam's isocentre inside
the CT, at most one RTSTRUCT and, when the plan references a structure set, that one.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional, Sequence

import attrs

from mqi_framework.protocols import CaseRejected

from mqi_moqui.rtplan import display_name, looks_like_dicom, quiet_pydicom

CT_IMAGE_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.2.1"
RT_STRUCT_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.481.3"
#: the slice orientation both engines assume (rows along +x, columns along +y)
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
_HEADER_TAGS = ["SOPClassUID", "SOPInstanceUID", "Modality", "SeriesInstanceUID", "FrameOfReferenceUID",
                "ImagePositionPatient", "ImageOrientationPatient", "Rows", "Columns", "PixelSpacing",
                "ReferencedFrameOfReferenceSequence"]
#: how far (mm) slice spacings may differ before the series is called irregular
_SPACING_TOLERANCE = 0.01


@attrs.frozen
class ImageSet:
    """The case's CT series (files in slice order) and RTSTRUCT, with the CT's grid: voxels
    (x, y, z), spacing and the centre of the first voxel (mm, patient coordinates)."""

    ct: tuple[Path, ...]
    structure: Optional[Path]
    dims: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]

    def info(self) -> dict[str, Any]:
        """For the case's info (PHI-free)."""
        return {"medium": "patient CT", "ct_slices": len(self.ct), "ct_grid": list(self.dims),
                "ct_spacing_mm": [round(v, 4) for v in self.spacing], "rtstruct": self.structure is not None}


def _header(path: Path) -> Any:
    import pydicom

    with quiet_pydicom():
        return pydicom.dcmread(str(path), stop_before_pixels=True, force=True, defer_size=4096,
                               specific_tags=_HEADER_TAGS)


def _floats(value: Any, count: int, what: str, path: Path) -> tuple[float, ...]:
    try:
        numbers = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        numbers = ()
    if len(numbers) != count or not all(math.isfinite(v) for v in numbers):
        raise CaseRejected(f"the CT slice {display_name(path.name)} has no valid {what}; export the CT series again")
    return numbers


def find_images(case_dir: Path, plan: Any, isocentres: Sequence[tuple[float, ...]]) -> Optional[ImageSet]:
    """The CT series and RTSTRUCT at the top of ``case_dir`` checked against ``plan`` (a
    pydicom dataset) and the treatment beams' ``isocentres``; None when the case has no CT."""
    slices: dict[str, list[tuple[Path, Any]]] = {}
    structures: list[tuple[Path, Any]] = []
    for entry in sorted(Path(case_dir).iterdir(), key=lambda e: e.name):
        if entry.is_symlink() or not entry.is_file() or not looks_like_dicom(entry):
            continue
        try:
            ds = _header(entry)
        except Exception:  # noqa: BLE001 - unreadable DICOM is find_plan_file's to report
            continue
        sop = str(ds.get("SOPClassUID", ""))
        if sop == ENHANCED_CT_SOP_CLASS:
            raise CaseRejected(f"{display_name(entry.name)} is a multi-frame Enhanced CT; Moqui reads single-slice CT "
                               "images (CT Image Storage): export the planning CT as single slices")
        if sop == CT_IMAGE_SOP_CLASS:
            slices.setdefault(str(ds.get("SeriesInstanceUID", "")), []).append((entry, ds))
        elif sop == RT_STRUCT_SOP_CLASS:
            structures.append((entry, ds))
    if len(structures) > 1:
        raise CaseRejected(f"{len(structures)} RTSTRUCTs in the case folder; the engine would take whichever it "
                           "finds first: keep only the plan's structure set, then retry the case")
    if not slices:
        if structures:
            raise CaseRejected(f"the case has an RTSTRUCT ({display_name(structures[0][0].name)}) but no CT series; "
                               "add the planning CT, then retry the case")
        return None
    if len(slices) > 1:
        raise CaseRejected(f"{len(slices)} CT series in the case folder; keep only the planning CT of the plan, "
                           "then retry the case")
    series = next(iter(slices.values()))
    image_set = _check_series(series)
    frame = str(plan.get("FrameOfReferenceUID", "") or "")
    ct_frame = str(series[0][1].get("FrameOfReferenceUID", "") or "")
    if frame and ct_frame != frame:
        raise CaseRejected("the CT series is not in the plan's frame of reference (FrameOfReferenceUID differs): it is "
                           "another planning CT; put the plan's CT in the case, then retry it")
    structure = structures[0] if structures else None
    if structure is not None:
        _check_structure(structure, ct_frame, plan)
    _check_isocentres(image_set, isocentres)
    return attrs.evolve(image_set, structure=structure[0] if structure else None)


def _check_series(series: list[tuple[Path, Any]]) -> ImageSet:
    if len(series) < 2:
        raise CaseRejected("the CT series has a single slice; export the whole planning CT, then retry the case")
    placed = []
    first_path, first = series[0]
    rows, columns = first.get("Rows"), first.get("Columns")
    spacing = _floats(first.get("PixelSpacing"), 2, "Pixel Spacing", first_path)
    for path, ds in series:
        if _floats(ds.get("ImageOrientationPatient"), 6, "Image Orientation", path) != AXIAL:
            raise CaseRejected(f"the CT slice {display_name(path.name)} is not an axial head-first slice (Image "
                               "Orientation 1\\0\\0\\0\\1\\0), which the engines assume; export the CT again")
        if ds.get("Rows") != rows or ds.get("Columns") != columns or \
                _floats(ds.get("PixelSpacing"), 2, "Pixel Spacing", path) != spacing:
            raise CaseRejected(f"the CT slice {display_name(path.name)} differs in size or pixel spacing from the other "
                               "slices of the series; export the planning CT again")
        placed.append((_floats(ds.get("ImagePositionPatient"), 3, "Image Position", path), path))
    placed.sort(key=lambda item: item[0][2])
    zs = [position[2] for position, _ in placed]
    steps = [b - a for a, b in zip(zs, zs[1:])]
    if min(steps) <= 0:
        raise CaseRejected("two CT slices lie at the same position; the series holds a duplicate: export it again")
    if max(steps) - min(steps) > _SPACING_TOLERANCE:
        raise CaseRejected(f"the CT slices are unevenly spaced ({min(steps):g} to {max(steps):g} mm); the engines "
                           "need one slice spacing: export the CT again (or resample it in the TPS)")
    if not rows or not columns:
        raise CaseRejected(f"the CT slice {display_name(first_path.name)} has no Rows/Columns")
    x0, y0, _ = placed[0][0]
    # PixelSpacing is row spacing (y) then column spacing (x)
    return ImageSet(ct=tuple(path for _, path in placed), structure=None, dims=(int(columns), int(rows), len(placed)),
                    spacing=(spacing[1], spacing[0], steps[0]), origin=(x0, y0, zs[0]))


def _check_structure(structure: tuple[Path, Any], ct_frame: str, plan: Any) -> None:
    path, ds = structure
    frames = [str(item.get("FrameOfReferenceUID", "")) for item in ds.get("ReferencedFrameOfReferenceSequence") or []]
    if frames and ct_frame and ct_frame not in frames:
        raise CaseRejected(f"the RTSTRUCT {display_name(path.name)} is not drawn on this CT (another frame of "
                           "reference); put the plan's structure set in the case, then retry it")
    referenced = [str(item.get("ReferencedSOPInstanceUID", ""))
                  for item in plan.get("ReferencedStructureSetSequence") or []]
    if referenced and str(ds.get("SOPInstanceUID", "")) not in referenced:
        raise CaseRejected(f"the RTSTRUCT {display_name(path.name)} is not the structure set the plan references "
                           "(ReferencedStructureSetSequence); put the plan's one in the case, then retry it")


def _check_isocentres(images: ImageSet, isocentres: Sequence[tuple[float, ...]]) -> None:
    for number, iso in enumerate(isocentres, 1):
        for axis, (value, start, step, count) in enumerate(zip(iso, images.origin, images.spacing, images.dims)):
            low, high = start - step / 2, start + step * (count - 0.5)
            if not low <= value <= high:
                raise CaseRejected(
                    f"a treatment beam's isocentre lies outside the CT ({'xyz'[axis]} = {value:g} mm, the CT spans "
                    f"{low:g} to {high:g} mm); the CT is not this plan's: put the planning CT in the case")


# ------------------------------------------------------------------------------ water phantom


@attrs.frozen
class Phantom:
    """A water cube centred on the isocentre: side (mm) and voxel size (mm)."""

    size_mm: float
    voxel_mm: float

    @property
    def voxels(self) -> int:
        return max(2, int(round(self.size_mm / self.voxel_mm)))

    def info(self) -> dict[str, Any]:
        return {"medium": "water phantom", "phantom_size_mm": self.size_mm, "phantom_voxel_mm": self.voxel_mm,
                "ct_grid": [self.voxels] * 3}


def phantom_series(plan: Any, phantom: Phantom, centre: Sequence[float]) -> list[Any]:
    """The slices (pydicom datasets, HU 0) of a water phantom CT around ``centre`` in the
    frame of reference of ``plan`` (already de-identified when it is uploaded): its patient
    and study, a new series. Written by the host, so it carries no identity of its own."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID, generate_uid

    n, step = phantom.voxels, phantom.voxel_mm
    start = [float(c) - step * (n - 1) / 2 for c in centre]
    series_uid = generate_uid(entropy_srcs=["mqi-phantom", str(plan.get("SOPInstanceUID", "")), str(n), str(step)])
    pixels = bytes(2 * n * n)  # int16 zeros: water (HU 0, rescale 1/0)
    slices = []
    for k in range(n):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CT_IMAGE_SOP_CLASS
        meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[series_uid, str(k)])
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds = Dataset()
        ds.file_meta = meta
        ds.preamble = b"\0" * 128
        ds.SOPClassUID = CT_IMAGE_SOP_CLASS
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.Modality = "CT"
        for keyword in ("PatientName", "PatientID", "StudyInstanceUID", "FrameOfReferenceUID",
                        "PatientIdentityRemoved"):
            if keyword in plan:
                setattr(ds, keyword, plan.get(keyword))
        ds.SeriesInstanceUID = series_uid
        ds.SeriesDescription = "MQI water phantom"
        ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [start[0], start[1], start[2] + k * step]
        ds.ImageOrientationPatient = list(AXIAL)
        ds.PixelSpacing = [step, step]
        ds.SliceThickness = step
        ds.Rows = ds.Columns = n
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = 0, 1
        ds.PixelData = pixels
        slices.append(ds)
    return slices
