"""Plans found by content and checked before anything runs; deliveries matched to the plan's
patient and study (issue 14.1, 14.2). Real Eclipse RT Ion Plans (``fixtures/plans``, see its
README) and variants derived from them at run time."""

from __future__ import annotations

import shutil
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from mqi_framework.protocols import CaseRejected
from mqi_moqui.interpreter import MoquiInterpreter, MoquiSettings
from mqi_moqui.plancheck import check_plan
from mqi_moqui.samples import generate_case

PLANS = Path(__file__).parent / "fixtures" / "plans"
QA_PATTERN = PLANS / "RN.1.2.246.352.71.5.361940808526.37240.20200311150225.dcm"  # 4 fields, 1 layer each
SOBP = PLANS / "RN.1.2.246.352.71.5.37402163639.162240.20220929101251.dcm"  # 1 field, 24 layers


def make_case(root: Path, plan: Path, *, name: str = "case", beams=None, plan_file: str | None = None,
              patient: str | None = None, study: str | None = None) -> Path:
    """A case folder with ``plan`` (copied under ``plan_file``, default its own name) and a
    delivery folder per beam whose PlanInfo.txt names the plan's patient and study."""
    ds = pydicom.dcmread(plan)
    case = root / name
    case.mkdir(parents=True)
    shutil.copy(plan, case / (plan_file or plan.name))
    numbers = [int(b.BeamNumber) for b in ds.IonBeamSequence] if beams is None else beams
    for number in numbers:
        folder = case / f"2026010100{number:02d}0000"
        folder.mkdir()
        (folder / "PlanInfo.txt").write_text(
            f"DICOM_PATIENT_ID,{patient if patient is not None else ds.PatientID}\r\n"
            f"DICOM_STUDY_INS_UID,{study if study is not None else ds.StudyInstanceUID}\r\n"
            f"DICOM_BEAM_NUMBER,{number}\r\n", encoding="utf-8")
        (folder / "001.ptn").write_bytes(b"\0" * 16)
    return case


def water(**settings) -> MoquiSettings:
    """Settings for the public plans here, which come without their CT: the water phantom."""
    return MoquiSettings(phantom="water", **settings)


def rewrite(path: Path, change) -> None:
    ds = pydicom.dcmread(path)
    change(ds)
    ds.save_as(path)


@pytest.fixture
def moqui():
    return MoquiInterpreter(water())


# ------------------------------------------------------------------ found by content


@pytest.mark.parametrize("file_name", ["RN.1.2.246.352.71.5.361940808526.37240.20200311150225.dcm", "plan export.dcm",
                                       "PLAN", "rp_lowercase.DCM"])
def test_the_plan_is_found_by_its_sop_class_whatever_its_name(tmp_path, moqui, file_name):
    case = make_case(tmp_path, QA_PATTERN, plan_file=file_name)
    plan = moqui.interpret(case)
    assert [b.number for b in plan.beams] == [1, 2, 3, 4] and plan.missing == []
    assert plan.info["treatment_machine"] == "TR3"
    details = {d["number"]: d for d in plan.info["beam_details"]}
    assert details[2]["layers"] == 1 and details[2]["spots"] == 117 and details[2]["energy_min"] == 130.0
    assert plan.info["fraction_groups"] == [{"number": 1, "fractions": 1, "beams": [1, 2, 3, 4],
                                             "metersets": {"1": 2340.0, "2": 2340.0, "3": 2340.0, "4": 2340.0}}]


def test_a_real_multi_layer_plan_is_read_layer_by_layer(tmp_path, moqui):
    plan = moqui.interpret(make_case(tmp_path, SOBP))
    (beam,) = plan.info["beam_details"]
    assert beam["layers"] == 24 and beam["spots"] == 13434
    assert beam["energy_min"] == pytest.approx(78.269) and beam["energy_max"] == pytest.approx(154.169)


def test_other_dicom_beside_the_plan_is_not_a_plan(tmp_path, moqui):
    case = make_case(tmp_path, QA_PATTERN)
    ct = Dataset()
    ct.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ct.Modality = "CT"
    ct.file_meta = pydicom.dataset.FileMetaDataset()
    ct.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ct.file_meta.MediaStorageSOPClassUID = ct.SOPClassUID
    ct.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    ct.SOPInstanceUID = ct.file_meta.MediaStorageSOPInstanceUID
    ct.save_as(case / "CT.1.dcm", enforce_file_format=True)
    (case / "notes.txt").write_text("not DICOM, not a plan")
    assert [b.number for b in moqui.interpret(case).beams] == [1, 2, 3, 4]
    shutil.move(case / QA_PATTERN.name, tmp_path / "away.dcm")
    with pytest.raises(CaseRejected, match=r"no RT Ion Plan in the case folder \(1 other DICOM file"):
        moqui.interpret(case)


