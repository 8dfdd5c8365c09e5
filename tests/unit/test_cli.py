"""The CLI contract: --help everywhere, init/check, config errors with paths, exit codes."""

import json

import pytest

from mqi_framework.testing import run_cli
from mqi_framework.workspace import fast_config, starter_config_text, write_workspace

SUBCOMMANDS = ["init", "check", "run", "worker", "cases", "case", "retry", "cancel", "dlq", "status", "backup", "demo"]


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_help_everywhere(command):
    proc = run_cli(command, "--help")
    assert proc.returncode == 0, proc.stderr
    assert "usage: mqi-host" in proc.stdout


def test_no_command_prints_help_and_exits_2():
    proc = run_cli()
    assert proc.returncode == 2 and "COMMAND" in proc.stdout


def test_init_writes_a_config_that_checks(tmp_path):
    proc = run_cli("init", str(tmp_path / "site"))
    assert proc.returncode == 0, proc.stderr
    config = tmp_path / "site" / "mqi.yaml"
    assert config.read_text() == starter_config_text()
    assert (tmp_path / "site" / "inbox").is_dir()
    check = run_cli("check", "-c", str(config))
    assert check.returncode == 0, check.stdout + check.stderr
    assert "all checks passed" in check.stdout
    again = run_cli("init", str(tmp_path / "site"))
    assert again.returncode == 2 and "--force" in again.stderr


def test_quickstart_example_is_the_starter_config():
    from pathlib import Path

    example = Path(__file__).resolve().parents[2] / "examples" / "quickstart" / "mqi.yaml"
    assert example.read_text() == starter_config_text()


def test_malformed_config_names_path_and_line(tmp_path):
    text = starter_config_text().replace("      gpus: 2", "      gpus: two").replace(
        "  lease_seconds: 120", "  lease_seconds: 120\n  prot: 5")
    config = tmp_path / "mqi.yaml"
    config.write_text(text)
    proc = run_cli("check", "-c", str(config))
    assert proc.returncode == 2
    assert "broker.prot" in proc.stderr or "'prot'" in proc.stderr
    line = [i for i, t in enumerate(text.splitlines(), start=1) if t.startswith("  prot: 5")][0]
    assert f":{line}:" in proc.stderr
    fixed = "\n".join(t for t in config.read_text().splitlines() if not t.startswith("  prot: 5")) + "\n"
    config.write_text(fixed)
    proc = run_cli("check", "-c", str(config))
    assert proc.returncode == 2 and "workers.curate.settings.gpus" in proc.stdout + proc.stderr


def test_missing_plugin_names_config_key(tmp_path):
    data = fast_config()
    data["workers"]["execute"]["plugin"] = "ssh-not-installed"
    path = write_workspace(tmp_path, data)
    for command in ("check", "run"):
        proc = run_cli(command, "-c", str(path), timeout=30)
        out = proc.stdout + proc.stderr
        assert proc.returncode == 2, out
        assert "workers.execute.plugin" in out and "ssh-not-installed" in out


def test_run_refuses_a_plugin_settings_typo_with_the_message_check_gives(tmp_path):
    """Issue 19: a typo under a plugin's settings stopped only that worker, which then
    restarted forever; run now refuses to start, naming the key, as check does."""
    data = fast_config()
    data["workers"]["scan"]["settings"]["settle_secnds"] = 1
    path = write_workspace(tmp_path, data)
    check = run_cli("check", "-c", str(path), timeout=30)
    run = run_cli("run", "-c", str(path), timeout=30)
    assert check.returncode == 2 and run.returncode == 2, run.stdout + run.stderr
    assert "workers.scan.settings.settle_secnds" in check.stdout
    assert "workers.scan.settings.settle_secnds" in run.stderr and "not started" in run.stderr
    assert not (tmp_path / "host.lock").exists() or not (tmp_path / "logs" / "scan.log").exists()


def test_semantic_errors_are_reported_with_paths(tmp_path):
    data = fast_config()
    data["workflow"]["steps"][2]["command"] = "{python} {nonsense}"
    data["workflow"]["steps"][1]["worker"] = "nobody"
    path = write_workspace(tmp_path, data)
    proc = run_cli("check", "-c", str(path))
    assert proc.returncode == 2
    assert "workflow.steps.2.command" in proc.stderr and "{nonsense}" in proc.stderr
    assert "workflow.steps.1.worker" in proc.stderr and "'nobody'" in proc.stderr


def test_missing_config_file(tmp_path):
    proc = run_cli("cases", "-c", str(tmp_path / "none.yaml"))
    assert proc.returncode == 2 and "mqi-host init" in proc.stderr


