"""The engine emulator as a real subprocess: upstream keys and defaults, upstream failures
with their texts and exit codes, float64 doses with upstream names, every mode."""

from __future__ import annotations

import array
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mqi_moqui.logjudge import judge_log
from mqi_moqui.samples import CT_PIXELS, CT_SLICES, generate_case

CT_VOXELS = CT_PIXELS * CT_PIXELS * CT_SLICES


def run_standin(input_file: Path, timeout: float = 30, **env: str) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, MQI_STANDIN_SECONDS="0.05")
    full_env.pop("MQI_STANDIN_MODE", None)
    full_env.update(env)
    return subprocess.run([sys.executable, "-m", "mqi_moqui.standin", str(input_file)], capture_output=True,
                          text=True, env=full_env, timeout=timeout)


@pytest.fixture
def prepared(inbox, tmp_path, interpreter):
    """A prepared case whose remote dir is the staging dir itself (as core.local does)."""
    case = generate_case(inbox, "CASE", seed=1)
    staging = tmp_path / "remote"
    inputs = interpreter.prepare(case, interpreter.interpret(case), staging, str(staging))
    return staging, {n: staging / rel for n, rel in inputs.items()}


def dose_of(staging: Path, beam: int) -> Path:
    [dose] = (staging / "beams" / str(beam) / "output").glob("*_Dose.raw")
    return dose


def test_ok_writes_a_float64_dose_named_as_upstream(prepared):
    staging, inputs = prepared
    proc = run_standin(inputs[2])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Generating particles for (5 of 5 batches)" in proc.stdout
    assert re.search(r"Time taken by MC engine: \d+ milli-seconds", proc.stdout)
    dose = dose_of(staging, 2)
    assert re.fullmatch(r".+_0_Dose\.raw", dose.name)  # <BeamName>_<beamline geometries>_<Scorer>
    values = array.array("d")
    values.frombytes(dose.read_bytes())
    assert len(values) == CT_VOXELS and max(values) > 0 and min(values) >= 0  # on the CT's grid
    assert not dose.with_suffix(".mhd").exists()
    assert judge_log(proc.stdout).outcome == "success"


def test_the_dose_depends_on_the_plan(prepared, inbox, tmp_path, interpreter):
    staging, inputs = prepared
    for n in (1, 2):
        assert run_standin(inputs[n]).returncode == 0
    assert dose_of(staging, 1).read_bytes() != dose_of(staging, 2).read_bytes()


def test_mhd_output_has_a_metaimage_header(inbox, tmp_path):
    from mqi_moqui.dose import read_dose
    from mqi_moqui.interpreter import MoquiInterpreter, MoquiSettings

    interp = MoquiInterpreter(MoquiSettings(output_format="mhd"), None)
    case = generate_case(inbox, "MHD", seed=2)
    staging = tmp_path / "remote"
    inputs = interp.prepare(case, interp.interpret(case), staging, str(staging))
    assert run_standin(staging / inputs[1]).returncode == 0
    [header] = (staging / "beams" / "1" / "output").glob("*_0_Dose.mhd")
    text = header.read_text()
    assert "ElementType = MET_DOUBLE" in text and f"ElementDataFile = {header.stem}.raw" in text
    assert "\nOffset " in text and "\nTransformMatrix 1 0 0" in text  # upstream's lines without "="
    dose = read_dose(header)
    assert dose.grid.dims == (CT_PIXELS, CT_PIXELS, CT_SLICES) and len(dose.values) == CT_VOXELS
    assert dose.grid.spacing == (8.0, 8.0, 8.0) and dose.grid.offset[0] == pytest.approx(-124.0)  # the CT's


def rewrite(path: Path, **keys: str) -> None:
    lines = [l for l in path.read_text().splitlines() if l.split(" ", 1)[0] not in keys]
    path.write_text("\n".join(lines + [f"{k} {v}" for k, v in keys.items() if v is not None]) + "\n")


def drop(path: Path, key: str) -> None:
    path.write_text("".join(l + "\n" for l in path.read_text().splitlines() if not l.startswith(key + " ")))


def test_upstream_failures_have_upstream_texts_and_exit_codes(prepared, tmp_path):
    staging, inputs = prepared
    (tmp_path / "ct-only").mkdir()
    for ct in (staging / "dicom").glob("CT.*.dcm"):
        shutil.copy(ct, tmp_path / "ct-only" / ct.name)
    rewrite(inputs[1], DicomDir="../ct-only")  # a CT but no RTPLAN where DicomDir points
    proc = run_standin(inputs[1])
    assert proc.returncode == 134 and "what():  There is no RTPLAN in the path" in proc.stdout
    assert judge_log(proc.stdout).permanent
    drop(inputs[1], "DicomDir")
    proc = run_standin(inputs[1])  # no DicomDir: upstream looks in ParentDir itself, where no CT is
    assert proc.returncode == 134 and "instance of 'std::bad_alloc'" in proc.stdout
    drop(inputs[2], "Machine")  # default InstitutionName:TreatmentMachineName: no such beam model
    proc = run_standin(inputs[2])
    assert proc.returncode == 134 and "Valid machine is not available." in proc.stdout
    assert run_standin(inputs[3]).returncode == 0
    drop(inputs[3], "OverwriteResults")  # a retry without OverwriteResults
    proc = run_standin(inputs[3])
    assert proc.returncode == 134 and "Output directory exists." in proc.stdout


def test_no_scorer_writes_no_dose_and_still_says_success(prepared):
    staging, inputs = prepared
    drop(inputs[1], "Scorer")
    proc = run_standin(inputs[1])
    assert proc.returncode == 0 and judge_log(proc.stdout).outcome == "success"
    assert not (staging / "beams" / "1" / "output").exists() or not list((staging / "beams" / "1" / "output").iterdir())


