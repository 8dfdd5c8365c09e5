"""De-identification to the PS3.15 Basic Profile (issue 15.1): a plan and delivery folders
carrying identity in every place a real export does; every staged byte is searched."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pydicom
import pytest

from mqi_framework.protocols import PluginContext
from mqi_moqui.deid import Pseudonymizer, deidentify_dataset, deidentify_plan_range, delivery_file_name
from mqi_moqui.interpreter import MoquiInterpreter, MoquiSettings
from mqi_moqui.samples import generate_case, plant_identity

FIXTURES = Path(__file__).parent / "fixtures" / "plans"
REMOTE = "/remote/case-000001"


def staged_bytes(root: Path) -> dict[str, bytes]:
    """Every staged file's name and content (names are uploaded too)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def workspace_interpreter(tmp_path) -> MoquiInterpreter:
    return MoquiInterpreter(MoquiSettings(), PluginContext(workspace=tmp_path / "ws"))


def prepare(interpreter: MoquiInterpreter, case: Path, staging: Path) -> None:
    interpreter.prepare(case, interpreter.interpret(case), staging, REMOTE)


def test_no_identifier_from_any_place_is_staged(inbox, tmp_path, workspace_interpreter):
    case = generate_case(inbox, "IDENTITY", seed=11)
    leaks = plant_identity(case, seed=11)
    assert len(leaks) > 30
    original = case.joinpath(next(case.glob("RN*.dcm")).name).read_bytes()
    assert all(leak.encode() in original for leak in ("PRIVLEAK0011", "NESTACC0011", "BEAMPRIVLEAK0011"))
    staging = tmp_path / "staging" / "case-000001"
    prepare(workspace_interpreter, case, staging)
    files = staged_bytes(staging)
    for rel, data in files.items():
        for leak in leaks:
            assert leak.encode() not in data, f"{leak!r} in {rel}"
            assert leak not in rel, f"{leak!r} in the file name {rel}"
    assert all("/logs/" not in rel or Path(rel).name in ("PlanInfo.txt", "PlanRange.txt")
               or Path(rel).name.startswith("G1_MQI") for rel in files)


def test_the_plan_is_deidentified_to_the_basic_profile(inbox, tmp_path, workspace_interpreter):
    case = generate_case(inbox, "PROFILE", seed=12)
    plant_identity(case, seed=12)
    before = pydicom.dcmread(next(case.glob("RN*.dcm")))
    staging = tmp_path / "staging" / "case-000002"
    prepare(workspace_interpreter, case, staging)
    ds = pydicom.dcmread(staging / "dicom" / "RTPLAN.dcm")
    assert ds.PatientIdentityRemoved == "YES" and ds.LongitudinalTemporalInformationModified == "REMOVED"
    assert ds.DeidentificationMethodCodeSequence[0].CodeValue == "113100"
    assert not [e for e in ds.iterall() if e.tag.is_private]
    assert "RequestAttributesSequence" not in ds and "OperatorsName" not in ds and "InstitutionName" not in ds
    assert ds.StudyID == "" and ds.AccessionNumber == "" and ds.PatientSex == "" and "PatientAge" not in ds
    assert all(e.value in ("", None) for e in ds.iterall() if e.VR in ("DA", "TM", "DT"))
    for keyword in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID"):
        assert ds[keyword].value.startswith("2.25.") and ds[keyword].value != before[keyword].value
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert ds.SOPClassUID == before.SOPClassUID  # DICOM-defined UIDs stay
    # what the engine reads is untouched
    for a, b in zip(before.IonBeamSequence, ds.IonBeamSequence):
        assert (a.BeamNumber, a.BeamName, a.TreatmentMachineName) == (b.BeamNumber, b.BeamName, b.TreatmentMachineName)
        for cp_a, cp_b in zip(a.IonControlPointSequence, b.IonControlPointSequence):
            assert cp_a.ScanSpotMetersetWeights == cp_b.ScanSpotMetersetWeights
            assert cp_a.NominalBeamEnergy == cp_b.NominalBeamEnergy
    assert ds.FractionGroupSequence[0].ReferencedBeamSequence[0].BeamMeterset == \
        before.FractionGroupSequence[0].ReferencedBeamSequence[0].BeamMeterset