def test_env_expansion_secret_not_leaked(tmp_path):
    text = starter_config_text().replace("url: sqlite:queue.db", "url: ${MQI_TEST_BROKER_URL}")
    (tmp_path / "inbox").mkdir()
    config = tmp_path / "mqi.yaml"
    config.write_text(text)
    proc = run_cli("check", "-c", str(config))
    assert proc.returncode == 2 and "MQI_TEST_BROKER_URL" in proc.stderr
    proc = run_cli("check", "-c", str(config), env={"MQI_TEST_BROKER_URL": "sqlite:other.db"})
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_cases_and_case_on_empty_workspace(tmp_path):
    path = write_workspace(tmp_path, fast_config())
    assert run_cli("check", "-c", str(path)).returncode == 0  # creates the database
    proc = run_cli("cases", "-c", str(path), "--json")
    assert proc.returncode == 0 and json.loads(proc.stdout) == []
    proc = run_cli("case", "nope", "-c", str(path))
    assert proc.returncode == 2 and "no case" in proc.stderr
    proc = run_cli("retry", "nope", "-c", str(path))
    assert proc.returncode == 1 and "no case" in proc.stderr


def test_dlq_commands_on_empty_queue(tmp_path):
    path = write_workspace(tmp_path, fast_config())
    proc = run_cli("dlq", "list", "-c", str(path), "--json")
    assert proc.returncode == 0 and json.loads(proc.stdout) == []
    assert run_cli("dlq", "replay", "-c", str(path)).returncode == 2
    proc = run_cli("dlq", "purge", "--all", "-c", str(path))
    assert proc.returncode == 0 and "purged 0" in proc.stdout


def test_generated_docs_are_current():
    from mqi_framework import docgen

    assert docgen.main(["--check"]) == 0, "run: python -m mqi_framework.docgen"


def test_cli_import_stays_light():
    # llm#732: heavy imports at start-up made --help slow; keep plugins and libraries lazy.
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-X", "importtime", "-c", "import mqi_framework.cli"],
                          capture_output=True, text=True, check=True)
    heavy = {"pydicom", "apscheduler", "flask", "paramiko", "pika", "waitress", "cattrs", "yaml"}
    imported = {line.split("|")[-1].strip().split(".")[0] for line in proc.stderr.splitlines()[1:]}
    assert not (heavy & imported), heavy & imported
    cumulative_us = [int(line.split("|")[1]) for line in proc.stderr.splitlines()[1:]
                     if line.split("|")[-1].strip() == "mqi_framework.cli"]
    assert cumulative_us and cumulative_us[0] < 300_000  # the CLI module with everything it imports


def test_the_cli_behaves_like_the_unix_tools_people_know(tmp_path):
    """Issue 19: a closed pipe is no error, a top-level --json is honoured, an unknown state is
    an error, `dlq` alone lists, every subcommand's --help says what it does."""
    import subprocess
    import sys

    path = write_workspace(tmp_path, fast_config())
    assert run_cli("check", "-c", str(path)).returncode == 0
    # the reader (`true`) is gone before the host writes a byte: every write meets a closed pipe
    piped = subprocess.run(["bash", "-c", f"{sys.executable} -m mqi_framework.cli --plugins --json | true; "
                                          "echo ${PIPESTATUS[0]}"], capture_output=True, text=True, timeout=60)
    assert "BrokenPipeError" not in piped.stderr and "Traceback" not in piped.stderr, piped.stderr
    assert piped.stdout.strip() == "141"  # 128 + SIGPIPE, as `cat` or `ls` would exit
    top = run_cli("--json", "cases", "-c", str(path))
    assert top.returncode == 0 and json.loads(top.stdout) == []
    assert run_cli("--json", "run", "-c", str(path)).returncode == 2
    bogus = run_cli("cases", "--state", "bogus", "-c", str(path))
    assert bogus.returncode == 2 and "no case state 'bogus'" in bogus.stderr and "done" in bogus.stderr
    assert run_cli("cases", "--state", "done", "-c", str(path)).returncode == 0
    dlq = run_cli("dlq", "-c", str(path))
    assert dlq.returncode == 0 and "empty" in dlq.stdout
    helped = run_cli("status", "--help")
    assert "Workers (heartbeats, restarts)" in helped.stdout