def test_default_particles_per_history_gives_a_negative_dose(prepared):
    from mqi_moqui.dose import DoseError, check_dose, read_dose

    staging, inputs = prepared
    drop(inputs[1], "ParticlesPerHistory")
    assert run_standin(inputs[1]).returncode == 0
    with pytest.raises(DoseError, match="negative"):
        check_dose(read_dose(dose_of(staging, 1)))


def test_console_script_is_installed(prepared):
    _, inputs = prepared
    proc = subprocess.run(["mqi-standin-tps", str(inputs[1])], capture_output=True, text=True, timeout=30,
                          env=dict(os.environ, MQI_STANDIN_SECONDS="0.05", MQI_STANDIN_MODE="ok"))
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("mode, code, line, outcome", [
    ("fail", 1, "ERROR: simulated failure", "failure"),
    ("fatal", 1, "FATAL ERROR", "failure"),
    ("segv", 139, "Segmentation fault", "failure"),
    ("abort", 134, "what():  simulated abort", "failure"),
    ("oom", 255, "out of memory", "failure"),
    ("gpuassert", 2, "GPUassert: out of memory", "failure"),
    ("writefail", 0, "Cannot write :", "failure"),  # exit 0, as upstream: the log decides
    ("lying", 3, "Time taken by MC engine", "success"),
    ("nooutput", 0, "Time taken by MC engine", "success"),
])
@pytest.mark.parametrize("via", ["env", "file"])
def test_modes(prepared, mode, code, line, outcome, via):
    staging, inputs = prepared
    if via == "file":
        (staging / "beams" / "3" / "logs" / "STANDIN_MODE").write_text(mode + "\n")
        proc = run_standin(inputs[3])
    else:
        proc = run_standin(inputs[3], MQI_STANDIN_MODE=mode)
    assert proc.returncode == code, proc.stdout
    assert line in proc.stdout
    assert judge_log(proc.stdout).outcome == outcome
    if mode not in ("lying",):
        assert not list((staging / "beams" / "3").glob("output/*_Dose.raw"))


def test_mode_file_only_affects_its_beam(prepared):
    staging, inputs = prepared
    (staging / "beams" / "2" / "logs" / "STANDIN_MODE").write_text("fail")
    assert run_standin(inputs[1]).returncode == 0
    assert run_standin(inputs[2]).returncode == 1


def test_hang_runs_until_killed(prepared):
    _, inputs = prepared
    env = dict(os.environ, MQI_STANDIN_SECONDS="0.05", MQI_STANDIN_MODE="hang")
    proc = subprocess.Popen([sys.executable, "-m", "mqi_moqui.standin", str(inputs[1])], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)
    try:
        time.sleep(1.5)
        assert proc.poll() is None, "hang mode ended by itself"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate(timeout=10)
    assert "Generating particles for" in out and "Time taken" not in out
    assert judge_log(out).outcome == "unknown"


def test_unknown_mode_is_an_input_error(prepared):
    _, inputs = prepared
    proc = run_standin(inputs[1], MQI_STANDIN_MODE="explode")
    assert proc.returncode == 2 and proc.stdout.startswith("ERROR:")


def test_missing_input_file(tmp_path):
    proc = run_standin(tmp_path / "nope.in")
    assert proc.returncode == 2 and "ERROR: input file not found" in proc.stdout


def test_help(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "mqi_moqui.standin", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "MQI_STANDIN_MODE" in proc.stdout and "gpuassert" in proc.stdout


def test_mha_and_the_fraction_and_rbe_scaling(inbox, tmp_path):
    from mqi_moqui.dose import read_dose
    from mqi_moqui.interpreter import MoquiInterpreter, MoquiSettings

    sums = {}
    for fractions in (1, 3):
        interp = MoquiInterpreter(MoquiSettings(output_format="mha", number_of_fractions=fractions), None)
        case = generate_case(inbox / str(fractions), "MHA", seed=2)
        staging = tmp_path / f"remote{fractions}"
        inputs = interp.prepare(case, interp.interpret(case), staging, str(staging))
        assert run_standin(staging / inputs[1]).returncode == 0
        [mha] = (staging / "beams" / "1" / "output").glob("*_Dose.mha")
        sums[fractions] = read_dose(mha).summary()["sum"]
    assert sums[3] == pytest.approx(3 * sums[1])  # upstream scales by NumberOfFraction (and RBE)


def test_npz_output_is_upstreams_sparse_matrix_and_sums_to_the_dense_dose(inbox, tmp_path):
    from mqi_moqui.dose import read_dose
    from mqi_moqui.interpreter import MoquiInterpreter, MoquiSettings

    doses = {}
    for fmt in ("raw", "npz"):
        interp = MoquiInterpreter(MoquiSettings(output_format=fmt), None)
        case = generate_case(inbox / fmt, "NPZ", seed=2, treatment_beams=1)
        staging = tmp_path / fmt
        inputs = interp.prepare(case, interp.interpret(case), staging, str(staging))
        assert run_standin(staging / inputs[1]).returncode == 0
        [dose] = (staging / "beams" / "1" / "output").glob(f"*_0_Dose.{fmt}")
        doses[fmt] = read_dose(dose).values
    import numpy as np

    assert len(doses["npz"]) == CT_VOXELS
    assert np.allclose(np.asarray(doses["npz"]), np.asarray(doses["raw"]), rtol=1e-9, atol=1e-12 * max(doses["raw"]))
