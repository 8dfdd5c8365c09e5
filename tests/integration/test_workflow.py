"""End to end: `mqi-host run` in real subprocesses over generated cases, on real SQLite files.

Each test runs its own workspace and host; the host is always stopped, and detached jobs
are killed, when the test ends.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import pytest

from mqi_framework.testing import Workspace, wait_final
from mqi_framework.workspace import fast_config, wait_until

pytestmark = pytest.mark.integration

samples = pytest.importorskip("mqi_moqui.samples")
generate_case, delivery_dir_of = samples.generate_case, samples.delivery_dir_of


def assert_outputs(ws: Workspace, case: dict) -> None:
    assert samples.outputs_missing(ws.folder, case) == []


def simulate_attempts(ws: Workspace) -> list[int]:
    return [r[0] for r in ws.query("SELECT attempt FROM steps WHERE name = 'simulate'")]


def running_simulations(ws: Workspace) -> int:
    rows = ws.query("SELECT COUNT(*) FROM steps WHERE name = 'simulate' AND state = 'running'")
    return rows[0][0] if rows else 0


# ------------------------------------------------------------------------------------- tests


def test_three_cases_end_to_end(ws, host_factory):
    for i in range(3):
        generate_case(ws.inbox, f"CASE-{i}", seed=i)
    host = host_factory()
    cases = wait_final(ws, 3)
    for case in cases.values():
        assert case["state"] == "done", case
        assert [b["state"] for b in case["beams"]] == ["done"] * 3  # the setup beam is not simulated
        assert_outputs(ws, case)
    assert host.stop() == 0
    assert ws.gpu_allocations() == []
    assert simulate_attempts(ws) == [1] * 9
    workers = {r["name"]: r["state"] for r in ws.query("SELECT name, state FROM workers")}
    assert workers["conductor"] == "stopped" and workers["execute"] == "stopped"


def test_worker_killed_mid_beam_reattaches(ws, host_factory):
    generate_case(ws.inbox, "KILLED", seed=7)
    host = host_factory(env={"MQI_STANDIN_SECONDS": "4"})

    assert wait_until(lambda: running_simulations(ws) > 0, 60), ws.logs()
    pid = ws.query("SELECT pid FROM workers WHERE name = 'execute'")[0][0]
    os.kill(pid, signal.SIGKILL)
    case = wait_final(ws, 1)["KILLED"]
    assert case["state"] == "done", case
    assert_outputs(ws, case)
    assert simulate_attempts(ws) == [1, 1, 1]  # re-attached: no beam ran twice
    restarts = ws.query("SELECT restarts FROM workers WHERE name = 'execute'")[0][0]
    events = [r[0] for r in ws.query("SELECT message FROM events WHERE kind = 'worker.restart'")]
    assert restarts >= 1 and any("execute" in e for e in events)
    # issue 19: the case's own audit log says its running jobs were re-attached
    shown = ws.cli("case", case["id"], "--events")
    assert shown.returncode == 0 and "step.reattached" in shown.stdout and "re-attached (not started again)" in shown.stdout
    assert host.stop() == 0
    assert ws.gpu_allocations() == []


def test_host_killed_and_restarted_does_not_rerun_beams(ws, host_factory):
    generate_case(ws.inbox, "RESTART", seed=8)
    host = host_factory(env={"MQI_STANDIN_SECONDS": "4"})

    assert wait_until(lambda: running_simulations(ws) >= 2, 60), ws.logs()
    host.kill_everything()
    host_factory(env={"MQI_STANDIN_SECONDS": "4"})
    case = wait_final(ws, 1)["RESTART"]
    assert case["state"] == "done", case
    assert_outputs(ws, case)
    assert simulate_attempts(ws) == [1, 1, 1]
    started = [p for p in (ws.folder / "jobs").iterdir() if "simulate" in p.name]
    assert len(started) == 3


def test_hostile_case_name_is_data(ws, host_factory, tmp_path):
    name = "it's a \"case\"; $(touch PWNED) `touch PWNED2` & echo"
    generate_case(ws.inbox, name, seed=3)
    host_factory()
    case = wait_final(ws, 1)[name]
    assert case["state"] == "done", case
    assert_outputs(ws, case)
    for root in (ws.folder, tmp_path, Path.cwd()):
        assert not list(root.rglob("PWNED*"))
    # the folder name (possibly a patient id) stays out of the logs and remote paths
    for log in (ws.folder / "logs").glob("*.log"):
        assert "touch PWNED" not in log.read_text(errors="replace")
    assert not any("PWNED" in str(p) for p in (ws.folder / "remote").rglob("*"))


def test_incomplete_case_is_flagged_and_not_run_then_completes(tmp_path, host_factory):
    config = fast_config(overrides={"cases": {"incomplete_flag_after_seconds": 1.0, "incomplete_recheck_seconds": 0.5}})
    workspace = Workspace(tmp_path / "ws", config)
    case_dir = generate_case(workspace.inbox, "PARTIAL", seed=5, missing_beams=(2,))
    host = host_factory(workspace=workspace)

    def flagged() -> bool:
        case = workspace.cases_by_name().get("PARTIAL") if (workspace.folder / "state.db").exists() else None
        return bool(case and case["state"] == "incomplete" and case["attention"])

    assert wait_until(flagged, 30), workspace.logs()
    case = workspace.cases_by_name()["PARTIAL"]
    assert {b["number"]: b["state"] for b in case["beams"]}[2] == "missing"
    assert simulate_attempts(workspace) == []  # never half-run
    # the missing delivery arrives: the case goes on by itself
    full = generate_case(tmp_path / "other", "PARTIAL", seed=5)
    src = delivery_dir_of(full, 2)
    shutil.copytree(src, case_dir / src.name)
    case = wait_final(workspace, 1)["PARTIAL"]
    assert case["state"] == "done", case
    assert_outputs(workspace, case)
    host.stop()
    workspace.kill_jobs()


def test_nonzero_exit_with_success_log_fails_the_case(ws, host_factory):
    case_dir = generate_case(ws.inbox, "LIAR", seed=4)
    (delivery_dir_of(case_dir, 2) / "STANDIN_MODE").write_text("lying")
    host_factory()
    case = wait_final(ws, 1)["LIAR"]
    assert case["state"] == "failed", case
    beams = {b["number"]: b for b in case["beams"]}
    assert beams[2]["state"] == "failed" and "exit code 3" in beams[2]["message"]
    assert case["attention"]
    detail = json.loads(ws.cli("case", case["id"], "--json", check=True).stdout)
    sim2 = [s for s in detail["steps"] if s["step"] == "simulate" and s["beam"] == 2][0]
    assert sim2["attempt"] == 2 and len(sim2["attempts"]) == 2  # retried per policy, then failed
    assert ws.gpu_allocations() == []
    # retry after fixing the input runs only the failed beam again
    (delivery_dir_of(case_dir, 2) / "STANDIN_MODE").unlink()
    staged = ws.folder / "staging" / case["id"] / "beams" / "2" / "logs" / "STANDIN_MODE"
    staged.unlink()
    (ws.folder / "remote" / case["id"] / "beams" / "2" / "logs" / "STANDIN_MODE").unlink()
    assert ws.cli("retry", case["id"]).returncode == 0
    case = wait_final(ws, 1)["LIAR"]
    assert case["state"] == "done", case


def test_cancel_kills_running_jobs_and_releases_gpus(ws, host_factory):
    case_dir = generate_case(ws.inbox, "HANGS", seed=6)
    for beam in (1, 2, 3):
        (delivery_dir_of(case_dir, beam) / "STANDIN_MODE").write_text("hang")
    host_factory()

    assert wait_until(lambda: running_simulations(ws) >= 2, 60), ws.logs()
    proc = ws.cli("cancel", "HANGS", "--json")
    assert proc.returncode == 0, proc.stderr
    case = wait_final(ws, 1)["HANGS"]
    assert case["state"] == "cancelled"
    assert {b["state"] for b in case["beams"]} == {"cancelled"}
    assert ws.gpu_allocations() == []
    for pid_file in (ws.folder / "jobs").glob("*/pid"):
        assert (pid_file.parent / "exit_code").exists(), f"{pid_file.parent.name} still running"


def failed_steps_of_one_case(tmp_path, host_factory, config, name: str, seed: int) -> list:
    """Run one sample case on ``config``; it must fail: its failed steps (attempt, message)."""
    ws = Workspace(tmp_path / "ws", config)
    generate_case(ws.inbox, name, seed=seed)
    host_factory(workspace=ws)
    case = wait_final(ws, 1)[name]
    assert case["state"] == "failed"
    return ws.query("SELECT s.attempt, s.message FROM steps s JOIN cases c ON c.id = s.case_id "
                    "WHERE c.uid = ? AND s.state = 'failed'", case["id"])


def test_a_deterministic_engine_failure_is_not_retried_and_names_its_cause(tmp_path, host_factory):
    """Issue 14.5: upstream's "Valid machine is not available." (exit 134) fails the same way
    on every attempt: the step fails at once with the engine's reason, not "exit code 134"."""
    config = fast_config(overrides={"workers": {"prepare": {"settings": {"default_machine": "SMC:G1"}}}})
    rows = failed_steps_of_one_case(tmp_path, host_factory, config, "NOMODEL", 3)
    assert rows and all(r["attempt"] == 1 for r in rows)  # retry.max_attempts is 2: not used
    assert any("no model of the plan's treatment machine" in r["message"] and "exit code 134" in r["message"]
               for r in rows)