def test_two_ion_plans_are_named_in_the_rejection(tmp_path, moqui):
    case = make_case(tmp_path, QA_PATTERN)
    shutil.copy(SOBP, case / SOBP.name)
    with pytest.raises(CaseRejected) as info:
        moqui.interpret(case)
    assert "2 RT Ion Plans" in str(info.value) and QA_PATTERN.name in str(info.value) and SOBP.name in str(info.value)


# ------------------------------------------------------------------ checked against itself


@pytest.mark.parametrize("fraction", [0.5, 0.8, 0.97])
def test_a_plan_cut_short_is_rejected_whatever_pydicom_makes_of_it(tmp_path, moqui, fraction):
    case = make_case(tmp_path, SOBP)
    data = SOBP.read_bytes()
    (case / SOBP.name).write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(CaseRejected) as info:
        moqui.interpret(case)
    assert any(word in str(info.value) for word in ("truncated", "cut short", "inconsistent", "not readable"))


@pytest.mark.parametrize("break_it, reason", [
    (lambda b: setattr(b, "NumberOfControlPoints", 3), "declares 3 control points but has 2"),
    (lambda b: setattr(b, "FinalCumulativeMetersetWeight", 2000.0), "FinalCumulativeMetersetWeight 2000"),
    (lambda b: setattr(b.IonControlPointSequence[0], "NumberOfScanSpotPositions", 116), "116 spot positions but 117"),
    (lambda b: setattr(b.IonControlPointSequence[0], "ScanSpotPositionMap",
                       list(b.IonControlPointSequence[0].ScanSpotPositionMap)[:-2]), "232 spot coordinates"),
    (lambda b: delattr(b.IonControlPointSequence[0], "NominalBeamEnergy"), "has no beam energy"),
], ids=["control-points", "final-meterset", "spot-count", "spot-map", "energy"])
def test_an_inconsistent_beam_is_rejected_with_the_reason(tmp_path, moqui, break_it, reason):
    case = make_case(tmp_path, QA_PATTERN)
    rewrite(case / QA_PATTERN.name, lambda ds: break_it(ds.IonBeamSequence[2]))
    with pytest.raises(CaseRejected) as info:
        moqui.interpret(case)
    assert "beam 3" in str(info.value) and reason in str(info.value)


def test_carbon_and_line_scanning_are_refused_unless_the_profile_declares_them(tmp_path):
    case = make_case(tmp_path, QA_PATTERN)
    rewrite(case / QA_PATTERN.name, lambda ds: setattr(ds.IonBeamSequence[1], "RadiationType", "ION"))
    with pytest.raises(CaseRejected, match="beam 2 is a ION beam; the engine profile simulates PROTON only"):
        MoquiInterpreter(water()).interpret(case)
    assert len(MoquiInterpreter(water(radiation_types=["PROTON", "ION"])).interpret(case).beams) == 4
    rewrite(case / QA_PATTERN.name, lambda ds: setattr(ds.IonBeamSequence[3], "ScanMode", "LINE"))
    with pytest.raises(CaseRejected, match="beam 4 uses scan mode LINE"):
        MoquiInterpreter(water(radiation_types=["PROTON", "ION"])).interpret(case)


# ------------------------------------------------------------------ fraction groups


def two_phases(ds) -> None:
    """Phase 1 delivers beams 1 and 2, phase 2 beams 3 and 4."""
    first, = ds.FractionGroupSequence
    refs = list(first.ReferencedBeamSequence)
    second = Dataset()
    second.FractionGroupNumber = 2
    second.NumberOfFractionsPlanned = 5
    second.NumberOfBeams = 2
    second.NumberOfBrachyApplicationSetups = 0
    second.ReferencedBeamSequence = Sequence(refs[2:])
    first.ReferencedBeamSequence = Sequence(refs[:2])
    first.NumberOfBeams = 2
    ds.FractionGroupSequence = Sequence([first, second])


def test_a_two_phase_plan_with_phase_one_delivered_runs_phase_one(tmp_path, moqui):
    case = make_case(tmp_path, QA_PATTERN, beams=[1, 2])
    rewrite(case / QA_PATTERN.name, two_phases)
    plan = moqui.interpret(case)
    assert [b.number for b in plan.beams] == [1, 2] and plan.missing == []  # not waiting for phase 2
    assert "beam(s) 3, 4 of the other fraction group(s) not simulated" in " ".join(plan.info["notes"])
    everything = MoquiInterpreter(water(required_beams="treatment")).interpret(case)
    assert everything.missing == [3, 4]