def test_a_cancelled_case_reads_right(tmp_path):
    """Issue 19: steps never run say so ("not run", not "attempt 0"), and a state is not
    repeated as its own message ("cancelled ... cancelled")."""
    import random
    import uuid

    from mqi_framework.conductor import Conductor
    from mqi_framework.config import load_config
    from mqi_framework.protocols import GpuReading
    from mqi_framework.store import open_state, transaction
    from mqi_framework.store import records as rec

    path = write_workspace(tmp_path, fast_config(gpus=1))
    loaded = load_config(path)
    conn = open_state(loaded.database_path)
    with transaction(conn):
        rec.record_gpu_readings(conn, "test", [GpuReading(host="h", index=0)])
    conductor = Conductor(loaded, conn, rng=random.Random(1))

    def send(body):
        conductor.handle_event(body, uuid.uuid4().hex)

    def last(queue):
        rows = [json.loads(r[0]) for r in conn.execute("SELECT body FROM outbox WHERE queue = ? ORDER BY id",
                                                       (queue,))]
        return [b for b in rows if b["type"] == "run_step"][-1]

    def finish(cmd, **extra):
        send({"type": "step.started", "step_id": cmd["step_id"], "attempt": cmd["attempt"]})
        send({"type": "step.finished", "step_id": cmd["step_id"], "attempt": cmd["attempt"], "outcome": "ok",
              **extra})

    plan = {"beams": [{"number": n, "name": f"B{n}", "delivery_dir": f"d{n}"} for n in (1, 2)], "missing": [],
            "info": {}, "inputs": {str(n): f"beams/{n}/moqui_tps_{n}.in" for n in (1, 2)}}
    send({"type": "case.seen", "name": "C1", "path": "/in/C1", "inbox": "/in"})
    finish(last("mqi.prepare"), data=plan)
    finish(last("mqi.transfer"))
    conductor.cancel("C1")
    conn.close()
    out = run_cli("case", "C1", "-c", str(path)).stdout
    assert "(not run)" in out and "(attempt 0)" not in out
    assert "beam 2: cancelled  by cli, before it ran" in out  # not "queued  waiting for a free GPU"
    assert not [line for line in out.splitlines() if line.count("cancelled") > 1]


def test_check_finds_a_simulator_that_is_not_installed(tmp_path):
    """Issue 19: `check` passed `tps_env` that does not exist; every beam then failed with a
    bare `exit code 127`."""
    path = write_workspace(tmp_path, fast_config())
    text = path.read_text()
    assert "{python} -m mqi_moqui.standin" in text
    path.write_text(text.replace("{python} -m mqi_moqui.standin", "tps_env_not_installed_here", 1))
    proc = run_cli("check", "-c", str(path))
    assert proc.returncode != 0
    assert "(simulate): tps_env_not_installed_here: command not found on this machine" in proc.stdout + proc.stderr
    path.write_text(text.replace("{python} -m mqi_moqui.standin", "/no/such/tps_env", 1))
    proc = run_cli("check", "-c", str(path))
    assert proc.returncode != 0 and "/no/such/tps_env: no such executable file" in proc.stdout + proc.stderr
    # the problem names the line of the command to fix, as the YAML checks do (issue 19)
    line = next(n for n, text_line in enumerate(path.read_text().splitlines(), 1) if "/no/such/tps_env" in text_line)
    assert f"problem: mqi.yaml:{line}: workflow.steps[2] (simulate)" in proc.stdout


@pytest.mark.parametrize("command, program", [
    ("CUDA_VISIBLE_DEVICES={gpu} tps_env {input_file}", "tps_env"),
    ("A=1 B='x y' /opt/moqui/bin/tps_env {input_file}", "/opt/moqui/bin/tps_env"),
    ("{engine} {input_file}", None),
])
def test_the_program_of_a_step_command(command, program):
    from mqi_framework.cli.setup_commands import step_program

    assert step_program(command) == program


def test_case_shows_what_the_interpreter_noted(tmp_path):
    """Findings of the interpretation (beams not simulated, delivery analysis) were only in
    --json; `mqi-host case` prints them as notes."""
    from mqi_framework.config import load_config
    from mqi_framework.store import open_state, transaction

    path = write_workspace(tmp_path, fast_config())
    conn = open_state(load_config(path).database_path)
    info = {"notes": ["beam 2: delivery layer 5: spot position off by up to 2.00 mm (mean +2.00, +0.00 mm)"]}
    with transaction(conn):
        conn.execute("INSERT INTO cases(uid, name, inbox, path, state, detected_at, updated_at, info) "
                     "VALUES ('case-000001', 'C1', '/in', '/in/C1', 'running', 0, 0, ?)", (json.dumps(info),))
    conn.close()
    proc = run_cli("case", "case-000001", "-c", str(path))
    assert proc.returncode == 0, proc.stderr
    assert "  notes:\n    beam 2: delivery layer 5: spot position off by up to 2.00 mm" in proc.stdout
