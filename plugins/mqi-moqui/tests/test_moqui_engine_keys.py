"""Every generated input read the way each engine reads it (issue 14, proof 2).

The tables below are copied by hand from the engines' sources, not from the plugin: each
``parser.get_<type>("Key", default)`` call of

* upstream MGHPhysicsResearch/moquimc at 4ec8185607c14f045e3d6dd71353416268798442,
  ``moqui/base/environments/mqi_tps_env.hpp`` (lines 161-351), and
* the log-driven fork jokh38/moqui_rev at 8c844e5e80dd3a0e637503e98fb01870f8d1be36, same file.

The reader follows ``mqi_cli_parser``'s rules as far as the inputs use them: one ``Key value``
per line, the key up to the first space, the first occurrence of a key wins (so a key
written twice is an error here: the second would be ignored silently).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from mqi_framework.protocols import CaseRejected
from mqi_moqui.interpreter import MoquiInterpreter, MoquiSettings
from mqi_moqui.samples import delivery_folder_name, generate_case

# key: (getter type, engine default)
UPSTREAM = {
    "GPUID": ("int", 0), "RandomSeed": ("int", -1), "UseAbsolutePath": ("bool", False), "TotalThreads": ("int", -1),
    "BeamPrefix": ("string", "beam"), "MaxHistoriesPerBatch": ("int", 0), "ParentDir": ("string", ""),
    "DicomDir": ("string", ""), "CTVolumeName": ("string", ""), "SourceType": ("string", "FluenceMap"),
    "SimulationType": ("string", "perBeam"), "ParticlesPerHistory": ("float", -1.0), "RBE": ("float", 1.1),
    "NumberOfFraction": ("int", -1), "RangeshifterDensity": ("float", 1.19), "UnitWeights": ("int", -1),
    "Machine": ("string", ""), "Calibration": ("string", "default"), "Scorer": ("string_vector", []),
    "SupressStd": ("bool", True), "ScoreToCTGrid": ("bool", True), "ScoringMask": ("bool", False),
    "CTClipping": ("bool", False), "BodyContourName": ("string", "External"), "ReadStructure": ("bool", False),
    "SaveMap": ("bool", True), "Mask": ("string_vector", []), "ScorerMapName": ("string", "scorer_map"),
    "ScorerVoxelSize": ("float_vector", []), "DensityScaling": ("float", 1.0), "XShift": ("float", 0.0),
    "YShift": ("float", 0.0), "ZShift": ("float", 0.0), "OutputDir": ("string", ""),
    "OutputFormat": ("string", "raw"), "OverwriteResults": ("bool", False), "StoppingStatistics": ("bool", False),
    "SaveStoppingStatistics": ("bool", False), "StoppingCriteria": ("float", -1.0),
    "StatROIMaskFilename": ("string_vector", []), "StatROIStructFromRT": ("bool", False), "StatROI": ("string", ""),
    "StatThreshold": ("float", 0.0), "BeamNumbers": ("int_vector", []),
}
FORK = {
    "GPUID": ("int", 0), "RandomSeed": ("int", -1), "UseAbsolutePath": ("bool", False), "TotalThreads": ("int", -1),
    "BeamPrefix": ("string", "beam"), "MaxHistoriesPerBatch": ("int", 0), "ParentDir": ("string", ""),
    "DicomDir": ("string", ""), "DicomPath": ("string", ""), "logFilePath": ("string", ""),
    "GantryNum": ("int", 2), "UsingPhantomGeo": ("bool", False), "TwoCentimeterMode": ("bool", False),
    **{f"Phantom{kind}{axis}": ("int", 200 if kind == "Dim" else 1) for kind in ("Dim", "Unit", "Position")
       for axis in "XYZ"},
    "SourceType": ("string", "FluenceMap"), "SimulationType": ("string", "perBeam"),
    "ParticlesPerHistory": ("float", -1.0), "Scorer": ("string", "EnergyDeposition"), "SupressStd": ("bool", True),
    "ScoreToCTGrid": ("bool", True), "ScoringMask": ("bool", False), "CTClipping": ("bool", False),
    "BodyContourName": ("string", "External"), "ReadStructure": ("bool", False), "SaveMap": ("bool", True),
    "Mask": ("string_vector", []), "ScorerMapName": ("string", "scorer_map"), "ScorerVoxelSize": ("float_vector", []),
    "OutputDir": ("string", ""), "OutputFormat": ("string", "raw"), "OverwriteResults": ("bool", False),
    "BeamNumbers": ("int_vector", []),
}
#: what a run needs beyond the engine's defaults, and why (the default's effect upstream)
NEEDED = {
    "ParentDir": "empty: throws 'ParentDir is not provided'",
    "DicomDir": "empty: scans ParentDir itself for the plan and the CT",
    "OutputDir": "empty: throws 'Output directory is not provided.'",
    "OverwriteResults": "false: every retry throws 'Output directory exists.'",
    "Scorer": "empty (upstream): no dose file at all",
    "ParticlesPerHistory": "-1: one history per spot and a negative dose scale",
    "BeamNumbers": "empty: every beam in one run",
    "RandomSeed": "-1: seeded from the clock, not reproducible",
}
NEEDED_UPSTREAM = {"Machine": "empty: InstitutionName:TreatmentMachineName, 'Valid machine is not available.'"}
NEEDED_FORK = {"logFilePath": "empty: throws 'Log Dir is not provided'",
               "GantryNum": "anything but 1 or 2: silently gantry 2's beam model"}


def parse(text: str, table: dict) -> dict:
    values: dict = {}
    for number, line in enumerate(text.splitlines(), 1):
        assert line.strip(), f"line {number} is blank (the parser throws on a whitespace-only line)"
        key, _, raw = line.partition(" ")
        assert key in table, f"line {number}: {key} is not read by this engine"
        assert key not in values, f"{key} written twice: the engine reads only the first"
        kind, _ = table[key]
        if kind == "int":
            values[key] = int(raw)
        elif kind == "float":
            values[key] = float(raw)
        elif kind == "bool":
            assert raw in ("true", "false"), f"{key} {raw!r} is not a bool the parser knows"
            values[key] = raw == "true"
        elif kind == "int_vector":
            values[key] = [int(v) for v in raw.split(",")]
        elif kind == "string_vector":
            values[key] = raw.split(",")
        else:
            values[key] = raw
    return values


def check_needed(values: dict, needed: dict) -> None:
    for key, effect in needed.items():
        assert key in values, f"{key} is missing (engine default {effect})"


def inputs_of(interpreter: MoquiInterpreter, case: Path, staging: Path) -> dict[int, str]:
    written = interpreter.prepare(case, interpreter.interpret(case), staging, "/srv/moqui/case-000001")
    return {n: (staging / rel).read_text() for n, rel in written.items()}


@pytest.mark.parametrize("settings", [MoquiSettings(), MoquiSettings(output_format="mhd", rbe=1.0),
                                      MoquiSettings(phantom="water", machines={"G1": "pbs:g1_beam_data"}),
                                      MoquiSettings(extra_keys={"ReadStructure": "true", "BodyContourName": "BODY"})])
def test_upstream_reads_every_key_of_every_input(inbox, tmp_path, settings):
    case = generate_case(inbox, "UP", seed=1)
    for number, text in inputs_of(MoquiInterpreter(settings), case, tmp_path / "staging").items():
        values = parse(text, UPSTREAM)
        check_needed(values, {**NEEDED, **NEEDED_UPSTREAM})
        assert values["UseAbsolutePath"] is False and values["OverwriteResults"] is True
        assert values["ParticlesPerHistory"] > 0 and values["RandomSeed"] > 0 and values["BeamNumbers"] == [number]
        assert values["Machine"].split(":")[0].lower() == "pbs"  # upstream's only beam model
        assert values["Scorer"] == ["Dose"] and values["OutputFormat"] in ("raw", "mhd", "mha", "npz")


def fork_case(inbox: Path, beams: int = 2) -> Path:
    """A sample case whose delivery folders also hold converted layer files, as a site's
    converter writes them for the fork."""
    case = generate_case(inbox, "FORK", seed=1, treatment_beams=beams)
    for beam in range(1, beams + 1):
        folder = case / delivery_folder_name(1, beam)
        rows = [line.split(",") for line in (folder / "PlanRange.txt").read_text().splitlines()[1:]]
        for row in rows:
            (folder / f"{row[1]}_{row[2]}MeV.csv").write_text("0.0,-10.0,-10.0,100,0.06,10.0,-10.0,100")
    return case


def test_the_fork_reads_every_key_and_finds_its_logs(inbox, tmp_path):
    case = fork_case(inbox)
    moqui = MoquiInterpreter(MoquiSettings(engine_profile="moqui-logs", gantry_numbers={"G1": 1}))
    staging = tmp_path / "staging"
    for number, text in inputs_of(moqui, case, staging).items():
        values = parse(text, FORK)
        check_needed(values, {**NEEDED, **NEEDED_FORK})
        assert values["GantryNum"] == 1 and values["UseAbsolutePath"] is False
        # the fork takes the folder at sorted index BeamNumber - 1 of ParentDir/logFilePath
        folders = sorted((staging / values["logFilePath"]).iterdir())
        assert len(list(folders[number - 1].glob("*MeV.csv"))) == 3
    record = (staging / "beams" / "1" / "run.json").read_text()
    assert '"rbe": null' in record and "no RBE or fraction scaling" in record


def test_the_fork_profile_refuses_what_the_fork_would_get_wrong(inbox, tmp_path):
    case = fork_case(inbox)
    with pytest.raises(CaseRejected, match="treatment machine G1 has no GantryNum"):
        MoquiInterpreter(MoquiSettings(engine_profile="moqui-logs")).interpret(case)
    with pytest.raises(ValueError, match="1 or 2"):
        MoquiSettings(engine_profile="moqui-logs", gantry_numbers={"G1": 3})
    moqui = MoquiInterpreter(MoquiSettings(engine_profile="moqui-logs", gantry_numbers={"G1": 2}))
    folder = case / delivery_folder_name(1, 2)
    [layer2] = folder.glob("2_*MeV.csv")
    energy = float(layer2.name.split("_")[1][:-7])
    layer2.rename(folder / f"2_{energy + 3:.1f}MeV.csv")
    with pytest.raises(CaseRejected, match=r"layer 2 was delivered at"):
        inputs_of(moqui, case, tmp_path / "a")
    for csv in folder.glob("*MeV.csv"):
        csv.unlink()
    with pytest.raises(CaseRejected, match="converted logs"):
        inputs_of(moqui, case, tmp_path / "b")
    shutil.rmtree(tmp_path / "b", ignore_errors=True)


def test_the_emulator_runs_fork_inputs_from_the_delivered_spots(inbox, tmp_path):
    import subprocess
    import sys

    from mqi_moqui.dose import read_dose

    case = fork_case(inbox, beams=2)
    moqui = MoquiInterpreter(MoquiSettings(engine_profile="moqui-logs", gantry_numbers={"G1": 1}))
    staging = tmp_path / "staging"
    written = moqui.prepare(case, moqui.interpret(case), staging, str(staging))

    def emulate(number: int) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "mqi_moqui.standin", str(staging / written[number])],
                              capture_output=True, text=True, timeout=60, env={"MQI_STANDIN_SECONDS": "0"})

    proc = emulate(2)
    assert proc.returncode == 0 and "the log-driven fork's keys" in proc.stdout and "gantry 1" in proc.stdout
    [dose_file] = (staging / "beams" / "2" / "output").glob("*_Dose.raw")
    before = sum(read_dose(dose_file).values)
    for csv in (staging / "fork_logs" / "Field002").glob("*.csv"):  # twice the delivered counts
        csv.write_text(csv.read_text().replace(",100", ",200"))
    assert emulate(2).returncode == 0
    assert sum(read_dose(dose_file).values) == pytest.approx(2 * before)
    shutil.rmtree(staging / "fork_logs")
    proc = emulate(1)
    assert proc.returncode == 134 and "directory iterator cannot open directory" in proc.stdout