def test_a_beam_in_no_fraction_group_is_not_simulated(tmp_path, moqui):
    case = make_case(tmp_path, QA_PATTERN, beams=[1, 2, 3])

    def drop_beam_4(ds):
        group, = ds.FractionGroupSequence
        group.ReferencedBeamSequence = Sequence(list(group.ReferencedBeamSequence)[:3])
        group.NumberOfBeams = 3

    rewrite(case / QA_PATTERN.name, drop_beam_4)
    plan = moqui.interpret(case)
    assert [b.number for b in plan.beams] == [1, 2, 3] and plan.missing == []
    assert "beam(s) 4 in no fraction group: not simulated" in plan.info["notes"]


def test_a_fraction_group_of_absent_beams_is_rejected(tmp_path, moqui):
    case = make_case(tmp_path, QA_PATTERN)
    rewrite(case / QA_PATTERN.name,
            lambda ds: setattr(ds.FractionGroupSequence[0].ReferencedBeamSequence[3], "ReferencedBeamNumber", 7))
    with pytest.raises(CaseRejected, match="fraction group 1 references beam 7, which the plan does not have"):
        moqui.interpret(case)


# ------------------------------------------------------------------ delivery identity


def test_a_delivery_of_another_patient_is_never_this_cases(tmp_path, moqui):
    case = make_case(tmp_path, QA_PATTERN, patient="SOMEONE-ELSE-42")
    with pytest.raises(CaseRejected) as info:
        moqui.interpret(case)
    message = str(info.value)
    assert "belongs to another patient" in message and "DICOM_PATIENT_ID" in message
    assert "SOMEONE-ELSE-42" not in message and "test_XRV4000" not in message  # no identifier in the message


def test_a_delivery_of_another_study_is_never_this_cases(tmp_path, moqui):
    case = make_case(tmp_path, QA_PATTERN, study="1.2.3.4.5")
    with pytest.raises(CaseRejected, match="belongs to another study"):
        moqui.interpret(case)
    assert len(MoquiInterpreter(water(delivery_identity="patient")).interpret(case).beams) == 4


def test_a_delivery_that_cannot_be_matched_is_held(tmp_path, moqui):
    case = make_case(tmp_path, QA_PATTERN, study="")
    with pytest.raises(CaseRejected, match="has no DICOM_STUDY_INS_UID, so it cannot be matched to the plan's study"):
        moqui.interpret(case)
    assert len(MoquiInterpreter(water(delivery_identity="off")).interpret(case).beams) == 4


def test_the_sample_generator_writes_plans_the_check_accepts(tmp_path):
    case = generate_case(tmp_path, "S", seed=4)
    (plan,) = case.glob("RN*.dcm")
    summary = check_plan(pydicom.dcmread(plan))
    assert sorted(summary.treatment) == [1, 2, 3] and len(summary.beams) == 4


@pytest.mark.parametrize("keyword,tag", [("IonBeamSequence", 0x300A03A2), ("FractionGroupSequence", 0x300A0070)])
def test_a_sequence_that_is_not_one_is_a_clear_rejection(keyword, tag):
    """Issue 15.4: a malformed IonBeamSequence raised an unhandled AttributeError."""
    from pydicom.dataelem import DataElement

    ds = pydicom.dcmread(QA_PATTERN)
    ds[tag] = DataElement(tag, "LO", "garbage")
    with pytest.raises(CaseRejected, match=f"malformed: {keyword} is not a sequence of items"):
        check_plan(ds)


def test_garbage_in_an_implicit_vr_sequence_is_rejected(tmp_path, moqui):
    # Implicit VR: pydicom reads the bytes as a sequence by the dictionary: one empty item
    from pydicom.dataelem import DataElement

    case = make_case(tmp_path, QA_PATTERN)
    rewrite(case / QA_PATTERN.name, lambda ds: ds.__setitem__(0x300A0070, DataElement(0x300A0070, "LO", "garbage")))
    with pytest.raises(CaseRejected, match="fraction group 1 references no beam"):
        moqui.interpret(case)


def test_a_value_of_the_wrong_shape_anywhere_is_a_rejection_not_a_crash():
    ds = pydicom.dcmread(QA_PATTERN)
    ds.IonBeamSequence[0].IonControlPointSequence[0].NominalBeamEnergy = [1.0, 2.0]  # one value expected
    with pytest.raises(CaseRejected) as caught:
        check_plan(ds)
    assert "RT Ion Plan" in str(caught.value)
