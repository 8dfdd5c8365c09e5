"""parse_log(): every pattern."""

from __future__ import annotations

import pytest

from mqi_framework.protocols import LogVerdict


def progress_lines(i: int, n: int = 5) -> str:
    return "".join(f"Generating particles for ({k} of {n} batches)\n" for k in range(1, i + 1))


def test_success(interpreter):
    v = interpreter.parse_log("GPUID: 0\n" + progress_lines(5) + "Time taken by MC engine: 12.30 s\n")
    assert v == LogVerdict("success", "", 1.0)


@pytest.mark.parametrize("line", [
    "FATAL ERROR: out of GPU memory",
    "ERROR: cannot open /remote/dicom",
    "Segmentation fault (core dumped)",
    "  ERROR: with spaces around   ",
])
def test_failure_patterns(interpreter, line):
    v = interpreter.parse_log(progress_lines(2) + line + "\n")
    assert v.outcome == "failure"
    assert v.message == line.strip()
    assert v.progress == pytest.approx(0.4)


def test_failure_wins_over_success(interpreter):
    v = interpreter.parse_log("Time taken by MC engine: 1.00 s\nSegmentation fault\n")
    assert v.outcome == "failure" and v.message == "Segmentation fault"


def test_progress_is_the_last_counter(interpreter):
    v = interpreter.parse_log(progress_lines(3, 8))
    assert v.outcome == "unknown" and v.progress == pytest.approx(3 / 8) and v.message == ""


@pytest.mark.parametrize("text", ["", "Moqui starting\nreading DICOM\n", "partial line without newli"])
def test_nothing_recognisable_is_unknown_not_an_error(interpreter, text):
    assert interpreter.parse_log(text) == LogVerdict("unknown", "", None)


# Upstream Moqui's own texts (MGHPhysicsResearch/moquimc) and the C++/CUDA runtimes', as a
# real run prints them (issue 14.5)

def test_real_success_line(interpreter):
    v = interpreter.parse_log("Time taken by MC engine: 83412 milli-seconds\n")
    assert v.outcome == "success"


@pytest.mark.parametrize("log,meaning,permanent", [
    ("terminate called after throwing an instance of 'std::runtime_error'\n  what():  There is no RTPLAN in the path\n",
     "the engine found no RT Ion Plan in DicomDir: There is no RTPLAN in the path", True),
    ("terminate called after throwing an instance of 'std::runtime_error'\n  what():  Valid machine is not available.\n",
     "no model of the plan's treatment machine", True),
    ("Output directory exists.\n", "OverwriteResults is false", True),
    ("CUDA error: cudaMalloc failed: out of memory\n", "the GPU ran out of memory", False),
    ("GPUassert: out of memory /src/mqi_tps_env.hpp 412\n", "the GPU ran out of memory", False),
    ("Time taken by MC engine: 1000 milli-seconds\nCannot write :/remote/case-000001/dose.raw\n",
     "the engine could not write the dose", False),
    ("Cannot open file!\n", "could not open a file", False),
    ("Error occurred at writing time!\n", "could not write the dose", False),
    ("terminate called after throwing an instance of 'std::runtime_error'\n  what():  spot map has 3 values\n",
     "the engine aborted: spot map has 3 values", False),
])
def test_real_failures_name_their_cause(interpreter, log, meaning, permanent):
    v = interpreter.parse_log(log)
    assert v.outcome == "failure" and meaning in v.message and v.permanent is permanent, v
