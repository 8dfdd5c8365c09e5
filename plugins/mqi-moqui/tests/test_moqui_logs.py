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
