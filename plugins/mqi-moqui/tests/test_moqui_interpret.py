"""interpret() on generated case folders (real DICOM files, real folders)."""

from __future__ import annotations

import os
import shutil

import pytest

from mqi_framework.protocols import CaseRejected
from mqi_moqui.interpreter import parse_plan_info
from mqi_moqui.samples import delivery_folder_name, fake_patient_id, generate_case


def test_three_treatment_beams_and_a_setup_beam(inbox, interpreter):
    case = generate_case(inbox, "CASE-1", seed=1)
    plan = interpreter.interpret(case)
    assert [b.number for b in plan.beams] == [1, 2, 3]
    assert [b.delivery_dir for b in plan.beams] == [delivery_folder_name(1, n) for n in (1, 2, 3)]
    assert all(b.name for b in plan.beams)
    assert plan.missing == []
    assert plan.info["treatment_beams"] == 3 and plan.info["setup_beams"] == 1
    assert plan.info["treatment_machine"] == "G1"
    assert fake_patient_id(1) not in repr(plan)


def test_missing_delivery_is_listed(inbox, interpreter):
    case = generate_case(inbox, "PARTIAL", seed=2, missing_beams=(2,))
    plan = interpreter.interpret(case)
    assert plan.missing == [2]
    beams = {b.number: b for b in plan.beams}
    assert beams[2].delivery_dir is None and beams[1].delivery_dir and beams[3].delivery_dir


def test_same_seed_gives_the_same_delivery_folders(tmp_path):
    a = generate_case(tmp_path / "a", "X", seed=5)
    b = generate_case(tmp_path / "b", "X", seed=5)
    assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())


def test_no_plan_is_rejected(inbox, interpreter):
    case = generate_case(inbox, "NOPLAN", seed=1)
    for rp in case.glob("R[NP]*.dcm"):
        rp.unlink()
    with pytest.raises(CaseRejected, match=r"no RT Ion Plan in the case folder"):
        interpreter.interpret(case)


def test_two_plans_are_rejected(inbox, interpreter):
    case = generate_case(inbox, "TWO", seed=1)
    rp = next(case.glob("R[NP]*.dcm"))
    shutil.copy(rp, case / "RP.copy.dcm")
    with pytest.raises(CaseRejected, match="expected exactly one"):
        interpreter.interpret(case)


@pytest.mark.parametrize("content", [b"", b"this is not DICOM at all\n" * 10, b"\0" * 128 + b"DICM" + b"\xff" * 40],
                         ids=["empty", "text", "truncated"])
def test_garbage_plan_is_rejected(inbox, interpreter, content):
    case = generate_case(inbox, "GARBAGE", seed=1)
    rp = next(case.glob("R[NP]*.dcm"))
    rp.write_bytes(content)
    with pytest.raises(CaseRejected) as info:
        interpreter.interpret(case)
    assert f"{rp.name} in the case folder is not readable DICOM" in str(info.value)


def test_photon_plan_is_rejected(inbox, interpreter):
    import pydicom

    case = generate_case(inbox, "PHOTON", seed=1)
    rp = next(case.glob("R[NP]*.dcm"))
    ds = pydicom.dcmread(rp)
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.481.5"
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.save_as(rp)
    with pytest.raises(CaseRejected, match="not an RT Ion Plan"):
        interpreter.interpret(case)


def test_wrong_modality_is_rejected(inbox, interpreter):
    import pydicom

    case = generate_case(inbox, "CT", seed=1)
    rp = next(case.glob("R[NP]*.dcm"))
    ds = pydicom.dcmread(rp)
    ds.Modality = "CT"
    ds.save_as(rp)
    with pytest.raises(CaseRejected, match="Modality CT"):
        interpreter.interpret(case)


def test_plan_without_treatment_beam_is_rejected(inbox, interpreter):
    case = generate_case(inbox, "SETUPONLY", seed=1, treatment_beams=0, setup_beams=2)
    with pytest.raises(CaseRejected, match="no treatment beam"):
        interpreter.interpret(case)


def test_duplicate_delivery_is_rejected(inbox, interpreter):
    case = generate_case(inbox, "DUP", seed=1)
    first = case / delivery_folder_name(1, 2)
    shutil.copytree(first, case / "2099010100000000")
    with pytest.raises(CaseRejected) as info:
        interpreter.interpret(case)
    message = str(info.value)
    order = sorted(p.name for p in case.iterdir() if (p / "PlanInfo.txt").is_file())
    first_at, second_at = order.index(first.name) + 1, order.index("2099010100000000") + 1
    assert f"delivery folder #{first_at} and delivery folder #{second_at} both hold layer(s) 1-3 of beam 2" in message
    # folder names often carry patient ids: messages name delivery folders by position only
    assert first.name not in message and "2099010100000000" not in message
    assert fake_patient_id(1) not in message


def test_delivery_for_setup_or_unknown_beam_is_ignored_and_reported(inbox, interpreter):
    case = generate_case(inbox, "EXTRA", seed=1)
    for folder, number in (("1111", 4), ("2222", 42), ("3333", "abc")):
        (case / folder).mkdir()
        (case / folder / "PlanInfo.txt").write_text(f"DICOM_BEAM_NUMBER,{number}\n")
    (case / "not-a-delivery").mkdir()
    plan = interpreter.interpret(case)
    assert [b.number for b in plan.beams] == [1, 2, 3] and plan.missing == []
    ignored = " | ".join(plan.info["ignored_deliveries"])
    order = sorted(p.name for p in case.iterdir() if (p / "PlanInfo.txt").is_file())
    at = {name: order.index(name) + 1 for name in ("1111", "2222", "3333")}
    assert f"delivery folder #{at['1111']}: beam 4 is a setup beam" in ignored
    assert f"delivery folder #{at['2222']}: beam 42 is not a beam of the plan" in ignored
    assert f"delivery folder #{at['3333']}: PlanInfo.txt has no valid DICOM_BEAM_NUMBER" in ignored
    assert not any(name in ignored for name in ("1111", "2222", "3333", "not-a-delivery"))


