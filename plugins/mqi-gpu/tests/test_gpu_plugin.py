"""The entry point, the registration hook and import cost."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import entry_points

from mqi_framework.protocols import Curator
from mqi_framework.testing import run_cli
from mqi_gpu.curator import NvidiaSmiCurator, NvidiaSmiSettings


def test_entry_point_is_declared():
    [ep] = [e for e in entry_points(group="mqi_framework.plugins") if e.name == "gpu"]
    assert ep.value == "mqi_gpu.plugin"


def test_hook_registers_the_curator(register_plugin, mqi_pm):
    from mqi_gpu import plugin

    register_plugin(plugin, name="gpu")
    assert mqi_pm.lookup("curator", "nvidia-smi") is NvidiaSmiCurator
    assert issubclass(NvidiaSmiCurator, Curator) and NvidiaSmiCurator.settings_class is NvidiaSmiSettings


def test_listed_by_mqi_host_plugins():
    proc = run_cli("--plugins", check=True)
    assert "gpu  [ok]  mqi-gpu" in proc.stdout and "curator nvidia-smi" in proc.stdout


def test_plugin_import_is_light():
    code = "import sys, mqi_gpu.plugin; sys.exit(1 if 'apscheduler' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