def test_mapping_is_consistent_kept_locally_and_leads_back(inbox, tmp_path, workspace_interpreter):
    case = generate_case(inbox, "MAP", seed=13)
    plant_identity(case, seed=13)
    before = pydicom.dcmread(next(case.glob("RN*.dcm")))
    staging = tmp_path / "staging" / "case-000003"
    prepare(workspace_interpreter, case, staging)
    ds = pydicom.dcmread(staging / "dicom" / "RTPLAN.dcm")
    deid = tmp_path / "ws" / "deid"
    key = deid / "key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600 and stat.S_IMODE(deid.stat().st_mode) == 0o700
    mapping_file = deid / "mappings" / "case-000003.json"
    assert stat.S_IMODE(mapping_file.stat().st_mode) == 0o600
    mapping = json.loads(mapping_file.read_text())["mapping"]
    assert mapping[ds.SOPInstanceUID] == before.SOPInstanceUID and mapping[ds.PatientID] == before.PatientID
    assert not any(str(p).startswith(str(deid)) for p in staging.rglob("*"))
    # the same key gives the same values (a re-prepared case, another case of this patient)
    again = tmp_path / "staging" / "again"
    prepare(MoquiInterpreter(MoquiSettings(), PluginContext(workspace=tmp_path / "ws")), case, again)
    assert (again / "dicom" / "RTPLAN.dcm").read_bytes() == (staging / "dicom" / "RTPLAN.dcm").read_bytes()
    # another workspace's key gives other values
    other = tmp_path / "staging" / "other"
    prepare(MoquiInterpreter(MoquiSettings(), PluginContext(workspace=tmp_path / "ws2")), case, other)
    assert pydicom.dcmread(other / "dicom" / "RTPLAN.dcm").SOPInstanceUID != ds.SOPInstanceUID


def test_log_files_renamed_and_plan_range_rewritten(inbox, tmp_path, workspace_interpreter):
    case = generate_case(inbox, "RANGE", seed=14, treatment_beams=1)
    plant_identity(case, seed=14)
    staging = tmp_path / "staging" / "case-000004"
    prepare(workspace_interpreter, case, staging)
    logs = staging / "beams" / "1" / "logs"
    ds = pydicom.dcmread(staging / "dicom" / "RTPLAN.dcm")
    names = sorted(p.name for p in logs.iterdir())
    assert names == sorted(["PlanInfo.txt", "PlanRange.txt"] + [f"G1_{ds.PatientID}_001_001_{layer:03d}.{ext}"
                                                                 for layer in (1, 2, 3) for ext in ("ptn", "mgn")])
    lines = (logs / "PlanRange.txt").read_text().splitlines()
    assert lines[0] == ("LAYER_NO,LAYER_ENERGY,PATIENT_ID,FLD_NO,DOSE1_RANGE,DOSE2_RANGE,PLAN_DOSE1_RANGE,"
                        "PLAN_DOSE2_RANGE,SCAN_OUT_FL_NM,PLAN_SCAN_OUT_FL_NM")
    energy = ds.IonBeamSequence[0].IonControlPointSequence[0].NominalBeamEnergy
    assert lines[1] == (f"1,{energy:.1f},{ds.PatientID},1,2,2,2,2,G1_{ds.PatientID}_001_001_001.ptn,"
                        f"G1_{ds.PatientID}_001_001_001.mgn")
    info = dict(line.split(",", 1) for line in (logs / "PlanInfo.txt").read_text().splitlines())
    assert set(info) == {"DICOM_PATIENT_ID", "DICOM_STUDY_INS_UID", "DICOM_BEAM_NUMBER", "DICOM_BEAM_NAME",
                         "DICOM_RTPLAN_LABEL", "TCSC_MACHINE", "START_LAYER_NUMBER", "STOP_LAYER_NUMBER"}
    assert info["DICOM_STUDY_INS_UID"] == ds.StudyInstanceUID and info["DICOM_PATIENT_ID"] == ds.PatientID


def test_delivery_file_names_without_the_machine_pattern_are_numbered():
    pseudo = Pseudonymizer(b"k" * 32)
    assert delivery_file_name("G2_P12345_002_003_017.ptn", pseudo, 5) == \
        f"G2_{pseudo.pseudonym('P12345')}_002_003_017.ptn"
    assert delivery_file_name("Müller Hans beam 1.ptn", pseudo, 7) == "log_0007.ptn"
    assert delivery_file_name("no extension", pseudo, 2) == "log_0002"
    assert delivery_file_name("x.weird ext", pseudo, 3) == "log_0003"
    assert deidentify_plan_range(b"", pseudo, {}) == b""
    out = deidentify_plan_range(b"PATIENT_ID,SCAN_OUT_FL_NM,SECRET\nP1,C:\\logs\\a.ptn,x\n", pseudo, {"a.ptn": "b.ptn"})
    assert out.decode() == f"PATIENT_ID,SCAN_OUT_FL_NM\n{pseudo.pseudonym('P1')},b.ptn\n"


@pytest.mark.parametrize("fixture", sorted(FIXTURES.glob("RN*.dcm")), ids=lambda p: p.name[:12])
def test_real_eclipse_plans_deidentify_and_stay_readable(fixture):
    ds = pydicom.dcmread(fixture)
    identifiers = [str(ds.get(k, "")) for k in ("PatientName", "PatientID", "SOPInstanceUID", "StudyInstanceUID")]
    deidentify_dataset(ds, Pseudonymizer(b"k" * 32))
    from pydicom.filebase import DicomBytesIO

    buffer = DicomBytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    data = buffer.getvalue()
    for value in identifiers:
        if len(value) >= 4:
            assert value.encode() not in data
    again = pydicom.dcmread(DicomBytesIO(data))
    assert len(again.IonBeamSequence) == len(pydicom.dcmread(fixture).IonBeamSequence)
