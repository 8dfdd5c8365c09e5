"""Plugin manager: entry-point loading, registry, lookup errors, --plugins listing."""

import json
import types

import pytest

from mqi_framework import hookimpl, hookspecs
from mqi_framework import protocols as p
from mqi_framework.plugins import PluginError, PluginHost
from mqi_framework.testing import run_cli

BUILTINS = {"core.fs", "core.local-transfer", "core.local-executor", "core.standin-gpus", "core.sqlite-archive"}


class DummyScanner(p.Scanner):
    name = "test.dummy"

    def scan(self):
        return []


class DummyPlugin:
    @hookimpl
    def mqi_register_scanners(self, register):
        register(DummyScanner)


def test_every_hookspec_has_a_docstring():
    for name, fn in hookspecs.hook_docs().items():
        assert fn.__doc__ and len(fn.__doc__.strip()) > 40, name
        assert ":param" in fn.__doc__ and "Called" in fn.__doc__, name


def test_builtins_load_through_entry_points():
    host = PluginHost()
    listing = {item["name"]: item for item in host.get_plugins()}
    assert BUILTINS <= set(listing)
    for name in BUILTINS:
        assert listing[name]["status"] == "ok", listing[name]
        assert listing[name]["source"] == "builtin"
        assert listing[name]["distribution"] == "mqi-host"
    assert "scanner core.fs" in listing["core.fs"]["provides"]
    assert "mqi_register_scanners" in listing["core.fs"]["hooks"]
    assert host.lookup("executor", "core.local").__name__ == "LocalExecutor"
    assert host.lookup("transfer", "core.local").__name__ == "LocalTransfer"


def test_registered_plugin_is_found_and_unregistered(mqi_pm, register_plugin):
    register_plugin(DummyPlugin(), name="dummy")
    assert mqi_pm.lookup("scanner", "test.dummy") is DummyScanner
    mqi_pm.unregister("dummy")
    with pytest.raises(PluginError):
        mqi_pm.lookup("scanner", "test.dummy")


def test_lookup_error_names_config_key_and_installed(mqi_pm, register_plugin):
    register_plugin(DummyPlugin(), name="dummy")
    with pytest.raises(PluginError) as err:
        mqi_pm.lookup("scanner", "nope", config_key="workers.scan.plugin")
    text = str(err.value)
    assert "workers.scan.plugin" in text and "'nope'" in text and "test.dummy" in text


def test_wrong_kind_registration_is_reported(mqi_pm, register_plugin):
    class Bad:
        @hookimpl
        def mqi_register_executors(self, register):
            register(DummyScanner)  # a scanner is not an executor

    register_plugin(Bad(), name="bad")
    mqi_pm.registry()
    assert any("not a subclass of Executor" in e for e in mqi_pm.registry_errors)


def test_misspelt_hook_fails_loudly(mqi_pm):
    class Typo:
        @hookimpl
        def mqi_register_scaners(self, register):
            pass

    with pytest.raises(Exception, match="unknown hook"):
        mqi_pm.register(Typo(), name="typo")


def test_cli_plugins_json_lists_builtins_and_moqui():
    proc = run_cli("--plugins", "--json", check=True)
    names = {item["name"] for item in json.loads(proc.stdout)}
    assert BUILTINS <= names and "moqui" in names


def test_disable_switch_blocks_a_plugin():
    proc = run_cli("--plugins", "--json", env={"MQI_DISABLE_PLUGINS": "core.fs"}, check=True)
    listing = {item["name"]: item for item in json.loads(proc.stdout)}
    assert listing["core.fs"]["status"] == "disabled"


def test_broken_plugin_is_reported_not_fatal(tmp_path):
    # A real installed-looking distribution whose entry point raises on import.
    site = tmp_path / "site"
    (site / "brokenplugin").mkdir(parents=True)
    (site / "brokenplugin" / "__init__.py").write_text("raise RuntimeError('boom at import')\n")
    dist = site / "brokenplugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: brokenplugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[mqi_framework.plugins]\nbroken = brokenplugin\n")
    env = {"PYTHONPATH": str(site)}
    proc = run_cli("--plugins", "--json", env=env, check=True)
    listing = {item["name"]: item for item in json.loads(proc.stdout)}
    assert listing["broken"]["status"] == "failed"
    assert "boom at import" in listing["broken"]["error"]
    assert listing["core.fs"]["status"] == "ok"
    strict = run_cli("--plugins", env=dict(env, MQI_STRICT_PLUGINS="1"))
    assert strict.returncode == 2 and "boom at import" in strict.stderr
    assert run_cli("--help", env=env).returncode == 0


