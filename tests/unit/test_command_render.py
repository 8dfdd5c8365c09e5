"""Command rendering: what a worker is told, and the shell quoting of every value."""

from __future__ import annotations

import shlex
import subprocess

import pytest

from mqi_framework import command_render
from mqi_framework.config import load_config
from mqi_framework.workspace import fast_config, write_workspace

HOSTILE = [
    "two words",
    "it's",
    'say "hi"',
    "a; touch PWNED",
    "$(touch PWNED)",
    "`touch PWNED`",
    "line\nbreak; touch PWNED",
    "* ? [a]",
    "${HOME}",
    "a|b&&c>d",
    "",
    "-n",
]


@pytest.mark.parametrize("value", HOSTILE, ids=repr)
def test_fill_shell_makes_each_value_one_shell_word(value, tmp_path):
    command = command_render.fill_shell("printf '%s\\0' {v} {v}", {"v": value})
    assert shlex.split(command)[2:] == [value, value]
    out = subprocess.run(["sh", "-c", command], cwd=tmp_path, capture_output=True, check=True).stdout
    assert out.split(b"\0")[:-1] == [value.encode(), value.encode()]  # the shell saw the value, as one word
    assert not list(tmp_path.iterdir())  # and ran nothing of it


def test_fill_plain_keeps_values_as_they_are():
    assert command_render.fill_plain("{a}/{b}", {"a": "x y", "b": "$(z)"}) == "x y/$(z)"


@pytest.fixture
def loaded(tmp_path):
    data = fast_config()
    data["workflow"]["vars"] = {"site": "a; touch PWNED", "quote": "it's $(x)"}
    for step in data["workflow"]["steps"]:
        if step["name"] == "simulate":
            step["command"] = "run {site} {quote} {input_file} --gpu {gpu} --attempt {attempt}"
    folder = tmp_path / "work space; $(x)"
    return load_config(write_workspace(folder, data))


def _step(loaded, name):
    index, step = next((i, s) for i, s in enumerate(loaded.config.workflow.steps) if s.name == name)
    return index, step


CASE = {"id": 7, "uid": "case-000007", "path": "/in/PATIENT 1", "inbox": "/in"}


def test_run_step_carries_what_the_worker_needs_and_quotes_the_command(loaded):
    index, step = _step(loaded, "simulate")
    gpu = {"host": "gpu1", "idx": 1, "uuid": "GPU-1"}
    body = command_render.run_step(loaded, CASE, index, step, 42, 2, beam=3, input_rel="beams/3 x/in; rm.in", gpu=gpu)
    assert body["type"] == "run_step" and (body["step_id"], body["attempt"], body["beam"]) == (42, 2, 3)
    assert body["job_key"] == "case-000007-simulate-b3-a2"
    assert body["gpu"] == {"host": "gpu1", "index": 1, "uuid": "GPU-1"}
    assert body["case_path"] == "/in/PATIENT 1" and body["inbox"] == "/in" and body["worker"] == step.worker
    words = shlex.split(body["command"])
    input_file = body["remote_dir"] + "/beams/3 x/in; rm.in"
    assert words == ["run", "a; touch PWNED", "it's $(x)", input_file, "--gpu", "1", "--attempt", "2"]
    assert body["workdir"] == body["remote_dir"] + "/beams/3 x"  # not for a shell: not quoted
    assert body["staging_dir"].endswith("staging/case-000007") and "work space; $(x)" in body["staging_dir"]


def test_a_workspace_path_with_shell_characters_stays_one_word(loaded):
    index, step = _step(loaded, "postprocess")
    body = command_render.run_step(loaded, CASE, index, step, 5, 1, beam=1)
    words = shlex.split(body["command"])
    assert any(w.endswith("/results/case-000007/beam_1") and "work space; $(x)" in w for w in words), words


def test_cancel_step_names_the_attempt_it_gives_up(loaded):
    index, step = _step(loaded, "simulate")
    run = command_render.run_step(loaded, CASE, index, step, 42, 1, beam=2, gpu={"host": "h", "idx": 0, "uuid": ""})
    cancel = command_render.cancel_step(run, "case cancelled by cli")
    assert cancel == {"type": "cancel_step", "step_id": 42, "attempt": 1, "job_key": run["job_key"],
                      "case": "case-000007", "beam": 2, "step": "simulate", "worker": step.worker,
                      "reason": "case cancelled by cli"}
