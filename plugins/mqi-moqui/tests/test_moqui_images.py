"""The planning CT and RTSTRUCT staged beside the plan, or an explicit water phantom (issue 14.3)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest

from mqi_framework.protocols import CaseRejected
from mqi_moqui.interpreter import MoquiInterpreter, MoquiSettings
from mqi_moqui.samples import CT_SLICES, fake_patient_id, fake_patient_name, generate_case


def slices_of(case: Path) -> list[Path]:
    return sorted(case.glob("CT*.dcm"))


def rewrite(path: Path, change) -> None:
    ds = pydicom.dcmread(path)
    change(ds)
    ds.save_as(path)


def test_the_ct_and_rtstruct_are_staged_de_identified_and_still_consistent(inbox, tmp_path, interpreter):
    case = generate_case(inbox, "CT", seed=3, treatment_beams=2)
    plan = interpreter.interpret(case)
    assert plan.info["dose_medium"] == {"medium": "patient CT", "ct_slices": CT_SLICES, "ct_grid": [32, 32, CT_SLICES],
                                        "ct_spacing_mm": [8.0, 8.0, 8.0], "rtstruct": True}
    staging = tmp_path / "staging"
    interpreter.prepare(case, plan, staging, str(staging))
    dicom = staging / "dicom"
    staged = sorted(dicom.glob("CT.*.dcm"))
    assert [p.name for p in staged] == [f"CT.{k:04d}.dcm" for k in range(1, CT_SLICES + 1)]
    zs = [float(pydicom.dcmread(p).ImagePositionPatient[2]) for p in staged]
    assert zs == sorted(zs)  # in slice order, whatever the source names
    rtplan, ct, rs = (pydicom.dcmread(dicom / n) for n in ("RTPLAN.dcm", "CT.0001.dcm", "RTSTRUCT.dcm"))
    assert ct.FrameOfReferenceUID == rtplan.FrameOfReferenceUID == \
        rs.ReferencedFrameOfReferenceSequence[0].FrameOfReferenceUID
    assert rtplan.ReferencedStructureSetSequence[0].ReferencedSOPInstanceUID == rs.SOPInstanceUID
    assert ct.PatientID == rtplan.PatientID == rs.PatientID != fake_patient_id(3)
    source = pydicom.dcmread(slices_of(case)[0])
    assert ct.FrameOfReferenceUID != source.FrameOfReferenceUID and ct.PixelData == source.PixelData
    for path in dicom.iterdir():
        data = path.read_bytes()
        assert fake_patient_id(3).encode() not in data and fake_patient_name(3).split("^")[0].encode() not in data


def test_a_case_without_ct_is_rejected_unless_the_phantom_is_asked_for(inbox, tmp_path):
    case = generate_case(inbox, "NOCT", seed=4, treatment_beams=1, ct=False)
    with pytest.raises(CaseRejected, match="no planning CT series.*set phantom: water"):
        MoquiInterpreter(MoquiSettings()).interpret(case)
    water = MoquiInterpreter(MoquiSettings(phantom="water", phantom_size_mm=100, phantom_voxel_mm=10,
                                           output_format="mhd"))
    plan = water.interpret(case)
    assert plan.info["dose_medium"] == {"medium": "water phantom", "phantom_size_mm": 100, "phantom_voxel_mm": 10,
                                        "ct_grid": [10, 10, 10]}
    staging = tmp_path / "staging"
    inputs = water.prepare(case, plan, staging, str(staging))
    slices = sorted((staging / "dicom").glob("CT.*.dcm"))
    assert len(slices) == 10 and not (staging / "dicom" / "RTSTRUCT.dcm").exists()
    first = pydicom.dcmread(slices[0])
    assert first.FrameOfReferenceUID == pydicom.dcmread(staging / "dicom" / "RTPLAN.dcm").FrameOfReferenceUID
    assert [float(v) for v in first.ImagePositionPatient] == [-45.0, -45.0, -45.0]  # centred on the isocentre
    proc = subprocess.run([sys.executable, "-m", "mqi_moqui.standin", str(staging / inputs[1])], capture_output=True,
                          text=True, timeout=60, env={"MQI_STANDIN_SECONDS": "0", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stdout
    from mqi_moqui.dose import read_dose

    [header] = (staging / "beams" / "1" / "output").glob("*_Dose.mhd")
    assert read_dose(header).grid.dims == (10, 10, 10)  # the dose lies on the phantom's grid
    # the CT of a case is not used in phantom mode (phantom QA), and the result says so
    assert "water phantom" in (staging / "beams" / "1" / "run.json").read_text()


def test_the_emulator_fails_without_a_ct_as_upstream_cannot_run(inbox, tmp_path, interpreter):
    case = generate_case(inbox, "GONE", seed=5, treatment_beams=1)
    staging = tmp_path / "staging"
    inputs = interpreter.prepare(case, interpreter.interpret(case), staging, str(staging))
    for ct in (staging / "dicom").glob("CT.*.dcm"):
        ct.unlink()
    proc = subprocess.run([sys.executable, "-m", "mqi_moqui.standin", str(staging / inputs[1])], capture_output=True,
                          text=True, timeout=60, env={"MQI_STANDIN_SECONDS": "0", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 134 and "std::bad_alloc" in proc.stdout


def test_a_ct_of_another_frame_of_reference_is_rejected(inbox, interpreter):
    case = generate_case(inbox, "FOR", seed=6, treatment_beams=1)
    for path in slices_of(case):
        rewrite(path, lambda ds: setattr(ds, "FrameOfReferenceUID", "1.2.3.4.5"))
    with pytest.raises(CaseRejected, match="not in the plan's frame of reference"):
        interpreter.interpret(case)


def test_a_second_ct_series_is_rejected(inbox, interpreter):
    case = generate_case(inbox, "TWO", seed=7, treatment_beams=1)
    extra = case / "CT.extra.dcm"
    shutil.copy(slices_of(case)[0], extra)
    rewrite(extra, lambda ds: setattr(ds, "SeriesInstanceUID", "1.2.3.4.6"))
    with pytest.raises(CaseRejected, match="2 CT series in the case folder"):
        interpreter.interpret(case)


@pytest.mark.parametrize("damage, reason", [
    (lambda case: shutil.copy(slices_of(case)[3], case / "CTcopy.dcm"), "same position"),
    (lambda case: [p.unlink() for p in slices_of(case)[1:]], "single slice"),
    (lambda case: rewrite(slices_of(case)[2], lambda ds: setattr(ds, "Rows", 64)), "differs in size"),
    (lambda case: rewrite(slices_of(case)[2], lambda ds: setattr(ds, "ImageOrientationPatient", [0, 1, 0, 1, 0, 0])),
     "not an axial"),
    (lambda case: sorted(slices_of(case), key=lambda p: float(pydicom.dcmread(p).ImagePositionPatient[2]))[5].unlink(),
     "unevenly spaced"),
    (lambda case: rewrite(slices_of(case)[0], lambda ds: setattr(ds, "SOPClassUID", "1.2.840.10008.5.1.4.1.1.2.1")),
     "Enhanced CT"),
])
def test_a_damaged_ct_series_is_rejected_with_the_reason(inbox, interpreter, damage, reason):
    case = generate_case(inbox, "BAD", seed=8, treatment_beams=1)
    damage(case)
    with pytest.raises(CaseRejected, match=reason):
        interpreter.interpret(case)


def test_an_isocentre_outside_the_ct_is_rejected(inbox, interpreter):
    case = generate_case(inbox, "ISO", seed=9, treatment_beams=1)
    [plan] = case.glob("RN*.dcm")
    rewrite(plan, lambda ds: setattr(ds.IonBeamSequence[0].IonControlPointSequence[0], "IsocenterPosition",
                                     [0.0, 0.0, 400.0]))
    with pytest.raises(CaseRejected, match=r"isocentre lies outside the CT \(z = 400 mm"):
        interpreter.interpret(case)


def test_structure_sets_that_are_not_the_plans_are_rejected(inbox, interpreter):
    case = generate_case(inbox, "RS", seed=10, treatment_beams=1)
    [rs] = case.glob("RS*.dcm")
    shutil.copy(rs, case / "RS.second.dcm")
    with pytest.raises(CaseRejected, match="2 RTSTRUCTs"):
        interpreter.interpret(case)
    (case / "RS.second.dcm").unlink()
    rewrite(rs, lambda ds: setattr(ds, "SOPInstanceUID", "1.2.3.4.7"))
    with pytest.raises(CaseRejected, match="not the structure set the plan references"):
        interpreter.interpret(case)
    for path in slices_of(case):
        path.unlink()
    with pytest.raises(CaseRejected, match="an RTSTRUCT .* but no CT series"):
        interpreter.interpret(case)


def test_slices_of_an_earlier_preparation_are_removed(inbox, tmp_path, interpreter):
    case = generate_case(inbox, "AGAIN", seed=11, treatment_beams=1)
    staging = tmp_path / "staging"
    interpreter.prepare(case, interpreter.interpret(case), staging, str(staging))
    by_z = sorted(slices_of(case), key=lambda p: float(pydicom.dcmread(p).ImagePositionPatient[2]))
    for path in by_z[-4:]:
        path.unlink()  # the CT exported again, shorter
    interpreter.prepare(case, interpreter.interpret(case), staging, str(staging))
    assert len(list((staging / "dicom").glob("CT.*.dcm"))) == CT_SLICES - 4
