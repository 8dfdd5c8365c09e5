"""Sample case folders: a valid RT Ion Plan, delivery folders with PlanInfo.txt and machine logs.

Everything is fake and deterministic for a given ``seed`` (two calls with the same seed write
the same plan, folder names and bytes). The patient is fake too, but has an id and a name so
that de-identification can be tested: :func:`fake_patient_id` tells which.

``mqi-sample-case INBOX --cases 3`` writes three cases into INBOX.
"""

from __future__ import annotations

import argparse
import datetime as dt
import random
import sys
from pathlib import Path
from typing import Iterable, Optional, Sequence

RT_ION_PLAN_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.481.8"
READY_MARKER = "_CASE_READY"
_BASE_TIME = dt.datetime(2025, 4, 24, 1, 44, 8)
#: energy layers of each treatment beam of a sample plan (4 spots each)
SAMPLE_LAYERS = 3


def fake_patient_id(seed: int) -> str:
    """The PatientID written into the sample plan and PlanInfo.txt files of ``seed``."""
    return f"FAKEPID{seed:05d}"


def fake_patient_name(seed: int) -> str:
    return f"FAKEPATIENT^SAMPLE{seed}"


def _check_case_id(case_id: str) -> None:
    if not case_id or case_id in (".", "..") or "/" in case_id or "\0" in case_id or "\\" in case_id:
        raise ValueError(f"case id {case_id!r} must be a single folder name (no '/', not '.' or '..')")


def _plan_dataset(case_id: str, seed: int, treatment_beams: int, setup_beams: int) -> "object":
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence as DicomSequence
    from pydicom.uid import ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID, generate_uid

    def uid(*parts: object) -> str:
        return generate_uid(entropy_srcs=["mqi-moqui-sample", str(seed), *map(str, parts)])

    rng = random.Random(seed)
    sop_instance = uid("plan")
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = RT_ION_PLAN_SOP_CLASS
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID

    ds = Dataset()
    ds.file_meta = meta
    ds.preamble = b"\0" * 128
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = RT_ION_PLAN_SOP_CLASS
    ds.SOPInstanceUID = sop_instance
    ds.StudyInstanceUID = uid("study")
    ds.SeriesInstanceUID = uid("series")
    ds.FrameOfReferenceUID = uid("for")
    ds.Modality = "RTPLAN"
    ds.Manufacturer = "MQI sample generator"
    ds.PatientName = fake_patient_name(seed)
    ds.PatientID = fake_patient_id(seed)
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.OtherPatientIDs = f"FAKEOTHER{seed:05d}"
    ds.StudyDate = ds.RTPlanDate = _BASE_TIME.strftime("%Y%m%d")
    ds.StudyTime = ds.RTPlanTime = _BASE_TIME.strftime("%H%M%S")
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.RTPlanLabel = f"QA{seed}"
    ds.RTPlanName = "Sample proton plan"
    ds.RTPlanGeometry = "PATIENT"

    beams = []
    referenced = []
    total = treatment_beams + setup_beams
    for index in range(total):
        number = index + 1
        is_treatment = index < treatment_beams
        gantry = float((index * 90 + rng.choice((0, 10, 20))) % 360)
        beam = Dataset()
        beam.BeamNumber = number
        beam.BeamName = f"G{int(gantry):03d}" if is_treatment else f"SETUP{number}"
        beam.BeamType = "STATIC"
        beam.RadiationType = "PROTON"
        beam.TreatmentDeliveryType = "TREATMENT" if is_treatment else "SETUP"
        beam.TreatmentMachineName = "G1"
        beam.PrimaryDosimeterUnit = "MU"
        beam.ScanMode = "MODULATED"
        beam.NumberOfWedges = 0
        beam.NumberOfCompensators = 0
        beam.NumberOfBoli = 0
        beam.NumberOfBlocks = 0
        beam.NumberOfRangeShifters = 0
        beam.NumberOfLateralSpreadingDevices = 0
        beam.NumberOfRangeModulators = 0
        beam.PatientSupportType = "TABLE"
        beam.FinalCumulativeMetersetWeight = 1.0 if is_treatment else 0.0
        points = []
        if is_treatment:
            top = round(rng.uniform(100.0, 180.0), 1)
            spots = 4
            cumulative = 0.0
            for layer in range(SAMPLE_LAYERS):
                energy = round(top - 4.0 * layer, 1)
                for pair, weighted in enumerate((True, False)):
                    cp = Dataset()
                    cp.ControlPointIndex = len(points)
                    cp.NominalBeamEnergy = energy
                    cp.CumulativeMetersetWeight = round(cumulative, 6)
                    cp.ScanSpotTuneID = "3.0"
                    cp.NumberOfScanSpotPositions = spots
                    cp.ScanSpotPositionMap = [-10.0, -10.0, 10.0, -10.0, -10.0, 10.0, 10.0, 10.0]
                    layer_weight = 1.0 / SAMPLE_LAYERS
                    cp.ScanSpotMetersetWeights = [layer_weight / spots] * spots if weighted else [0.0] * spots
                    if weighted:
                        cumulative += layer_weight
                    cp.ScanningSpotSize = [5.0, 5.0]
                    cp.NumberOfPaintings = 1
                    if not points:
                        cp.GantryAngle = gantry
                        cp.GantryRotationDirection = "NONE"
                        cp.PatientSupportAngle = 0.0
                        cp.IsocenterPosition = [0.0, 0.0, 0.0]
                        cp.SnoutPosition = 300.0
                    points.append(cp)
            points[-1].CumulativeMetersetWeight = 1.0
            ref = Dataset()
            ref.ReferencedBeamNumber = number
            ref.BeamMeterset = round(rng.uniform(50.0, 150.0), 3)
            referenced.append(ref)
        beam.NumberOfControlPoints = len(points)
        beam.IonControlPointSequence = DicomSequence(points)
        beams.append(beam)
    ds.IonBeamSequence = DicomSequence(beams)
    fraction = Dataset()
    fraction.FractionGroupNumber = 1
    fraction.NumberOfFractionsPlanned = 30
    fraction.NumberOfBeams = treatment_beams
    fraction.NumberOfBrachyApplicationSetups = 0
    fraction.ReferencedBeamSequence = DicomSequence(referenced)
    ds.FractionGroupSequence = DicomSequence([fraction])
    return ds


