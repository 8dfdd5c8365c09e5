"""The entry point, the registration hook, the CLIs and import cost."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

from mqi_framework.protocols import Interpreter
from mqi_moqui.interpreter import MoquiInterpreter, MoquiSettings


def test_entry_point_is_declared():
    [ep] = [e for e in entry_points(group="mqi_framework.plugins") if e.name == "moqui"]
    assert ep.value == "mqi_moqui.plugin"


def test_hook_registers_the_interpreter():
    from mqi_moqui import plugin

    registered: list[type] = []
    plugin.mqi_register_interpreters(registered.append)
    assert registered == [MoquiInterpreter]
    assert issubclass(MoquiInterpreter, Interpreter)
    assert MoquiInterpreter.name == "moqui" and MoquiInterpreter.settings_class is MoquiSettings


def test_hook_registers_the_demo_command():
    from mqi_moqui import plugin

    commands = []
    plugin.mqi_register_commands(lambda name, help, configure, run: commands.append(name))
    assert commands == ["demo"]


def test_plugin_import_does_not_load_pydicom():
    code = "import sys, mqi_moqui.plugin; sys.exit(1 if 'pydicom' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_sample_case_cli(tmp_path):
    proc = subprocess.run(["mqi-sample-case", str(tmp_path / "inbox"), "--cases", "2", "--prefix", "P ",
                           "--missing-beam", "3", "--no-ready-marker"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    cases = sorted((tmp_path / "inbox").iterdir())
    assert [c.name for c in cases] == ["P 001", "P 002"]
    plan = MoquiInterpreter().interpret(cases[0])
    assert plan.missing == [3]
    assert not (cases[0] / "_CASE_READY").exists()
    helptext = subprocess.run(["mqi-sample-case", "--help"], capture_output=True, text=True)
    assert helptext.returncode == 0 and "--missing-beam" in helptext.stdout


def test_examples_script_generates_cases(tmp_path):
    script = Path(__file__).resolve().parents[3] / "examples" / "generate_cases.py"
    proc = subprocess.run([sys.executable, str(script), str(tmp_path), "--cases", "1"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "CASE-001" / "_CASE_READY").exists()
