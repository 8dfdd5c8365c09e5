"""The entry point and the registration hook."""

from __future__ import annotations

from importlib.metadata import entry_points

from mqi_framework.protocols import Executor
from mqi_framework.testing import run_cli
from mqi_slurm.executor import SlurmExecutor, SlurmSettings


def test_entry_point_is_declared():
    [ep] = [e for e in entry_points(group="mqi_framework.plugins") if e.name == "slurm"]
    assert ep.value == "mqi_slurm.plugin"


def test_hook_registers_the_executor(register_plugin, mqi_pm):
    from mqi_slurm import plugin

    register_plugin(plugin, name="slurm")
    assert mqi_pm.lookup("executor", "slurm") is SlurmExecutor
    assert issubclass(SlurmExecutor, Executor) and SlurmExecutor.settings_class is SlurmSettings


def test_listed_by_mqi_host_plugins():
    proc = run_cli("--plugins", check=True)
    assert "slurm  [ok]  mqi-slurm" in proc.stdout and "executor slurm" in proc.stdout