def delivery_folder_name(seed: int, beam: int) -> str:
    """The timestamp-like delivery folder name of ``beam`` for ``seed`` (e.g. ``2025042401440800``)."""
    moment = _BASE_TIME + dt.timedelta(days=seed, minutes=7 * (beam - 1))
    return moment.strftime("%Y%m%d%H%M%S") + "00"


def generate_case(
    inbox: Path,
    case_id: str,
    *,
    treatment_beams: int = 3,
    setup_beams: int = 1,
    missing_beams: Iterable[int] = (),
    seed: int = 0,
    ready_marker: bool = True,
    log_bytes: int = 4096,
    ct: bool = True,
    delivery_shift: Optional[dict] = None,
) -> Path:
    """Write a sample case folder ``inbox/case_id`` and return its path.

    Beams 1..treatment_beams are treatment beams, the following ``setup_beams`` are setup
    beams; each treatment beam not in ``missing_beams`` gets a delivery folder with
    PlanInfo.txt (with START/STOP_LAYER_NUMBER), a PlanRange.txt naming each layer's energy and
    files, and per layer one ``*.ptn`` and one ``*.mgn`` file (``log_bytes`` bytes in all; random
    bytes, not a decodable log).
    ``_CASE_READY`` is written last when ``ready_marker``. ``case_id`` is only a folder name.
    The ``.ptn`` files are real logs of the plan's spots as :func:`mqi_moqui.ptn.write_ptn`
    writes them for :data:`SAMPLE_CALIBRATION` (room G1), padded to ``log_bytes`` with
    beam-off records; ``delivery_shift`` {(beam, layer): (dx, dy)} moves a layer's delivered
    spots (mm), for a delivery out of tolerance. With ``ct`` the case holds a small planning CT (a water cylinder in air, 32 x 32 x 24
    voxels of 8 mm) and an RTSTRUCT with its body contour, which the plan references.
    """
    from mqi_moqui.rtplan import save_dataset

    _check_case_id(case_id)
    if treatment_beams < 0 or setup_beams < 0:
        raise ValueError("treatment_beams and setup_beams must not be negative")
    missing = set(int(b) for b in missing_beams)
    case_dir = Path(inbox) / case_id
    case_dir.mkdir(parents=True, exist_ok=True)
    ds = _plan_dataset(case_id, seed, treatment_beams, setup_beams)
    if ct:
        write_sample_images(case_dir, ds, seed)
    save_dataset(ds, str(case_dir / f"RN{ds.SOPInstanceUID}.dcm"))  # as Eclipse/ARIA name RT Ion Plans

    rng = random.Random(f"mqi-moqui-sample-logs-{seed}")
    for beam in range(1, treatment_beams + 1):
        if beam in missing:
            continue
        folder = case_dir / delivery_folder_name(seed, beam)
        folder.mkdir(exist_ok=True)
        moment = _BASE_TIME + dt.timedelta(days=seed, minutes=7 * (beam - 1))
        lines = [
            f"DICOM_PATIENT_ID,{fake_patient_id(seed)}",
            f"DICOM_STUDY_INS_UID,{ds.StudyInstanceUID}",
            f"DICOM_BEAM_NUMBER,{beam}",
            f"DICOM_BEAM_NAME,{ds.IonBeamSequence[beam - 1].BeamName}",
            f"DICOM_RTPLAN_LABEL,{ds.RTPlanLabel}",
            f"TCSC_IRRAD_DATETIME,{moment.strftime('%Y-%m-%d %H:%M:%S')}",
            "TCSC_MACHINE,G1",
            "TCSC_COMMENT,sample delivery, generated by mqi-moqui",
        ]
        energies = _layer_energies(ds, beam)
        lines += ["START_LAYER_NUMBER,1", f"STOP_LAYER_NUMBER,{len(energies)}"]
        (folder / "PlanInfo.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
        stem = f"{moment.strftime('%Y%m%d_%H%M%S')}_beam{beam}"
        rows = [PLAN_RANGE_HEADER]
        per_layer = max(0, log_bytes) // max(1, len(energies))
        for layer, energy in enumerate(energies, 1):
            ptn, mgn = f"{stem}_{layer:03d}.ptn", f"{stem}_{layer:03d}.mgn"
            shift = (delivery_shift or {}).get((beam, layer), (0.0, 0.0))
            _write_sample_log(folder / ptn, ds, beam, layer, shift, per_layer * 3 // 4, rng)
            (folder / mgn).write_bytes(rng.randbytes(per_layer - per_layer * 3 // 4))
            rows.append(f"{seed}{beam}{layer:03d},{layer},{energy:.1f},{fake_patient_id(seed)},{beam},2,2,2,2,{ptn},{mgn}")
        (folder / "PlanRange.txt").write_text("\r\n".join(rows) + "\r\n", encoding="utf-8")
    if ready_marker:
        (case_dir / READY_MARKER).write_text("", encoding="utf-8")
    return case_dir



PLAN_RANGE_HEADER = ("RESULT_ID,LAYER_NO,LAYER_ENERGY,PATIENT_ID,FLD_NO,DOSE1_RANGE,DOSE2_RANGE,PLAN_DOSE1_RANGE,"
                     "PLAN_DOSE2_RANGE,SCAN_OUT_FL_NM,PLAN_SCAN_OUT_FL_NM")


#: the position-monitor calibration the sample logs are written with (room G1)
SAMPLE_CALIBRATION = "XPOSOFFSET 32768\nYPOSOFFSET 32768\nXPOSGAIN 0.01\nYPOSGAIN 0.01\nTIMEGAIN 0.06\n"
SAMPLE_ROOM = "G1"


def _write_sample_log(path: Path, ds: "object", beam: int, layer: int, shift: tuple, size: int,
                      rng: random.Random) -> None:
    """The layer's real log, then beam-off records (random, but never beam on) up to ``size``."""
    import numpy as np

    from mqi_moqui.delivery_analysis import planned_layers
    from mqi_moqui.delivery_check import beam_meterset
    from mqi_moqui.ptn import BEAM_ON_ACTUAL, RECORD_BYTES, read_calibration, write_ptn

    item = next(b for b in ds.IonBeamSequence if int(b.BeamNumber) == beam)
    planned = planned_layers(item, beam_meterset(ds, beam))[layer - 1]
    calibration = read_calibration(SAMPLE_CALIBRATION.encode(), "the sample calibration")
    write_ptn(path, layer, planned.x + shift[0], planned.y + shift[1], planned.mu, calibration, 2)
    pad = max(0, size - path.stat().st_size) // RECORD_BYTES
    if pad:
        records = np.frombuffer(rng.randbytes(pad * RECORD_BYTES), dtype=">u2").reshape(-1, 8).copy()
        records[:, 7] &= ~np.uint16(BEAM_ON_ACTUAL)
        with open(path, "ab") as fh:
            fh.write(records.astype(">u2").tobytes())


def _layer_energies(ds: "object", beam: int) -> list[float]:
    """The energies of the layers (control points with spot weight) of ``beam``, in order."""
    item = next(b for b in ds.IonBeamSequence if int(b.BeamNumber) == beam)
    return [float(cp.NominalBeamEnergy) for cp in item.IonControlPointSequence
            if sum(float(w) for w in cp.ScanSpotMetersetWeights) > 0]


#: the sample CT: pixels per side, slices, voxel size (mm) and the water cylinder's radius (mm)
CT_PIXELS, CT_SLICES, CT_VOXEL_MM, CT_BODY_RADIUS_MM = 32, 24, 8.0, 110.0


def write_sample_images(case_dir: Path, plan: "object", seed: int) -> None:
    """Write a planning CT series (``CT<uid>.dcm``) and an RTSTRUCT (``RS<uid>.dcm``) in the
    plan's patient, study and frame of reference, centred on the isocentre (0, 0, 0), and make
    the plan reference the structure set."""
    import math

    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence as DicomSequence
    from pydicom.uid import ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID, generate_uid

    from mqi_moqui.images import CT_IMAGE_SOP_CLASS, RT_STRUCT_SOP_CLASS
    from mqi_moqui.rtplan import save_dataset

    def uid(*parts: object) -> str:
        return generate_uid(entropy_srcs=["mqi-moqui-sample-images", str(seed), *map(str, parts)])

    def base(sop_class: str, instance: str, modality: str) -> Dataset:
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = sop_class, instance
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds = Dataset()
        ds.file_meta, ds.preamble = meta, b"\0" * 128
        ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = sop_class, instance, modality
        for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID",
                        "StudyDate", "StudyTime", "StudyID"):
            setattr(ds, keyword, getattr(plan, keyword))
        return ds

    n, step, half = CT_PIXELS, CT_VOXEL_MM, CT_VOXEL_MM * (CT_PIXELS - 1) / 2
    zs = [-CT_VOXEL_MM * (CT_SLICES - 1) / 2 + k * step for k in range(CT_SLICES)]
    hu = []
    for j in range(n):
        for i in range(n):
            inside = math.hypot(-half + i * step, -half + j * step) <= CT_BODY_RADIUS_MM
            hu.append(0 if inside else -1000)
    pixels = b"".join(v.to_bytes(2, "little", signed=True) for v in hu)
    series, frame = uid("ct-series"), plan.FrameOfReferenceUID
    ct_uids = []
    for k, z in enumerate(zs):
        instance = uid("ct", k)
        ct_uids.append(instance)
        ds = base(CT_IMAGE_SOP_CLASS, instance, "CT")
        ds.SeriesInstanceUID, ds.FrameOfReferenceUID = series, frame
        ds.SeriesNumber, ds.InstanceNumber = 2, k + 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImagePositionPatient = [-half, -half, z]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [step, step]
        ds.SliceThickness = step
        ds.Rows = ds.Columns = n
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = 0, 1
        ds.PixelData = pixels
        save_dataset(ds, str(case_dir / f"CT{instance}.dcm"))

    rs = base(RT_STRUCT_SOP_CLASS, uid("rtstruct"), "RTSTRUCT")
    rs.SeriesInstanceUID, rs.SeriesNumber = uid("rs-series"), 3
    rs.StructureSetLabel = "SAMPLE"
    rs.StructureSetDate, rs.StructureSetTime = plan.StudyDate, plan.StudyTime
    frame_item = Dataset()
    frame_item.FrameOfReferenceUID = frame
    rs.ReferencedFrameOfReferenceSequence = DicomSequence([frame_item])
    roi = Dataset()
    roi.ROINumber, roi.ReferencedFrameOfReferenceUID, roi.ROIName = 1, frame, "BODY"
    roi.ROIGenerationAlgorithm = "MANUAL"
    rs.StructureSetROISequence = DicomSequence([roi])
    contours = []
    for k, z in enumerate(zs):
        contour = Dataset()
        image = Dataset()
        image.ReferencedSOPClassUID, image.ReferencedSOPInstanceUID = CT_IMAGE_SOP_CLASS, ct_uids[k]
        contour.ContourImageSequence = DicomSequence([image])
        contour.ContourGeometricType = "CLOSED_PLANAR"
        corners = 16
        contour.NumberOfContourPoints = corners
        contour.ContourData = [round(v, 3) for a in range(corners) for v in (
            CT_BODY_RADIUS_MM * math.cos(2 * math.pi * a / corners), CT_BODY_RADIUS_MM * math.sin(2 * math.pi * a / corners), z)]
        contours.append(contour)
    roi_contour = Dataset()
    roi_contour.ReferencedROINumber, roi_contour.ROIDisplayColor = 1, [0, 255, 0]
    roi_contour.ContourSequence = DicomSequence(contours)
    rs.ROIContourSequence = DicomSequence([roi_contour])
    observation = Dataset()
    observation.ObservationNumber, observation.ReferencedROINumber = 1, 1
    observation.RTROIInterpretedType, observation.ROIInterpreter = "EXTERNAL", ""
    rs.RTROIObservationsSequence = DicomSequence([observation])
    save_dataset(rs, str(case_dir / f"RS{rs.SOPInstanceUID}.dcm"))
    reference = Dataset()
    reference.ReferencedSOPClassUID, reference.ReferencedSOPInstanceUID = RT_STRUCT_SOP_CLASS, rs.SOPInstanceUID
    plan.ReferencedStructureSetSequence = DicomSequence([reference])


def plant_identity(case_dir: Path, seed: int = 0) -> list[str]:
    """Put patient, staff and site identity into every place a real export carries it (for
    de-identification tests): the plan's top level, nested and private elements, descriptions,
    dates and UIDs; PlanInfo.txt keys of every kind, a PlanRange.txt with a PATIENT_ID column,
    and machine-log files named ``<room>_<patient id>_<plan>_<field>_<layer>.ptn``. Returns every
    identifying value written: none of them may appear in anything that leaves the host."""
    import pydicom
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence as DicomSequence

    from mqi_moqui.rtplan import save_dataset

    case_dir = Path(case_dir)
    plan_file = next(case_dir.glob("RN*.dcm"))
    ds = pydicom.dcmread(plan_file)
    tag = f"{seed:04d}"
    values = {
        "PatientName": f"Leakname^Anna{tag}", "PatientID": ds.PatientID, "AccessionNumber": f"ACCLEAK{tag}",
        "StudyID": f"STUDYLEAK{tag}", "OperatorsName": f"Operleak^Otto{tag}", "ReviewerName": f"Revleak^Rita{tag}",
        "ReferringPhysicianName": f"Refleak^Ralf{tag}", "PhysiciansOfRecord": f"Recleak^Rosa{tag}",
        "InstitutionName": f"Leakville Proton Center {tag}", "StationName": f"STATLEAK{tag}",
        "DeviceSerialNumber": f"SERIALLEAK{tag}", "RTPlanDescription": f"plan for Leakname {tag}",
        "SeriesDescription": f"series of Leakname {tag}", "StudyDescription": f"study of Leakname {tag}",
        "PatientAge": "047Y", "PatientSize": 1.8125, "PatientWeight": 77.125, "PatientSex": "F",
        "StudyDate": "20240229", "ReviewDate": "20240228",
    }
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    request = Dataset()
    request.PatientName = f"Nestleak^Nina{tag}"
    request.AccessionNumber = f"NESTACC{tag}"
    request.RequestedProcedureID = f"PROCLEAK{tag}"
    ds.RequestAttributesSequence = DicomSequence([request])
    ds.add_new(0x00110010, "LO", "LEAKY PRIVATE CREATOR")
    ds.add_new(0x00111001, "LO", f"PRIVLEAK{tag}")
    inner = Dataset()
    inner.add_new(0x00090010, "LO", "LEAKY")
    inner.add_new(0x00091001, "LO", f"PRIVSEQLEAK{tag}")
    ds.add_new(0x00111002, "SQ", DicomSequence([inner]))
    beam = ds.IonBeamSequence[0]
    beam.add_new(0x30090010, "LO", "LEAKY BEAM")
    beam.add_new(0x30091001, "LO", f"BEAMPRIVLEAK{tag}")
    setup = Dataset()
    setup.PatientSetupNumber = 1
    setup.SetupTechniqueDescription = f"setup of Leakname {tag}"
    ds.PatientSetupSequence = DicomSequence([setup])
    save_dataset(ds, str(plan_file))
    leaks = [str(v) for k, v in values.items() if k not in ("PatientSex", "PatientSize", "PatientWeight")]
    leaks += [request.AccessionNumber, str(request.PatientName), request.RequestedProcedureID, f"PRIVLEAK{tag}",
              f"PRIVSEQLEAK{tag}", f"BEAMPRIVLEAK{tag}", setup.SetupTechniqueDescription, "Leakname",
              ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID,
              str(ds.PatientName).split("^")[0], plan_file.name]

    def energies_of(beam: int) -> list[float]:
        return _layer_energies(ds, beam)

    for number, folder in enumerate(sorted(p.parent for p in case_dir.glob("*/PlanInfo.txt")), 1):
        info = folder / "PlanInfo.txt"
        extra = [f"ACTUAL_DIR,D:\\\\export\\{ds.PatientID}\\beam{number}", f"TCSC_OPERATOR,Operleak^Otto{tag}",
                 f"TCSC_COMMENT2,called Leakname {tag} at home", f"SHARE_DIR,\\\\10.1.2.3\\share\\{ds.PatientID}",
                 f"TCSC_PATIENT_NAME,Leakname^Anna{tag}"]
        info.write_text(info.read_text(encoding="utf-8").rstrip("\n") + "\n" + "\n".join(extra) + "\n",
                        encoding="utf-8")
        rows = []
        for old in sorted(folder.glob("*.ptn")) + sorted(folder.glob("*.mgn")):
            layer = int(old.stem.rsplit("_", 1)[-1])
            new = f"G1_{ds.PatientID}_001_{number:03d}_{layer:03d}{old.suffix}"
            old.rename(folder / new)
            if old.suffix == ".ptn":
                rows.append(f"R{tag}9,{layer},{energies_of(number)[layer - 1]:.1f},{ds.PatientID},{number},2,2,2,2,"
                            f"{new},{new[:-4]}.mgn")
        (folder / "PlanRange.txt").write_text("\r\n".join([PLAN_RANGE_HEADER, *rows]) + "\r\n", encoding="utf-8")
    leaks += ["10.1.2.3", "called Leakname", f"R{tag}9"]
    return sorted(set(leaks))


def delivery_dir_of(case_dir: Path, beam: int) -> Path:
    """The delivery folder of ``case_dir`` whose PlanInfo.txt names ``beam`` (for tests and tools)."""
    for planinfo in sorted(Path(case_dir).glob("*/PlanInfo.txt")):
        for line in planinfo.read_text(errors="replace").splitlines():
            key, _, value = line.partition(",")
            if key.strip().lstrip("\ufeff") == "DICOM_BEAM_NUMBER" and value.strip() == str(beam):
                return planinfo.parent
    raise FileNotFoundError(f"no delivery folder for beam {beam}")


def outputs_missing(workspace: Path, case: dict) -> list[str]:
    """What a finished case lacks in ``workspace/results``: a dose and a summary per beam.

    ``case`` is one entry of ``mqi-host cases --json``.
    """
    missing = []
    for beam in case["beams"]:
        out = Path(workspace) / "results" / case["id"] / "beams" / str(beam["number"]) / "output"
        if not list(out.glob("*_Dose.raw")):
            missing.append(f"{case['id']} beam {beam['number']}: no dose in {out}")
        if not (out / "summary.json").is_file():
            missing.append(f"{case['id']} beam {beam['number']}: no summary.json in {out}")
    return missing


def _emulator_modes() -> list[str]:
    from mqi_moqui.standin import MODES

    return list(MODES)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="mqi-sample-case",
        description="Write sample proton-therapy case folders (fake patient, valid RT Ion Plan, "
                    "delivery folders with PlanInfo.txt and machine logs) into INBOX.",
    )
    parser.add_argument("inbox", type=Path, help="folder to write the case folders into (created if missing)")
    parser.add_argument("--cases", type=int, default=1, help="how many cases (default 1)")
    parser.add_argument("--prefix", default="CASE-", help="case folder name prefix (default CASE-); names are PREFIX001, ...")
    parser.add_argument("--name", help="exact folder name of a single case (overrides --prefix; needs --cases 1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first case; case i uses SEED+i-1 (default 0)")
    parser.add_argument("--treatment-beams", type=int, default=3, help="treatment beams per case (default 3)")
    parser.add_argument("--setup-beams", type=int, default=1, help="setup beams per case (default 1)")
    parser.add_argument("--missing-beam", type=int, action="append", default=[], metavar="N",
                        help="leave out the delivery folder of treatment beam N (repeatable)")
    parser.add_argument("--no-ready-marker", action="store_true", help="do not write _CASE_READY")
    parser.add_argument("--log-bytes", type=int, default=4096, help="bytes of fake machine log per beam (default 4096)")
    parser.add_argument("--no-ct", action="store_true",
                        help="leave out the planning CT and RTSTRUCT (the host holds such a case unless phantom: water)")
    parser.add_argument("--engine-failure", metavar="MODE", choices=sorted(m for m in _emulator_modes() if m != "ok"),
                        help="make the engine emulator fail this way on every beam (a STANDIN_MODE file in each "
                             "delivery folder; staged where delivery_files names it, as in the demo's config): "
                             + ", ".join(sorted(m for m in _emulator_modes() if m != "ok")))
    args = parser.parse_args(argv)
    if args.cases < 1:
        parser.error("--cases must be at least 1")
    if args.name is not None and args.cases != 1:
        parser.error("--name writes one case; leave --cases at 1")
    for i in range(1, args.cases + 1):
        case_id = args.name if args.name is not None else f"{args.prefix}{i:03d}"
        try:
            path = generate_case(args.inbox, case_id, treatment_beams=args.treatment_beams,
                                 setup_beams=args.setup_beams, missing_beams=args.missing_beam,
                                 seed=args.seed + i - 1, ready_marker=False,
                                 log_bytes=args.log_bytes, ct=not args.no_ct)
            if args.engine_failure:
                for info in path.glob("*/PlanInfo.txt"):
                    (info.parent / "STANDIN_MODE").write_text(args.engine_failure + "\n", encoding="utf-8")
            if not args.no_ready_marker:  # last: the case is complete
                (path / READY_MARKER).write_text("", encoding="utf-8")
        except (ValueError, OSError) as exc:
            print(f"mqi-sample-case: error: {exc}", file=sys.stderr)
            return 2
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