def test_beams_of_a_failed_case_say_how_far_they_got(tmp_path, host_factory):
    """Issue 19: a beam that had simulated read "cancelled — not run: step simulate failed for
    beam 2" beside "simulate: done, exit 0" when a sibling failed."""
    config = fast_config(gpus=2)
    config["workflow"]["steps"][2]["retry"]["max_attempts"] = 1
    ws = Workspace(tmp_path / "ws", config)
    case_dir = generate_case(ws.inbox, "ONEBAD", seed=4)
    (samples.delivery_dir_of(case_dir, 2) / "STANDIN_MODE").write_text("fail")
    host_factory(workspace=ws)
    case = wait_final(ws, 1)["ONEBAD"]
    assert case["state"] == "failed"
    beams = {b["number"]: b for b in case["beams"]}
    assert beams[2]["state"] == "failed"
    simulated = ws.query("SELECT s.beam_number FROM steps s JOIN cases c ON c.id = s.case_id WHERE c.uid = ? "
                         "AND s.name = 'simulate' AND s.state = 'done'", case["id"])
    assert simulated, "a sibling beam should have finished its simulation"
    for row in simulated:
        message = beams[row["beam_number"]]["message"]
        assert message.startswith("stopped after simulate (done): step simulate failed for beam 2"), message
        assert "not run" not in message
    for number, beam in beams.items():
        if number != 2 and number not in {r["beam_number"] for r in simulated}:
            assert beam["message"].startswith("not run: ") or beam["state"] == "done"


def test_a_simulator_that_is_not_installed_fails_at_once_and_says_so(tmp_path, host_factory):
    """Issue 19: a simulator command that does not exist failed every beam with a bare "exit
    code 127", retried; "not found" was only in the log tail."""
    config = fast_config()
    config["workflow"]["steps"][2]["command"] = "CUDA_VISIBLE_DEVICES={gpu} no-such-tps-env {input_file}"
    rows = failed_steps_of_one_case(tmp_path, host_factory, config, "NOENGINE", 8)
    assert rows and all(r["attempt"] == 1 for r in rows)  # permanent: retry.max_attempts 2 not used
    assert all("exit code 127: the command's program was not found" in r["message"]
               and "no-such-tps-env" in r["message"] for r in rows), rows
