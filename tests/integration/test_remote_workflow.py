"""End to end over a real sshd: `mqi-host run` with the ``sftp`` transfer and the ``ssh``
executor (mqi-sftp, mqi-ssh) against the loopback server the test session starts.

The "GPU server" is this machine reached over SSH: cases are uploaded into a remote root,
the stand-in simulator runs detached through SSH, results come back over SFTP.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from mqi_framework.testing import Workspace, wait_final
from mqi_framework.workspace import fast_config, wait_until

pytestmark = pytest.mark.integration

pytest.importorskip("mqi_sftp.transfer")
pytest.importorskip("mqi_ssh.executor")
samples = pytest.importorskip("mqi_moqui.samples")


def remote_config(sshd, remote_root: Path, *, seconds: str = "0.5", command: str | None = None,
                  known_hosts: str | None = None, max_attempts: int = 2) -> dict:
    host = sshd.host_settings(root=str(remote_root))
    if known_hosts is not None:
        host["known_hosts"] = known_hosts
    config = fast_config(overrides={
        "workers": {
            "transfer": {"plugin": "sftp", "settings": {"hosts": {"gpu1": host}}},
            "execute": {"plugin": "ssh", "interval_seconds": 0.2,
                        "settings": {"hosts": {"gpu1": host}, "kill_grace_seconds": 1,
                                     "poll_interval_seconds": 0.2}},
        },
    })
    config["workflow"]["remote_root"] = str(remote_root / "cases")
    for step in config["workflow"]["steps"]:
        if step["name"] == "simulate":
            step["env"] = {"MQI_STANDIN_SECONDS": seconds}  # remote jobs do not inherit the host's environment
            step["retry"] = {"max_attempts": max_attempts, "backoff_seconds": 0.2}
            if command is not None:
                step["command"] = command
    return config


@pytest.fixture
def remote_root(tmp_path):
    root = tmp_path / "gpu server root"
    root.mkdir()
    yield root
    from mqi_ssh.testing import kill_remote_jobs

    kill_remote_jobs(root)


def simulate_attempts(ws: Workspace) -> list[int]:
    return [r[0] for r in ws.query("SELECT attempt FROM steps WHERE name = 'simulate'")]


def running_simulations(ws: Workspace) -> int:
    rows = ws.query("SELECT COUNT(*) FROM steps WHERE name = 'simulate' AND state = 'running'")
    return rows[0][0] if rows else 0


def test_case_over_ssh_and_sftp_end_to_end(tmp_path, sshd_running, remote_root, host_factory):
    name = "it's a \"case\"; $(touch PWNED) `touch PWNED2` & echo"
    ws = Workspace(tmp_path / "ws", remote_config(sshd_running, remote_root))
    check = ws.cli("check")
    assert check.returncode == 0, check.stdout + check.stderr
    assert f"host key ssh-ed25519 {sshd_running.fingerprint()} is known" in check.stdout
    samples.generate_case(ws.inbox, name, seed=3)
    host = host_factory(workspace=ws)
    case = wait_final(ws, 1)[name]
    assert case["state"] == "done", (case, ws.logs())
    assert samples.outputs_missing(ws.folder, case) == []
    assert simulate_attempts(ws) == [1, 1, 1]
    remote_case = remote_root / "cases" / case["id"]
    assert remote_case.is_dir() and (remote_case / ".mqi-manifest.json").exists()
    logs = sorted((remote_root / ".mqi-jobs").glob("*simulate*/output.log"))
    assert len(logs) == 3 and all(log.read_text().count("Time taken by MC engine") == 1 for log in logs)
    for root in (ws.folder, tmp_path, Path.cwd()):
        assert not list(root.rglob("PWNED*"))
    assert not any("PWNED" in str(p) for p in remote_root.rglob("*"))  # remote paths carry the case id only
    assert host.stop() == 0


def test_no_identifier_leaves_the_host_over_sftp(tmp_path, sshd_running, remote_root, host_factory):
    """Issue 15.1: a plan and deliveries carrying identity in every place a real export does;
    every byte and every name that reached the GPU server is searched for each identifier."""
    ws = Workspace(tmp_path / "ws", remote_config(sshd_running, remote_root))
    case_dir = samples.generate_case(ws.inbox, "Leakname^Anna 0021", seed=21, ready_marker=False)
    leaks = samples.plant_identity(case_dir, seed=21) + ["Leakname^Anna 0021"]
    (case_dir / "_CASE_READY").touch()
    host_factory(workspace=ws)
    case = wait_final(ws, 1)["Leakname^Anna 0021"]
    assert case["state"] == "done", (case, ws.logs())
    sent = [p for p in remote_root.rglob("*") if p.is_file()]
    assert len(sent) > 10
    for path in sent:
        data = path.read_bytes()
        for leak in leaks:
            assert leak.encode() not in data, f"{leak!r} in {path}"
            assert leak not in str(path.relative_to(remote_root)), f"{leak!r} in the remote name {path}"


def test_server_down_during_upload_then_back(tmp_path, sshd_running, remote_root, host_factory):
    ws = Workspace(tmp_path / "ws", remote_config(sshd_running, remote_root))
    ws.config["broker"]["max_attempts"] = 20  # the server stays away for a while: keep retrying
    ws.rewrite(ws.config)
    sshd_running.stop()
    try:
        samples.generate_case(ws.inbox, "AWAY", seed=4)
        host_factory(workspace=ws)
        transfer_log = ws.folder / "logs" / "transfer.log"
        assert wait_until(lambda: transfer_log.exists() and "cannot reach" in transfer_log.read_text(), 60), ws.logs()
    finally:
        sshd_running.start()
    case = wait_final(ws, 1, timeout=120)["AWAY"]
    assert case["state"] == "done", (case, ws.logs())
    assert samples.outputs_missing(ws.folder, case) == []


def test_server_stopped_in_the_middle_of_an_upload_then_resumed(tmp_path, sshd_running, remote_root, host_factory):
    ws = Workspace(tmp_path / "ws", remote_config(sshd_running, remote_root))
    ws.config["broker"]["max_attempts"] = 20
    ws.rewrite(ws.config)
    # the delivery logs are staged for upload: 160 MB make an upload that takes a while
    samples.generate_case(ws.inbox, "BIG", seed=10, treatment_beams=1, log_bytes=160_000_000)
    host_factory(workspace=ws)
    cases = remote_root / "cases"

    def part_growing() -> bool:
        return any(p.stat().st_size > 5_000_000 for p in cases.rglob("*.part")) if cases.exists() else False

    assert wait_until(part_growing, 120, 0.01), ws.logs()
    sshd_running.stop()
    try:
        assert wait_until(lambda: "resumes on the next attempt" in (ws.folder / "logs" / "transfer.log").read_text(),
                          30), ws.logs()
        parts = {p: p.stat().st_size for p in cases.rglob("*.part")}
        assert parts and all(size > 0 for size in parts.values())
    finally:
        sshd_running.start()
    case = wait_final(ws, 1, timeout=180)["BIG"]
    assert case["state"] == "done", (case, ws.logs())
    assert samples.outputs_missing(ws.folder, case) == []
    assert not list(cases.rglob("*.part"))
    upload = ws.query("SELECT message FROM steps WHERE name = 'upload'")[0][0]
    assert "file(s)" in upload


def test_connection_dropped_and_worker_killed_while_beams_run_reattach(tmp_path, sshd_running, remote_root,
                                                                       host_factory):
    ws = Workspace(tmp_path / "ws", remote_config(sshd_running, remote_root, seconds="4"))
    samples.generate_case(ws.inbox, "DROPPED", seed=5)
    host = host_factory(workspace=ws)
    assert wait_until(lambda: running_simulations(ws) >= 2, 60), ws.logs()
    sshd_running.restart()  # every SSH connection of the host drops
    pid = ws.query("SELECT pid FROM workers WHERE name = 'execute'")[0][0]
    os.kill(pid, signal.SIGKILL)  # and the execute worker dies; the host restarts it
    case = wait_final(ws, 1, timeout=120)["DROPPED"]
    assert case["state"] == "done", (case, ws.logs())
    assert simulate_attempts(ws) == [1, 1, 1]  # re-attached, never re-run
    assert len(list((remote_root / ".mqi-jobs").glob("*simulate*"))) == 3
    assert host.stop() == 0
    assert ws.gpu_allocations() == []


def test_nonzero_exit_with_a_success_looking_log_is_a_failure(tmp_path, sshd_running, remote_root, host_factory):
    command = "echo 'Time taken by MC engine: 1.0 s'; exit 3"
    ws = Workspace(tmp_path / "ws", remote_config(sshd_running, remote_root, command=command, max_attempts=1))
    samples.generate_case(ws.inbox, "LIAR", seed=6, treatment_beams=1)
    host_factory(workspace=ws)
    case = wait_final(ws, 1)["LIAR"]
    assert case["state"] == "failed", case
    messages = [r[0] for r in ws.query("SELECT message FROM steps WHERE name = 'simulate'")]
    assert any("exit code 3" in m for m in messages), messages


def test_check_refuses_an_unknown_host_key_and_shows_it(tmp_path, sshd_running, remote_root):
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    ws = Workspace(tmp_path / "ws", remote_config(sshd_running, remote_root, known_hosts=str(empty)))
    check = ws.cli("check")
    assert check.returncode == 2
    assert "is unknown" in check.stdout and sshd_running.fingerprint() in check.stdout
    assert "ssh-keyscan" in check.stdout and empty.read_text() == ""


def test_check_names_a_remote_root_outside_the_hosts_root(tmp_path, sshd_running, remote_root):
    config = remote_config(sshd_running, remote_root)
    config["workflow"]["remote_root"] = "remote"  # relative: it would resolve inside the local workspace
    ws = Workspace(tmp_path / "ws", config)
    check = ws.cli("check")
    assert check.returncode == 2
    assert "workflow.remote_root" in check.stdout and "is not inside the root" in check.stdout


def test_a_beam_whose_host_rebooted_is_retried(tmp_path, sshd_running, remote_root, host_factory):
    ws = Workspace(tmp_path / "ws", remote_config(sshd_running, remote_root, seconds="3"))
    samples.generate_case(ws.inbox, "REBOOT", seed=9, treatment_beams=1)
    host_factory(workspace=ws)
    jobs = remote_root / ".mqi-jobs"
    assert wait_until(lambda: any(jobs.glob("*simulate*-a1/pid")), 60), ws.logs()
    pid_file = next(jobs.glob("*simulate*-a1/pid"))
    fields = pid_file.read_text().split()
    os.killpg(int(fields[2]), signal.SIGKILL)  # the machine went down with the job...
    os.kill(int(fields[0]), signal.SIGKILL)
    pid_file.write_text(" ".join(fields[:4] + ["boot-id-before-the-reboot"]) + "\n")  # ...and came back
    case = wait_final(ws, 1, timeout=120)["REBOOT"]
    assert case["state"] == "done", (case, ws.logs())
    assert simulate_attempts(ws) == [2]  # the lost attempt was retried
    first = ws.query("SELECT a.outcome, a.message FROM attempts a JOIN steps s ON s.id = a.step_id "
                     "WHERE s.name = 'simulate' AND a.attempt = 1")[0]
    assert first["outcome"] == "failed" and "rebooted" in first["message"], dict(first)
