"""The nvidia-smi curator through a fake nvidia-smi executable on PATH: health, eligibility,
failures and hangs, the interval scheduler, and what the state database records."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from mqi_framework.configload import ConfigError
from mqi_framework.plugins import build
from mqi_framework.protocols import PluginContext
from mqi_framework.store import open_state, transaction
from mqi_framework.store import records as rec
from mqi_framework.workspace import wait_until
from mqi_gpu.curator import GpuHostSettings, NvidiaSmiCurator, NvidiaSmiSettings


def curator(tmp_path: Path, **settings) -> NvidiaSmiCurator:
    settings.setdefault("interval_seconds", 0)
    settings.setdefault("min_free_memory_mb", 2048)
    settings.setdefault("max_utilization_pct", 20)
    return NvidiaSmiCurator(NvidiaSmiSettings(**settings), PluginContext(workspace=tmp_path))


def by_index(readings):
    return {r.index: r for r in readings}


def test_runs_the_documented_query_without_a_shell(tmp_path, fake_smi):
    fake_smi.serve("gpus2_rtx_a6000.out")
    gpus = curator(tmp_path).observe()
    assert [(g.host, g.index, g.healthy, g.eligible) for g in gpus] == [("localhost", 0, True, True),
                                                                          ("localhost", 1, True, True)]
    assert gpus[0].uuid == "GPU-3f8b2c1e-5a7d-4e9b-8c2f-1d6a9e4b7c30" and gpus[0].memory_free_mb == 48675
    assert len(fake_smi.calls()) == 1  # the fake refuses any other arguments


def test_busy_gpus_are_healthy_but_not_eligible(tmp_path, fake_smi):
    fake_smi.serve("gpus4_v100_one_busy.out")
    gpus = by_index(curator(tmp_path).observe())
    assert [gpus[i].eligible for i in range(4)] == [True, False, True, False]
    assert all(g.healthy for g in gpus.values())
    assert "free memory 1982 MiB < 2048 MiB" in gpus[1].note and "utilization 100% > 20%" in gpus[1].note
    assert gpus[3].note == "utilization 37% > 20%"
    relaxed = by_index(curator(tmp_path, max_utilization_pct=50, min_free_memory_mb=0).observe())
    assert [relaxed[i].eligible for i in range(4)] == [True, False, True, True]


def test_eight_gpus_and_exclusions(tmp_path, fake_smi):
    fake_smi.serve("gpus8_a100.out")
    gpus = by_index(curator(tmp_path, hosts=[GpuHostSettings(name="gpu-a", exclude=[7])]).observe())
    assert len(gpus) == 8 and {g.host for g in gpus.values()} == {"gpu-a"}
    assert [i for i, g in gpus.items() if g.eligible] == [0, 1, 3, 4, 5, 6]
    assert gpus[7].note == "excluded by the config (exclude)"


def test_unknown_values(tmp_path, fake_smi):
    fake_smi.serve("na_fields.out")
    geforce, t4 = curator(tmp_path).observe()
    assert geforce.healthy and geforce.eligible  # utilisation not reported: judged by memory alone
    assert t4.healthy and not t4.eligible and t4.note == "free memory unknown (nvidia-smi reports N/A)"
    _, t4_no_minimum = curator(tmp_path, min_free_memory_mb=0).observe()
    assert t4_no_minimum.eligible


def test_mig_gpu_is_scheduled_as_a_whole_gpu(tmp_path, fake_smi):
    fake_smi.serve("mig_instances.out")
    gpus = curator(tmp_path).observe()
    assert [(g.index, g.healthy, g.eligible, g.utilization_pct) for g in gpus] == [(0, True, True, None),
                                                                                   (1, True, True, 0)]


def test_lost_gpu_is_unhealthy(tmp_path, fake_smi):
    fake_smi.serve("gpu_lost.out")
    gpus = by_index(curator(tmp_path).observe())
    assert gpus[0].healthy and not gpus[1].healthy and not gpus[2].healthy
    assert "GPU is lost" in gpus[1].note and "Unknown Error" in gpus[2].note


def test_failing_command_makes_known_gpus_unhealthy_and_recovers(tmp_path, fake_smi):
    cur = curator(tmp_path)
    fake_smi.serve("gpus2_rtx_a6000.out")
    assert all(g.healthy for g in cur.observe())
    fake_smi.serve("no_driver.out")
    failed = cur.observe()
    assert [g.index for g in failed] == [0, 1] and not any(g.healthy or g.eligible for g in failed)
    assert "exit code 9: NVIDIA-SMI has failed because it couldn't communicate" in failed[0].note
    fake_smi.serve("no_devices.out")
    assert "exit code 6: No devices were found" in cur.observe()[0].note
    fake_smi.serve("gpus2_rtx_a6000.out")
    assert all(g.healthy and g.eligible and g.note == "" for g in cur.observe())


def test_partial_listing_with_nonzero_exit_keeps_the_gpus_it_lists(tmp_path, fake_smi):
    fake_smi.serve("handle_error.out")
    gpus = curator(tmp_path).observe()
    assert [(g.index, g.healthy) for g in gpus] == [(0, True)]  # GPU 1 is missing: the store marks it unhealthy


def test_hanging_command_is_killed_after_the_timeout(tmp_path, fake_smi):
    cur = curator(tmp_path, timeout_seconds=0.5)
    fake_smi.serve("gpus2_rtx_a6000.out")
    cur.observe()
    fake_smi.hang(30)
    started = time.monotonic()
    gpus = cur.observe()
    assert time.monotonic() - started < 5
    assert not any(g.healthy for g in gpus) and "timed out after 0.5s" in gpus[0].note


def test_missing_command_is_a_problem_not_a_crash(tmp_path, fake_smi):
    cur = curator(tmp_path, hosts=[GpuHostSettings(command=str(tmp_path / "no-such-nvidia-smi"))])
    assert cur.observe() == []
    assert "command not found" in cur.check()[0]


def test_check_reports_problems_per_host(tmp_path, fake_smi):
    fake_smi.serve("gpus2_rtx_a6000.out")
    assert curator(tmp_path).check() == []
    fake_smi.serve("no_driver.out")
    assert curator(tmp_path).check() == ["host localhost: nvidia-smi locally failed: exit code 9: NVIDIA-SMI has "
                                         "failed because it couldn't communicate with the NVIDIA driver. Make sure "
                                         "that the latest NVIDIA driver is installed and running."]
    bad = curator(tmp_path, hosts=[GpuHostSettings(name="a"), GpuHostSettings(name="a")], max_utilization_pct=120)
    assert bad.check() == ["hosts: 'a' is listed twice", "max_utilization_pct must be 0..100, got 120"]


def test_ssh_host_without_mqi_ssh_is_a_clear_problem(tmp_path, fake_smi, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_mqi_ssh(name, *args, **kwargs):
        if name.startswith("mqi_ssh"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_mqi_ssh)
    monkeypatch.setattr("importlib.import_module", lambda name: no_mqi_ssh(name))
    fake_smi.serve("gpus2_rtx_a6000.out")
    cur = curator(tmp_path, hosts=[GpuHostSettings(name="gpu1", ssh={"hostname": "gpu1.example"}),
                                   GpuHostSettings(name="localhost")])
    (problem,) = cur.check()
    assert problem.startswith("host gpu1: `ssh:` needs the mqi-ssh plugin")
    assert [g.host for g in cur.observe()] == ["localhost", "localhost"]  # the local host still works


def test_scheduler_reads_each_host_on_its_interval(tmp_path, fake_smi):
    fake_smi.serve("gpus2_rtx_a6000.out")
    cur = curator(tmp_path, interval_seconds=0.2)
    try:
        first = cur.observe()  # the first call reads now
        assert len(first) == 2 and len(fake_smi.calls()) == 1
        assert wait_until(lambda: len(fake_smi.calls()) >= 3, 5)
        fake_smi.serve("gpu_lost.out")
        assert wait_until(lambda: any(not g.healthy for g in cur.observe()), 5)
        calls = len(fake_smi.calls())
        cur.observe()
        assert len(fake_smi.calls()) - calls <= 1  # observe() itself runs nothing
    finally:
        cur.close()


def test_a_host_that_stops_answering_goes_unhealthy(tmp_path, fake_smi):
    fake_smi.serve("gpus2_rtx_a6000.out")
    cur = curator(tmp_path, interval_seconds=0.1, timeout_seconds=0.3)
    try:
        assert all(g.healthy for g in cur.observe())
        fake_smi.hang(30)
        assert wait_until(lambda: not any(g.healthy for g in cur.observe()), 5)
    finally:
        fake_smi.hang(None)
        cur.close()


def test_readings_and_disappearing_gpus_in_the_state_database(tmp_path, fake_smi):
    conn = open_state(tmp_path / "state.db")
    cur = curator(tmp_path)

    def record():
        with transaction(conn):
            rec.record_gpu_readings(conn, "nvidia-smi:curate", cur.observe(),
                                    history_spacing=cur.history_spacing_seconds, history_keep=cur.history_keep_seconds)
        return {g["idx"]: g for g in rec.gpus(conn)}

    fake_smi.serve("gpus4_v100_one_busy.out")
    gpus = record()
    assert [(i, g["healthy"], g["eligible"]) for i, g in gpus.items()] == [(0, 1, 1), (1, 1, 0), (2, 1, 1), (3, 1, 0)]
    with transaction(conn):
        first, second = rec.allocate_gpu(conn, 101), rec.allocate_gpu(conn, 102)
        assert (first["idx"], second["idx"], rec.allocate_gpu(conn, 103)) == (0, 2, None)
    fake_smi.serve("gpus2_rtx_a6000.out")  # GPUs 2 and 3 disappear
    gpus = record()
    assert [(i, g["healthy"]) for i, g in gpus.items()] == [(0, 1), (1, 1), (2, 0), (3, 0)]
    assert "not reported by nvidia-smi:curate" in gpus[2]["note"]
    assert len(rec.gpu_history(conn, since=0)) == 4  # one row per GPU within the spacing


def test_settings_come_from_the_config_with_paths_in_errors(tmp_path):
    context = PluginContext(workspace=tmp_path)
    from mqi_framework.plugins import PluginHost
    from mqi_gpu import plugin

    host = PluginHost(load_entry_points=False)
    host.register(plugin, name="gpu")
    built = build("curator", "nvidia-smi", {"hosts": [{"name": "gpu1", "exclude": [0]}], "min_free_memory_mb": 4096},
                  context, config_key="workers.curate", plugin_host=host)
    assert isinstance(built, NvidiaSmiCurator)
    assert built.settings.hosts[0].exclude == [0] and built.settings.min_free_memory_mb == 4096
    with pytest.raises(ConfigError, match=r"workers.curate.settings.timeout_seconds"):
        build("curator", "nvidia-smi", {"timeout_seconds": "soon"}, context, config_key="workers.curate",
              plugin_host=host)


def test_ssh_host_through_an_mqi_ssh_connection(tmp_path, fake_smi, monkeypatch):
    """The remote path with a stand-in for mqi-ssh's connection that runs the command in a
    local shell: the argv is joined into one quoted command, the result is parsed the same."""
    import subprocess
    import sys
    import types

    commands: list[str] = []

    class ShellConnection:
        def __init__(self, settings):
            self.settings = settings

        def run(self, command, timeout):
            commands.append(command)
            proc = subprocess.run(["sh", "-c", command], capture_output=True, text=True, timeout=timeout)
            return proc.returncode, proc.stdout, proc.stderr

        def close(self):
            pass

    package, connection = types.ModuleType("mqi_ssh"), types.ModuleType("mqi_ssh.connection")
    connection.connect = ShellConnection  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "mqi_ssh", package)
    monkeypatch.setitem(sys.modules, "mqi_ssh.connection", connection)
    fake_smi.serve("gpus8_a100.out")
    cur = curator(tmp_path, hosts=[GpuHostSettings(name="gpu2", ssh={"hostname": "gpu2.clinic"})])
    assert cur.check() == []
    gpus = cur.observe()
    assert len(gpus) == 8 and {g.host for g in gpus} == {"gpu2"} and not gpus[2].eligible
    assert commands[-1] == ("nvidia-smi --query-gpu=index,uuid,name,memory.total,memory.used,memory.free,"
                            "temperature.gpu,utilization.gpu --format=csv,noheader,nounits")
    fake_smi.serve("no_driver.out")
    assert "over SSH on gpu2 failed: exit code 9" in cur.observe()[0].note


def test_ssh_host_over_a_real_sshd(tmp_path, fake_smi, request):
    """nvidia-smi read over mqi-ssh's shared connection to a real sshd (the fake nvidia-smi
    lies on the "remote" host at a path given by ``command:``)."""
    pytest.importorskip("mqi_ssh.connection")
    sshd = request.getfixturevalue("sshd_running")
    fake_smi.serve("gpus8_a100.out")
    host = GpuHostSettings(name="gpu1", ssh=sshd.host_settings(), command=str(fake_smi.bin / "nvidia-smi"))
    cur = curator(tmp_path, hosts=[host])
    try:
        assert cur.check() == []
        gpus = cur.observe()
        assert len(gpus) == 8 and {g.host for g in gpus} == {"gpu1"} and not gpus[2].eligible
        fake_smi.serve("no_driver.out")
        assert "over SSH on gpu1 failed: exit code 9" in cur.observe()[0].note
        sshd.stop()
        note = cur.observe()[0].note
        assert "SSH to gpu1 failed" in note or "cannot reach" in note
    finally:
        sshd.start()
        cur.close()
