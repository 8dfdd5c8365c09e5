"""prepare(): the staged tree, remote paths, idempotency and de-identification."""

from __future__ import annotations

import os
from pathlib import Path

import pydicom
import pytest

from mqi_moqui.deid import Pseudonymizer, deidentify_plan_info
from mqi_moqui.interpreter import MoquiInterpreter, MoquiSettings
from mqi_moqui.samples import delivery_folder_name, fake_patient_id, fake_patient_name, generate_case

REMOTE = "/data/mqi remote/case-000001"


def staged_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def read_input(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        key, _, value = line.partition(" ")
        assert key not in out, f"{key} written twice"
        out[key] = value
    return out


def test_prepare_writes_inputs_with_remote_paths(inbox, tmp_path, interpreter):
    case = generate_case(inbox, "CASE", seed=1)
    plan = interpreter.interpret(case)
    staging = tmp_path / "staging"
    inputs = interpreter.prepare(case, plan, staging, REMOTE)
    assert inputs == {n: f"beams/{n}/moqui_tps_{n}.in" for n in (1, 2, 3)}
    seeds: set[str] = set()
    assert (staging / "dicom" / "RTPLAN.dcm").is_file()
    for n, rel in inputs.items():
        values = read_input(staging / rel)
        seed = values.pop("RandomSeed")
        assert values == {
            "GPUID": "0",
            "UseAbsolutePath": "false",
            "ParentDir": REMOTE,
            "DicomDir": "dicom",  # relative: upstream joins ParentDir + "/" + DicomDir
            "OutputDir": f"{REMOTE}/beams/{n}/output",
            "OutputFormat": "raw",
            "OverwriteResults": "true",
            "SimulationType": "perBeam",
            "BeamNumbers": str(n),
            "SourceType": "FluenceMap",
            "Machine": "PBS",  # upstream's example machine; sites map theirs (settings.machines)
            "Calibration": "default",  # upstream's default; sites map theirs (settings.calibrations)
            "Scorer": "Dose",
            "ParticlesPerHistory": "1000",
            "MaxHistoriesPerBatch": "10000",
            "TotalThreads": "-1",
            "RBE": "1.1",
            "NumberOfFraction": "1",  # the dose of one fraction
        }
        seeds.add(seed)
        logs = staging / "beams" / str(n) / "logs"
        source = case / delivery_folder_name(1, n)
        # the log files keep their bytes, not their names (de-identified: log_<n> in name order)
        logs_staged = [f"log_{i:04d}.{ext}" for i, ext in enumerate(["mgn", "ptn"] * 3, 1)]
        assert sorted(p.name for p in logs.iterdir()) == ["PlanInfo.txt", "PlanRange.txt", *logs_staged]
        sources = sorted(p for p in source.iterdir() if p.suffix in (".ptn", ".mgn"))
        assert [p.read_bytes() for p in sources] == [(logs / name).read_bytes() for name in logs_staged]
    assert not (staging / "beams" / "4").exists()  # the setup beam
    assert not list(staging.rglob("*.part"))
    assert len(seeds) == 3  # a random stream of its own per beam


def test_settings_reach_the_input_file(inbox, tmp_path):
    interp = MoquiInterpreter(MoquiSettings(output_format="mhd", random_seed=42, gpu_id=3, scorer="LETd",
                                            machines={"G1": "pbs:/beamdata/G1"}, particles_per_history=500,
                                            extra_keys={"ROIName": "{case}-{beam}", "GPUID": "7"}), None)
    case = generate_case(inbox, "CASE", seed=1)
    staging = tmp_path / "staging"
    inputs = interp.prepare(case, interp.interpret(case), staging, "/remote/c1/")
    values = read_input(staging / inputs[2])
    assert values["OutputFormat"] == "mhd" and values["Scorer"] == "LETd" and values["Machine"] == "pbs:/beamdata/G1"
    assert values["ParticlesPerHistory"] == "500" and values["ROIName"] == "c1-2"  # per-beam placeholders
    assert values["GPUID"] == "7"  # extra_keys replace, never duplicate
    assert values["ParentDir"] == "/remote/c1" and values["DicomDir"] == "dicom"
    other = MoquiInterpreter(MoquiSettings(random_seed=43), None).input_text(2, "/remote/c1")
    assert read_input_text(other)["RandomSeed"] != values["RandomSeed"]


def read_input_text(text: str) -> dict[str, str]:
    return dict(line.split(" ", 1) for line in text.splitlines())


def test_settings_validation():
    with pytest.raises(ValueError):
        MoquiSettings(output_format="dcm")  # upstream writes no DICOM dose (only the fork does)
    with pytest.raises(ValueError):
        MoquiSettings(extra_keys={"two words": "x"})
    with pytest.raises(ValueError):
        MoquiSettings(extra_keys={"Key": "line\nInjected 1"})
    with pytest.raises(ValueError, match="unknown placeholder"):
        MoquiSettings(extra_keys={"Key": "{patient}"})
    s = MoquiSettings()
    assert (s.output_format, s.random_seed, s.deidentify, s.extra_keys, s.gpu_id) == ("raw", 1, True, {}, 0)


def test_prepare_is_idempotent(inbox, tmp_path, interpreter):
    case = generate_case(inbox, "CASE", seed=1)
    plan = interpreter.interpret(case)
    staging = tmp_path / "staging"
    first = interpreter.prepare(case, plan, staging, REMOTE)
    before = staged_files(staging)
    mtimes = {p: p.stat().st_mtime_ns for p in staging.rglob("*") if p.is_file()}
    second = interpreter.prepare(case, plan, staging, REMOTE)
    assert first == second
    assert staged_files(staging) == before
    assert {p: p.stat().st_mtime_ns for p in staging.rglob("*") if p.is_file()} == mtimes  # nothing rewritten
    # a damaged staged file (e.g. a crash of another tool) is repaired by a re-run
    damaged = staging / "beams" / "1" / "moqui_tps_1.in"
    damaged.write_text("GPUID 0\n")
    log = next((staging / "beams" / "1" / "logs").glob("*.ptn"))
    log.write_bytes(b"x")
    interpreter.prepare(case, plan, staging, REMOTE)
    assert staged_files(staging) == before


def test_deidentification_removes_patient_identifiers(inbox, tmp_path, interpreter):
    case = generate_case(inbox, "CASE", seed=11)
    pid, pname = fake_patient_id(11).encode(), fake_patient_name(11).encode()
    assert pid in next(case.glob("R[NP]*.dcm")).read_bytes()
    assert pid in (case / delivery_folder_name(11, 1) / "PlanInfo.txt").read_bytes()
    staging = tmp_path / "staging"
    interpreter.prepare(case, interpreter.interpret(case), staging, REMOTE)
    for rel, data in staged_files(staging).items():
        assert pid not in data, rel
        assert pname not in data and b"FAKEPATIENT" not in data and b"FAKEOTHER" not in data, rel
    ds = pydicom.dcmread(staging / "dicom" / "RTPLAN.dcm")
    assert ds.PatientID.startswith("MQI") and str(ds.PatientName) == "ANONYMOUS"
    assert ds.PatientBirthDate == "" and "OtherPatientIDs" not in ds and ds.PatientIdentityRemoved == "YES"
    assert ds.DeidentificationMethodCodeSequence[0].CodeValue == "113100"
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.481.8" and len(ds.IonBeamSequence) == 4
    planinfo = (staging / "beams" / "1" / "logs" / "PlanInfo.txt").read_text()
    assert f"DICOM_PATIENT_ID,{ds.PatientID}" in planinfo and "DICOM_BEAM_NUMBER,1" in planinfo
    assert f"DICOM_STUDY_INS_UID,{ds.StudyInstanceUID}" in planinfo  # one mapping for plan and logs
    assert interpreter.interpret(case)  # the case folder itself is untouched
    assert pid in next(case.glob("R[NP]*.dcm")).read_bytes()


def test_deidentify_false_copies_as_is(inbox, tmp_path):
    interp = MoquiInterpreter(MoquiSettings(deidentify=False), None)
    case = generate_case(inbox, "CASE", seed=11)
    staging = tmp_path / "staging"
    interp.prepare(case, interp.interpret(case), staging, REMOTE)
    assert (staging / "dicom" / "RTPLAN.dcm").read_bytes() == next(case.glob("R[NP]*.dcm")).read_bytes()
    assert fake_patient_id(11).encode() in (staging / "beams" / "1" / "logs" / "PlanInfo.txt").read_bytes()


def test_deidentify_plan_info_keeps_layout_and_allowed_keys_only():
    pseudo = Pseudonymizer(b"k" * 32)
    data = "\ufeffDICOM_PATIENT_ID,P123\r\nDICOM_PATIENT_NAME , Doe^J\r\n\r\nDICOM_BEAM_NUMBER,2\r\n".encode()
    out = deidentify_plan_info(data, pseudo)
    assert out == f"\ufeffDICOM_PATIENT_ID,{pseudo.pseudonym('P123')}\r\nDICOM_BEAM_NUMBER,2\r\n".encode()
    assert pseudo.mapping == {pseudo.pseudonym("P123"): "P123"}


def test_only_delivery_files_are_staged_no_subfolders_no_symlinks(inbox, tmp_path, interpreter):
    case = generate_case(inbox, "CASE", seed=1)
    delivery = case / delivery_folder_name(1, 1)
    (delivery / "sub").mkdir()
    (delivery / "sub" / "extra.ptn").write_bytes(b"\x01\x02")
    secret = tmp_path / "secret.txt"
    secret.write_text("outside")
    os.symlink(secret, delivery / "link.txt")
    os.symlink(tmp_path, delivery / "linkdir")
    os.symlink(secret, delivery / "linked.ptn")  # a log file name, but a link: never followed
    staging = tmp_path / "staging"
    interpreter.prepare(case, interpreter.interpret(case), staging, REMOTE)
    logs = staging / "beams" / "1" / "logs"
    assert "linked.ptn" not in [p.name for p in logs.iterdir()] and not (logs / "sub").exists()
    assert sorted(p.name for p in logs.iterdir()) == ["PlanInfo.txt", "PlanRange.txt"] + [
        f"log_{i:04d}.{ext}" for i, ext in enumerate(["mgn", "ptn"] * 3, 1)]


def test_a_file_name_too_long_to_stage_is_a_clear_rejection(inbox, tmp_path):
    """Issue 15.4: a legal 250-byte name failed its case after 15 deliveries with ENAMETOOLONG."""
    from mqi_framework.protocols import CaseRejected

    interp = MoquiInterpreter(MoquiSettings(deidentify=False), None)
    case = generate_case(inbox, "LONG", seed=3)
    (case / delivery_folder_name(3, 1) / ("x" * 246 + ".ptn")).write_bytes(b"\x00")
    with pytest.raises(CaseRejected, match="too long"):
        interp.prepare(case, interp.interpret(case), tmp_path / "staging", REMOTE)


def test_a_case_prepared_again_gets_new_seeds_and_records_them(inbox, tmp_path, interpreter):
    """Issue 14.3: RandomSeed from case, beam and attempt, recorded with the result."""
    import json

    import attrs

    case = generate_case(inbox, "SEEDS", seed=3)
    plan = interpreter.interpret(case)

    def seeds(attempt: int, where: str) -> dict[int, str]:
        staged = tmp_path / where
        planned = attrs.evolve(plan, info={**plan.info, "prepare_attempt": attempt})
        inputs = interpreter.prepare(case, planned, staged, REMOTE)
        record = json.loads((staged / "beams" / "1" / "run.json").read_text())
        assert record["prepare_attempt"] == attempt and str(record["random_seed"]) == read_input(staged / inputs[1])[
            "RandomSeed"]
        return {n: read_input(staged / rel)["RandomSeed"] for n, rel in inputs.items()}

    first, again, second = seeds(1, "a"), seeds(1, "b"), seeds(2, "c")
    assert first == again  # one preparation: one seed per beam, whatever re-delivers it
    assert len(set(first.values())) == 3 and not set(first.values()) & set(second.values())