def test_a_misspelt_hook_in_an_installed_plugin_fails_that_plugin_only(tmp_path):
    site = tmp_path / "site"
    (site / "typoplugin").mkdir(parents=True)
    (site / "typoplugin" / "__init__.py").write_text(
        "from mqi_framework import hookimpl\n\n@hookimpl\ndef mqi_register_scaners(register):\n    pass\n")
    dist = site / "typoplugin-2.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: site-typo\nVersion: 2.0\n")
    (dist / "entry_points.txt").write_text("[mqi_framework.plugins]\nsite.typo = typoplugin\n")
    env = {"PYTHONPATH": str(site)}
    assert run_cli("--version", env=env).returncode == 0  # every command still works
    listing = {item["name"]: item for item in json.loads(run_cli("--plugins", "--json", env=env, check=True).stdout)}
    typo = listing["site.typo"]
    assert typo["status"] == "failed" and typo["distribution"] == "site-typo"
    assert "mqi_register_scaners" in typo["error"] and "no hookspec" in typo["error"]
    assert listing["core.fs"]["status"] == "ok"
    strict = run_cli("--plugins", env=dict(env, MQI_STRICT_PLUGINS="1"))
    assert strict.returncode == 2 and "site.typo" in strict.stderr and "site-typo" in strict.stderr


def test_case_state_changes_reach_plugins(tmp_path, mqi_pm, register_plugin):
    from mqi_framework.conductor import Conductor
    from mqi_framework.config import load_config
    from mqi_framework.store import open_state
    from mqi_framework.workspace import fast_config, write_workspace

    seen = []

    class Observer:
        @hookimpl
        def mqi_case_state_changed(self, case_id, old_state, new_state):
            seen.append((case_id, old_state, new_state))

    class Broken:
        @hookimpl
        def mqi_case_state_changed(self, case_id):
            raise RuntimeError("observer bug")

    register_plugin(Observer(), name="observer")
    register_plugin(Broken(), name="broken")
    loaded = load_config(write_workspace(tmp_path, fast_config()))
    conductor = Conductor(loaded, open_state(loaded.database_path),
                          notify=lambda **kw: mqi_pm.notify("mqi_case_state_changed", **kw))
    conductor.handle_event({"type": "case.seen", "name": "X", "path": "/i/X", "inbox": "/i"}, "m1")
    # a failing observer neither blocks the change nor the other observers
    assert seen == [("case-000001", "", "detected"), ("case-000001", "detected", "preparing")]


KIND_HOOKS = {
    "scanner": ("mqi_register_scanners", p.Scanner),
    "transfer": ("mqi_register_transfers", p.Transfer),
    "executor": ("mqi_register_executors", p.Executor),
    "curator": ("mqi_register_curators", p.Curator),
    "archiver": ("mqi_register_archivers", p.Archiver),
    "interpreter": ("mqi_register_interpreters", p.Interpreter),
    "service": ("mqi_register_services", p.Service),
}


@pytest.mark.parametrize("kind", sorted(KIND_HOOKS))
def test_every_registration_hook_registers_its_kind(kind, mqi_pm, register_plugin):
    hook_name, base = KIND_HOOKS[kind]
    cls = type(f"Dummy{kind.title()}", (base,), {"name": f"test.{kind}"})
    def register_it(register):
        register(cls)

    plugin = types.ModuleType(f"dummy_{kind}")
    setattr(plugin, hook_name, hookimpl(register_it))
    register_plugin(plugin, name=f"dummy-{kind}")
    assert mqi_pm.lookup(kind, f"test.{kind}") is cls
    assert mqi_pm.registry_errors == []


def test_a_plugin_whose_command_registration_raises_spares_help_and_the_other_commands(tmp_path):
    site = tmp_path / "site"
    (site / "badcommands").mkdir(parents=True)
    (site / "badcommands" / "__init__.py").write_text(
        "from mqi_framework import hookimpl\n\n@hookimpl\ndef mqi_register_commands(register):\n"
        "    raise RuntimeError('boom in register_commands')\n")
    dist = site / "badcommands-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: badcommands\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[mqi_framework.plugins]\nsite.badcommands = badcommands\n")
    proc = run_cli("--help", env={"PYTHONPATH": str(site)})
    assert proc.returncode == 0 and "demo" in proc.stdout  # mqi-moqui's command is still there
    assert "boom in register_commands" in proc.stderr  # and the failure is said, not hidden
