"""Delivered layers against the plan, and resumed deliveries (issue 14.2)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pydicom
import pytest

from mqi_framework.protocols import CaseRejected
from mqi_moqui.deliveries import read_plan_range
from mqi_moqui.interpreter import MoquiInterpreter, MoquiSettings, parse_plan_info
from mqi_moqui.samples import PLAN_RANGE_HEADER, delivery_folder_name, generate_case

SOBP = Path(__file__).parent / "fixtures" / "plans" / "RN.1.2.246.352.71.5.37402163639.162240.20220929101251.dcm"


def plan_range_rows(folder: Path) -> list[list[str]]:
    return [line.split(",") for line in (folder / "PlanRange.txt").read_text().splitlines()[1:]]


def write_rows(folder: Path, rows: list[list[str]]) -> None:
    (folder / "PlanRange.txt").write_text("\r\n".join([PLAN_RANGE_HEADER] + [",".join(r) for r in rows]) + "\r\n")


def split_delivery(case: Path, beam: int, first_layers: set[int], second_name: str = "2099010100000000") -> Path:
    """Move the layers not in ``first_layers`` of ``beam``'s delivery into a second folder,
    as a delivery interrupted after those layers and resumed later."""
    first = case / delivery_folder_name(1, beam)
    second = case / second_name
    second.mkdir()
    shutil.copy(first / "PlanInfo.txt", second / "PlanInfo.txt")
    rows = plan_range_rows(first)
    keep = [r for r in rows if int(r[1]) in first_layers]
    moved = [r for r in rows if int(r[1]) not in first_layers]
    for row in moved:
        for name in row[-2:]:
            shutil.move(first / name, second / name)
    write_rows(first, keep)
    write_rows(second, moved)
    return second


def test_a_resumed_delivery_is_merged_in_layer_order(inbox, tmp_path, interpreter):
    case = generate_case(inbox, "RESUMED", seed=1, treatment_beams=2)
    split_delivery(case, 1, {1})
    plan = interpreter.interpret(case)
    assert plan.missing == [] and [b.number for b in plan.beams] == [1, 2]
    assert plan.beams[0].delivery_dir == delivery_folder_name(1, 1)  # the first session's folder
    assert any("beam 1: a resumed delivery, merged from 2 folders (layers 1; 2-3)" in n for n in plan.info["notes"])
    staging = tmp_path / "staging"
    interpreter.prepare(case, plan, staging, str(staging))
    logs = staging / "beams" / "1" / "logs"
    assert len(list(logs.glob("*.ptn"))) == 3 and len(list(logs.glob("*.mgn"))) == 3
    assert [int(r[0]) for r in plan_range_rows(logs)] == [1, 2, 3]  # one PlanRange, every layer (de-identified)
    assert parse_plan_info((logs / "PlanInfo.txt").read_bytes())["STOP_LAYER_NUMBER"] == "3"


def test_overlapping_deliveries_of_one_beam_are_rejected(inbox, interpreter):
    case = generate_case(inbox, "OVERLAP", seed=1, treatment_beams=2)
    second = split_delivery(case, 1, {1, 2})
    rows = plan_range_rows(case / delivery_folder_name(1, 1))
    write_rows(second, [rows[1]] + plan_range_rows(second))  # layer 2 in both
    with pytest.raises(CaseRejected, match=r"delivery folder #1 and delivery folder #3 both hold layer\(s\) 2 of beam 1"):
        interpreter.interpret(case)


def test_a_partial_delivery_waits_for_the_rest_of_its_layers(inbox, interpreter):
    case = generate_case(inbox, "PARTIAL", seed=1, treatment_beams=2)
    second = split_delivery(case, 2, {1, 2})
    away = shutil.move(second, inbox / "later")
    plan = interpreter.interpret(case)
    assert plan.missing == [2]
    assert "beam 2: layer(s) 3 of 3 not delivered yet" in plan.info["notes"]
    shutil.move(away, second)  # the resumed session arrives
    assert interpreter.interpret(case).missing == []


def test_a_layer_delivered_at_another_energy_holds_the_case(inbox, interpreter):
    case = generate_case(inbox, "ENERGY", seed=1, treatment_beams=2)
    folder = case / delivery_folder_name(1, 2)
    rows = plan_range_rows(folder)
    planned = float(rows[1][2])
    rows[1][2] = f"{planned + 1.0:.1f}"
    write_rows(folder, rows)
    with pytest.raises(CaseRejected) as info:
        interpreter.interpret(case)
    assert (f"delivery folder #2 (beam 2): layer 2 was delivered at {planned + 1:g} MeV, the plan's layer 2 is "
            f"{planned:g} MeV") in str(info.value)
    rows[1][2] = f"{planned + 0.05:.2f}"  # within layer_energy_tolerance_mev
    write_rows(folder, rows)
    assert interpreter.interpret(case).missing == []


def test_a_layer_the_plan_lacks_is_rejected(inbox, interpreter):
    case = generate_case(inbox, "EXTRA", seed=1, treatment_beams=1)
    folder = case / delivery_folder_name(1, 1)
    write_rows(folder, plan_range_rows(folder) + [["x", "4", "90.0", "P", "1", "2", "2", "2", "2", "a.ptn", "a.mgn"]])
    with pytest.raises(CaseRejected, match=r"holds layer\(s\) 4, but the plan's beam 1 has 3 layer\(s\)"):
        interpreter.interpret(case)


def test_two_folders_that_do_not_state_their_layers_are_rejected(inbox, interpreter):
    case = generate_case(inbox, "UNSTATED", seed=1, treatment_beams=1)
    first = case / delivery_folder_name(1, 1)
    second = shutil.copytree(first, case / "2099010100000000")
    for folder in (first, second):
        (folder / "PlanRange.txt").unlink()
        info = [l for l in (folder / "PlanInfo.txt").read_text().splitlines() if "LAYER_NUMBER" not in l]
        (folder / "PlanInfo.txt").write_text("\n".join(info) + "\n")
    with pytest.raises(CaseRejected, match="does not say which layers it holds"):
        interpreter.interpret(case)
    shutil.rmtree(second)
    plan = interpreter.interpret(case)  # one folder: taken, and the case says what was not checked
    assert plan.missing == [] and "beam 1: the delivered layers are not stated (no PlanRange.txt): not checked" \
        in plan.info["notes"]


def test_start_and_stop_layer_numbers_stand_in_for_plan_range(inbox, interpreter):
    case = generate_case(inbox, "STARTSTOP", seed=1, treatment_beams=1)
    folder = case / delivery_folder_name(1, 1)
    (folder / "PlanRange.txt").unlink()
    text = (folder / "PlanInfo.txt").read_text().replace("STOP_LAYER_NUMBER,3", "STOP_LAYER_NUMBER,2")
    (folder / "PlanInfo.txt").write_text(text)
    assert interpreter.interpret(case).missing == [1]  # layer 3 not delivered


def test_plan_range_text_variants_and_garbage():
    assert read_plan_range(b"\xef\xbb\xbfLAYER_NO,LAYER_ENERGY\r\n1,70.0\r\n\r\n2,72.5\r\n", "x") == {1: 70.0, 2: 72.5}
    assert read_plan_range(b"layer_no,layer_energy\n1,70\n1,70\n", "x") == {1: 70.0}  # a repeated row is one
    with pytest.raises(CaseRejected, match="no LAYER_NO and LAYER_ENERGY columns"):
        read_plan_range(b"A,B\n1,2\n", "x")
    with pytest.raises(CaseRejected, match="line 2"):
        read_plan_range(b"LAYER_NO,LAYER_ENERGY\nfirst,70\n", "x")
    with pytest.raises(CaseRejected, match="twice with different energies"):
        read_plan_range(b"LAYER_NO,LAYER_ENERGY\n1,70\n1,75\n", "x")


def sobp_case(tmp_path: Path):
    """A case folder holding the public SOBP plan: (dataset, folder, its beam, layer energies)."""
    ds = pydicom.dcmread(SOBP)
    case = tmp_path / "sobp"
    case.mkdir()
    shutil.copy(SOBP, case / SOBP.name)
    beam = ds.IonBeamSequence[0]
    energies = [float(cp.NominalBeamEnergy) for cp in beam.IonControlPointSequence
                if sum(float(w) for w in cp.ScanSpotMetersetWeights) > 0]
    return ds, case, beam, energies


def test_a_real_24_layer_plan_checks_its_delivered_energies(tmp_path):
    """The public SOBP plan (Eclipse): a PlanRange.txt written from its own energies passes;
    one of a plan with one layer less fails at the layer where the energies part."""
    ds, case, beam, energies = sobp_case(tmp_path)
    folder = case / "2026010100000000"
    folder.mkdir()
    (folder / "PlanInfo.txt").write_text(f"DICOM_PATIENT_ID,{ds.PatientID}\r\nDICOM_STUDY_INS_UID,{ds.StudyInstanceUID}"
                                         f"\r\nDICOM_BEAM_NUMBER,{beam.BeamNumber}\r\n")
    write_rows(folder, [["r", str(n), f"{e:.1f}", "P", "1", "2", "2", "2", "2", f"{n}.ptn", f"{n}.mgn"]
                        for n, e in enumerate(energies, 1)])
    moqui = MoquiInterpreter(MoquiSettings(phantom="water"))
    assert moqui.interpret(case).missing == [] and len(energies) == 24
    write_rows(folder, [["r", str(n), f"{e:.1f}", "P", "1", "2", "2", "2", "2", f"{n}.ptn", f"{n}.mgn"]
                        for n, e in enumerate(energies[:5] + energies[6:], 1)])  # layer 6 skipped in the TPS
    with pytest.raises(CaseRejected, match=r"layer 6 was delivered at .* MeV, the plan's layer 6 is"):
        moqui.interpret(case)


def test_a_real_plan_delivered_in_two_sessions_is_merged(tmp_path):
    """The public 24-layer SOBP plan interrupted after layer 10 and resumed: two folders, one
    staged delivery with every layer in order."""
    ds, case, beam, energies = sobp_case(tmp_path)
    for folder_name, layers in (("2026010100000000", range(1, 11)), ("2026010101300000", range(11, 25))):
        folder = case / folder_name
        folder.mkdir()
        (folder / "PlanInfo.txt").write_text(
            f"DICOM_PATIENT_ID,{ds.PatientID}\r\nDICOM_STUDY_INS_UID,{ds.StudyInstanceUID}\r\n"
            f"DICOM_BEAM_NUMBER,{beam.BeamNumber}\r\nSTART_LAYER_NUMBER,{layers[0]}\r\nSTOP_LAYER_NUMBER,{layers[-1]}\r\n")
        write_rows(folder, [["r", str(n), f"{energies[n - 1]:.1f}", "P", "1", "2", "2", "2", "2", f"TR3_{n:03d}.ptn",
                             f"TR3_{n:03d}.mgn"] for n in layers])
        for n in layers:
            (folder / f"TR3_{n:03d}.ptn").write_bytes(bytes([n]) * 16)
    moqui = MoquiInterpreter(MoquiSettings(phantom="water", deidentify=False))
    plan = moqui.interpret(case)
    assert plan.missing == [] and plan.beams[0].delivery_dir == "2026010100000000"
    staging = tmp_path / "staging"
    moqui.prepare(case, plan, staging, str(staging))
    logs = staging / "beams" / str(beam.BeamNumber) / "logs"
    assert [int(r[1]) for r in plan_range_rows(logs)] == list(range(1, 25))
    assert len(list(logs.glob("*.ptn"))) == 24
    info = parse_plan_info((logs / "PlanInfo.txt").read_bytes())
    assert (info["START_LAYER_NUMBER"], info["STOP_LAYER_NUMBER"]) == ("1", "24")
