"""The executor against a real single-node Slurm (slurmctld + slurmd + munge on this machine,
see conftest.py): submit, complete, fail, timeout, cancel, re-attach, batched polling,
GPUs through --gres, and Slurm's own TIMEOUT state."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from mqi_framework.protocols import JobSpec, PluginContext
from mqi_slurm.executor import SlurmExecutor, SlurmSettings

from .conftest import poll_until_done, wait_for

pytestmark = pytest.mark.integration


def make(tmp_path: Path, **settings) -> SlurmExecutor:
    settings.setdefault("poll_interval_seconds", 0.5)
    settings.setdefault("kill_grace_seconds", 2)
    # a space in the workspace: paths reach sbatch as arguments, never through #SBATCH parsing
    return SlurmExecutor(SlurmSettings(**settings), PluginContext(workspace=tmp_path / "work space"))


def job(tmp_path: Path, key: str, command: str, **kw) -> JobSpec:
    workdir = tmp_path / "work"
    workdir.mkdir(exist_ok=True)
    return JobSpec(job_key=key, command=command, workdir=str(workdir), **kw)


@pytest.fixture(scope="module")
def slurm_time_limit_job(slurm_cluster, tmp_path_factory):
    """A job that Slurm itself ends at its 1-minute limit (checked every ~30 s), submitted
    when the module starts so that its wait overlaps the other tests; the last test checks it."""
    folder = tmp_path_factory.mktemp("slurm-timelimit")
    ex = make(folder, default_time="1", time_margin_seconds=0)
    handle = ex.start(job(folder, "time-limit", "echo started; sleep 600"))
    return ex, handle, time.monotonic()


@pytest.fixture(autouse=True)
def _submit_time_limit_job_first(slurm_time_limit_job):
    return slurm_time_limit_job


def test_submit_and_complete(slurm_cluster, tmp_path):
    ex = make(tmp_path)
    spec = job(tmp_path, "case-000001-simulate-b1-a1", "echo \"hello $MQI_TEST from $PWD\"; echo dose > dose.raw",
               env={"MQI_TEST": "a b"})
    handle = ex.start(spec)
    assert handle.data["job_id"].isdigit()
    assert wait_for(lambda: any(j["id"] == handle.data["job_id"] for j in slurm_cluster.jobs()), 10)
    status = poll_until_done(ex, handle)
    assert (status.state, status.exit_code, status.timed_out) == ("exited", 0, False), ex.read_log(handle)
    log = ex.read_log(handle)
    assert f"hello a b from {tmp_path / 'work'}" in log and f"mqi-slurm: job {handle.data['job_id']}" in log
    assert ex.missing_outputs([str(tmp_path / "work" / "*.raw"), str(tmp_path / "work" / "*.mhd")]) == [
        str(tmp_path / "work" / "*.mhd")]
    name = {j["id"]: j["name"] for j in slurm_cluster.jobs()}[handle.data["job_id"]]
    assert name == "mqi-case-000001-simulate-b1-a1"


def test_nonzero_exit_fails_with_its_code(slurm_cluster, tmp_path):
    ex = make(tmp_path)
    handle = ex.start(job(tmp_path, "fail", "echo 'FATAL ERROR: no beam' >&2; exit 3"))
    status = poll_until_done(ex, handle)
    assert (status.state, status.exit_code) == ("exited", 3)
    assert "FATAL ERROR: no beam" in ex.read_log(handle)
    state = {j["id"]: j["state"] for j in slurm_cluster.jobs()}[handle.data["job_id"]]
    assert state == "FAILED"


def test_missing_workdir_is_a_failure_not_a_hang(slurm_cluster, tmp_path):
    ex = make(tmp_path)
    handle = ex.start(JobSpec(job_key="nowork", command="true", workdir=str(tmp_path / "absent")))
    status = poll_until_done(ex, handle)
    assert (status.state, status.exit_code) == ("exited", 1)
    assert "cannot enter the work folder" in ex.read_log(handle)


def test_step_timeout_kills_the_job(slurm_cluster, tmp_path):
    ex = make(tmp_path)
    started = time.monotonic()
    handle = ex.start(job(tmp_path, "slow", "echo start; sleep 300; echo never", timeout=2))
    status = poll_until_done(ex, handle, timeout=60)
    assert status.state == "exited" and status.timed_out and status.exit_code == 124
    assert time.monotonic() - started < 30
    assert "never" not in ex.read_log(handle)
    script = Path(handle.data["job_dir"], "job.sh").read_text()
    assert "#SBATCH --time=3" in script  # Slurm's own limit is the backstop: 2 s + 120 s margin, in minutes


def test_cancel_ends_the_slurm_job(slurm_cluster, tmp_path):
    ex = make(tmp_path)
    handle = ex.start(job(tmp_path, "cancel-me", "echo running; sleep 300"))
    assert wait_for(lambda: "running" in ex.read_log(handle), 30)
    ex.kill(handle)
    state = {j["id"]: j["state"] for j in slurm_cluster.jobs()}[handle.data["job_id"]]
    assert state == "CANCELLED"
    status = poll_until_done(ex, handle)
    assert status.state == "exited" and status.exit_code == 143 and "cancelled in Slurm" in status.message


def test_reattach_after_restart_never_submits_twice(slurm_cluster, tmp_path):
    spec = job(tmp_path, "case-000002-simulate-b1-a1", "sleep 2; echo done")
    first = make(tmp_path).start(spec)
    worker_after_restart = make(tmp_path)
    again = worker_after_restart.start(spec)
    assert again.data == first.data
    named = [j for j in slurm_cluster.jobs() if j["name"] == "mqi-case-000002-simulate-b1-a1"]
    assert len(named) == 1
    status = poll_until_done(worker_after_restart, again)
    assert (status.state, status.exit_code) == ("exited", 0)
    # the crash window: sbatch ran, the id was never written -> found by name, adopted
    Path(first.data["job_dir"], "job_id").unlink()
    adopted = make(tmp_path).start(spec)
    assert adopted.data["job_id"] == first.data["job_id"]
    assert len([j for j in slurm_cluster.jobs() if j["name"] == "mqi-case-000002-simulate-b1-a1"]) == 1


def test_one_squeue_call_per_interval_for_all_jobs(slurm_cluster, tmp_path):
    ex = make(tmp_path, poll_interval_seconds=1.0)
    handles = [ex.start(job(tmp_path, f"batch-{i}", f"sleep 3; exit {i}")) for i in range(3)]
    calls: list[list[str]] = []
    real_run = ex.site.run

    def counting(argv, timeout):
        calls.append(argv)
        return real_run(argv, timeout)

    ex.site.run = counting  # type: ignore[method-assign]
    results: dict[int, object] = {}
    started = time.monotonic()
    while len(results) < 3 and time.monotonic() - started < 60:
        for i, h in enumerate(handles):  # a worker tick: poll every running job
            if i not in results:
                status = ex.poll(h)
                if status.state != "running":
                    results[i] = status
        time.sleep(0.1)
    assert [results[i].exit_code for i in range(3)] == [0, 1, 2]
    squeue = [c for c in calls if c[0].endswith("squeue")]
    elapsed = time.monotonic() - started
    assert len(squeue) <= elapsed / 1.0 + 1  # rate-limited: not one call per job per tick
    assert any("--jobs=" + ",".join(sorted(h.data["job_id"] for h in handles)) in " ".join(c) for c in squeue)


def test_gpus_through_gres_queue_in_slurm(slurm_cluster, tmp_path):
    if not slurm_cluster.gpus:
        pytest.skip("no fake GPU devices (mknod not permitted here): --gres cannot be tried")
    ex = make(tmp_path, gres="gpu:1")
    handles = [ex.start(job(tmp_path, f"gpu-{i}", "echo \"gpu=$CUDA_VISIBLE_DEVICES\"; sleep 4")) for i in range(3)]
    third = handles[2]
    assert wait_for(lambda: ex.progress(third) is not None or ex.poll(third) and ex.progress(third), 20)
    assert ex.progress(third)[1].startswith("pending in Slurm")  # two GPUs: the third beam waits in Slurm
    statuses = [poll_until_done(ex, h, timeout=60) for h in handles]
    assert all(s.exit_code == 0 for s in statuses)
    seen = sorted(ex.read_log(h).split("gpu=")[1].split()[0] for h in handles)
    assert set(seen) <= {"0", "1"} and len(seen) == 3  # Slurm set CUDA_VISIBLE_DEVICES


def test_a_case_runs_through_slurm_with_mqi_host_run(slurm_cluster, tmp_path):
    """The simulate step runs as Slurm jobs; Slurm hands out the (fake) GPUs with --gres and
    queues the third beam until a GPU is free."""
    samples = pytest.importorskip("mqi_moqui.samples")
    from mqi_framework.testing import HostProcess, Workspace, wait_final
    from mqi_framework.workspace import fast_config

    config = fast_config()
    config["workers"]["execute"] = {"plugin": "slurm", "interval_seconds": 0.2,
                                    "settings": {"poll_interval_seconds": 0.5,
                                                 **({"gres": "gpu:1"} if slurm_cluster.gpus else {})}}
    for step in config["workflow"]["steps"]:
        if step["name"] == "simulate":  # Slurm picks the GPU and sets CUDA_VISIBLE_DEVICES itself
            step["gpu"] = False
            step["command"] = "{python} -m mqi_moqui.standin {input_file}"
    ws = Workspace(tmp_path / "ws", config)
    check = ws.cli("check")
    assert check.returncode == 0, check.stdout + check.stderr
    samples.generate_case(ws.inbox, "SLURM-CASE", seed=11, treatment_beams=3)
    host = HostProcess(ws, {"MQI_STANDIN_SECONDS": "1", "SLURM_CONF": str(slurm_cluster.conf)}).start()
    try:
        case = wait_final(ws, 1, timeout=120)["SLURM-CASE"]
    finally:
        host.stop()
    assert case["state"] == "done", case
    assert samples.outputs_missing(ws.folder, case) == []
    jobs = {j["name"]: j["state"] for j in slurm_cluster.jobs()}
    for beam in (1, 2, 3):
        assert jobs[f"mqi-case-000001-simulate-b{beam}-a1"] == "COMPLETED"
    handles = [r[0] for r in ws.query("SELECT job FROM steps WHERE name = 'simulate'")]
    assert len(handles) == 3 and all('"executor": "slurm"' in h for h in handles)


def test_slurm_time_limit_is_reported_as_timeout(slurm_cluster, slurm_time_limit_job):
    ex, handle, submitted = slurm_time_limit_job
    status = poll_until_done(ex, handle, timeout=max(10, 150 - (time.monotonic() - submitted)))
    assert status.state == "exited" and status.timed_out, status
    assert "TIMEOUT" in status.message
    state = {j["id"]: j["state"] for j in slurm_cluster.jobs()}[handle.data["job_id"]]
    assert state == "TIMEOUT"


def test_submit_on_a_login_node_over_a_real_sshd(slurm_cluster, tmp_path, request):
    """The SSH site: job files written and Slurm commands run over mqi-ssh's connection to
    a real sshd. SSH sessions do not inherit this process's SLURM_CONF, so the "login node"
    gets wrappers that set it, as a site's /etc/slurm would."""
    pytest.importorskip("mqi_ssh.connection")
    import shutil

    sshd = request.getfixturevalue("sshd_running")
    bin_dir = tmp_path / "login bin"
    bin_dir.mkdir()
    for name in ("sbatch", "squeue", "sacct", "scancel"):
        real = shutil.which(name) or f"/usr/bin/{name}"
        wrapper = bin_dir / name
        wrapper.write_text(f"#!/bin/sh\nSLURM_CONF='{slurm_cluster.conf}' exec '{real}' \"$@\"\n")
        wrapper.chmod(0o755)
    jobs = tmp_path / "shared jobs"
    ex = make(tmp_path, ssh=sshd.host_settings(), jobs_dir=str(jobs), bin_dir=str(bin_dir))
    try:
        assert ex.check() == []
        handle = ex.start(job(tmp_path, "over-ssh", "echo \"remote $MQI_TEST\"; echo dose > dose.raw; exit 4",
                              env={"MQI_TEST": "it's"}))
        assert handle.data["job_id"].isdigit()
        status = poll_until_done(ex, handle)
        assert (status.state, status.exit_code) == ("exited", 4), ex.read_log(handle)
        assert "remote it's" in ex.read_log(handle)
        assert ex.missing_outputs([str(tmp_path / "work" / "*.raw")]) == []
        again = ex.start(job(tmp_path, "over-ssh", "echo never"))  # re-attach, not a second submission
        assert again.data["job_id"] == handle.data["job_id"]
    finally:
        ex.close()