def test_symlinked_entries_are_not_followed(tmp_path, inbox, interpreter):
    outside = generate_case(tmp_path / "outside", "OUT", seed=1)
    case = generate_case(inbox, "LINKS", seed=1, missing_beams=(3,))
    os.symlink(outside / delivery_folder_name(1, 3), case / "linked-delivery")
    plan = interpreter.interpret(case)
    assert plan.missing == [3]
    # a symlinked plan is not a plan
    rp = next(case.glob("R[NP]*.dcm"))
    rp.unlink()
    os.symlink(next(outside.glob("R[NP]*.dcm")), case / rp.name)
    with pytest.raises(CaseRejected, match="no RT Ion Plan"):
        interpreter.interpret(case)


@pytest.mark.parametrize("name", [
    "it's a \"case\"; $(touch PWNED) `touch PWNED2` & echo",
    "with spaces  and tabs\tinside",
    "ünïcödé-名前",
    "-starts-with-dash",
    "..dots..",
])
def test_odd_case_folder_names_are_just_names(inbox, interpreter, name, tmp_path):
    case = generate_case(inbox, name, seed=3)
    assert case.name == name and case.parent == inbox
    plan = interpreter.interpret(case)
    assert [b.number for b in plan.beams] == [1, 2, 3]
    assert not list(tmp_path.rglob("PWNED*"))


@pytest.mark.parametrize("name", ["", ".", "..", "a/b"])
def test_generate_case_refuses_names_that_are_not_one_folder(inbox, name):
    with pytest.raises(ValueError):
        generate_case(inbox, name)


def test_plan_info_parsing_is_tolerant():
    data = "\ufeff  DICOM_PATIENT_ID , X1 \r\n\r\nDICOM_BEAM_NUMBER,2\r\nCOMMENT,a, b ,c\r\nnoseparator\r\n".encode()
    values = parse_plan_info(data)
    assert values == {"DICOM_PATIENT_ID": "X1", "DICOM_BEAM_NUMBER": "2", "COMMENT": "a, b ,c"}


def test_crlf_bom_planinfo_maps_the_beam(inbox, interpreter):
    case = generate_case(inbox, "CRLF", seed=1, missing_beams=(1,))
    folder = case / "odd"
    folder.mkdir()
    import pydicom

    study = pydicom.dcmread(next(case.glob("R[NP]*.dcm"))).StudyInstanceUID
    (folder / "PlanInfo.txt").write_bytes(f"\ufeffDICOM_PATIENT_ID,{fake_patient_id(1)}\r\nDICOM_STUDY_INS_UID, {study}\r\n"
                                          "\r\n DICOM_BEAM_NUMBER , 1 \r\n".encode())
    plan = interpreter.interpret(case)
    assert plan.missing == [] and plan.beams[0].delivery_dir == "odd"


def _append_private_element(plan, length: int) -> None:
    """A private OB element (0011,1010) announcing ``length`` bytes, the file extended to hold
    them without writing them (sparse): a 4 KB plan that claims a 1 GiB value."""
    import struct

    with open(plan, "ab") as fh:
        fh.write(struct.pack("<HH", 0x0011, 0x0010) + b"LO" + struct.pack("<H", 8) + b"HOSTILE ")
        fh.write(struct.pack("<HH", 0x0011, 0x1010) + b"OB\0\0" + struct.pack("<I", length))
        fh.truncate(fh.tell() + length)


def test_a_plan_over_max_plan_bytes_is_refused_before_it_is_parsed(inbox, mocker):
    from mqi_moqui.interpreter import MoquiInterpreter, MoquiSettings
    from mqi_moqui.rtplan import find_plan_file

    case = generate_case(inbox, "HUGE", seed=1)
    _append_private_element(find_plan_file(case), 1024**3)
    parse = mocker.spy(__import__("pydicom"), "dcmread")
    with pytest.raises(CaseRejected, match=r"is 1\.0 GiB, over the limit of 128\.0 MiB \(max_plan_bytes"):
        MoquiInterpreter(MoquiSettings(), None).interpret(case)
    assert all(call.kwargs.get("specific_tags") for call in parse.call_args_list)  # only the SOP class was read


def test_a_huge_element_is_refused_without_being_loaded(inbox):
    import tracemalloc

    from mqi_moqui.interpreter import MoquiInterpreter, MoquiSettings
    from mqi_moqui.rtplan import find_plan_file

    case = generate_case(inbox, "BLOB", seed=1)
    _append_private_element(find_plan_file(case), 1024**3)
    interpreter = MoquiInterpreter(MoquiSettings(max_plan_bytes=0), None)  # only the element limit applies
    tracemalloc.start()
    try:
        with pytest.raises(CaseRejected, match=r"element \(0011,1010\) of 1\.0 GiB, over the limit of 16\.0 MiB"):
            interpreter.interpret(case)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 * 1024**2  # the value was never read into memory


def test_an_oversized_plan_info_is_a_rejection_not_a_memory_load(inbox, interpreter):
    from mqi_moqui.samples import delivery_dir_of

    case = generate_case(inbox, "BIGINFO", seed=1)
    with open(delivery_dir_of(case, 2) / "PlanInfo.txt", "ab") as fh:
        fh.truncate(3 * 1024**3)
    with pytest.raises(CaseRejected, match=r"delivery folder #\d: PlanInfo.txt is over 1024 KiB"):
        interpreter.interpret(case)
