"""The stand-in simulator as a real subprocess: every mode, exit codes, outputs."""

from __future__ import annotations

import array
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mqi_moqui.logjudge import judge_log
from mqi_moqui.samples import generate_case


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


def test_ok_writes_dose_and_succeeds(prepared):
    staging, inputs = prepared
    proc = run_standin(inputs[2])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "GPUID: 0" in proc.stdout and "Beam: 2" in proc.stdout
    assert "Generating particles for (5 of 5 batches)" in proc.stdout
    assert "Time taken by MC engine:" in proc.stdout
    dose = staging / "beams" / "2" / "output" / "dose_beam2.raw"
    values = array.array("f")
    values.frombytes(dose.read_bytes())
    assert len(values) == 16 ** 3 and max(values) > 0
    assert not (dose.with_suffix(".mhd")).exists()
    assert judge_log(proc.stdout).outcome == "success"


def test_mhd_output_has_a_header(inbox, tmp_path):
    from mqi_moqui.interpreter import MoquiInterpreter, MoquiSettings

    interp = MoquiInterpreter(MoquiSettings(output_format="mhd"), None)
    case = generate_case(inbox, "MHD", seed=2)
    staging = tmp_path / "remote"
    inputs = interp.prepare(case, interp.interpret(case), staging, str(staging))
    assert run_standin(staging / inputs[1]).returncode == 0
    header = (staging / "beams" / "1" / "output" / "dose_beam1.mhd").read_text()
    assert "ElementDataFile = dose_beam1.raw" in header and "ElementType = MET_FLOAT" in header


def test_console_script_is_installed(prepared):
    _, inputs = prepared
    proc = subprocess.run(["mqi-standin-tps", str(inputs[1])], capture_output=True, text=True, timeout=30,
                          env=dict(os.environ, MQI_STANDIN_SECONDS="0.05", MQI_STANDIN_MODE="ok"))
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("mode, code, line, outcome", [
    ("fail", 1, "ERROR: simulated failure", "failure"),
    ("fatal", 1, "FATAL ERROR", "failure"),
    ("segv", 139, "Segmentation fault", "failure"),
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
    dose = staging / "beams" / "3" / "output" / "dose_beam3.raw"
    if mode in ("fail", "fatal", "segv", "nooutput"):
        assert not dose.exists()


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


@pytest.mark.parametrize("key", ["GPUID", "ParentDir", "DicomPath", "logFilePath", "BeamNumbers", "OutputDir",
                                 "OutputFormat"])
def test_missing_required_key(prepared, key):
    _, inputs = prepared
    text = inputs[1].read_text()
    inputs[1].write_text("".join(l + "\n" for l in text.splitlines() if not l.startswith(key + " ")))
    proc = run_standin(inputs[1])
    assert proc.returncode == 2 and "ERROR:" in proc.stdout and key in proc.stdout


@pytest.mark.parametrize("key", ["DicomPath", "logFilePath"])
def test_missing_paths(prepared, key, tmp_path):
    _, inputs = prepared
    lines = [f"{key} {tmp_path / 'does not exist'}" if l.startswith(key + " ") else l
             for l in inputs[1].read_text().splitlines()]
    inputs[1].write_text("\n".join(lines) + "\n")
    proc = run_standin(inputs[1])
    assert proc.returncode == 2 and f"ERROR: {key} does not exist" in proc.stdout


def test_help(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "mqi_moqui.standin", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "MQI_STANDIN_MODE" in proc.stdout
