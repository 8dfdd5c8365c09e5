"""The executor against fake Slurm commands printing canned output: the job script, batched
and rate-limited polling, the sacct fallback, re-attach and the submission crash window."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from mqi_framework.protocols import JobSpec, PluginContext
from mqi_slurm.executor import SlurmExecutor, SlurmSettings

FIXTURES = Path(__file__).parent / "fixtures"


def executor(tmp_path, fake_slurm, **settings) -> SlurmExecutor:
    settings.setdefault("poll_interval_seconds", 0.0)
    return SlurmExecutor(SlurmSettings(bin_dir=str(fake_slurm.bin), **settings), PluginContext(workspace=tmp_path))


def spec(key="case-000001-simulate-b1-a1", **kw) -> JobSpec:
    kw.setdefault("command", "tps_env 'moqui_tps_1.in' > run.log 2>&1")
    kw.setdefault("workdir", "/remote/case-000001/beams/1")
    return JobSpec(job_key=key, **kw)


def test_job_script_has_the_options_and_the_rendered_command(tmp_path, fake_slurm):
    fake_slurm.answer("sbatch", "4242\n")
    ex = executor(tmp_path, fake_slurm, gres="gpu:1", partition="gpu", account="qa", memory="16G", cpus_per_task=4,
                  extra_args=["--constraint=a100"])
    handle = ex.start(spec(timeout=3600, env={"CUDA_DEVICE_ORDER": "PCI_BUS_ID", "NOTE": "a b'c"}))
    job_dir = Path(handle.data["job_dir"])
    assert handle.data["job_id"] == "4242" and (job_dir / "job_id").read_text() == "4242\n"
    assert job_dir == tmp_path / "jobs" / "slurm" / "case-000001-simulate-b1-a1"
    script = (job_dir / "job.sh").read_text()
    for line in ("#SBATCH --time=62", "#SBATCH --gres=gpu:1", "#SBATCH --partition=gpu", "#SBATCH --account=qa",
                 "#SBATCH --mem=16G", "#SBATCH --cpus-per-task=4", "#SBATCH --constraint=a100",
                 "export CUDA_DEVICE_ORDER=PCI_BUS_ID", "export NOTE='a b'\"'\"'c'",
                 "cd /remote/case-000001/beams/1 ||", 'timeout --kill-after=10 3600 /bin/sh "$d/command.sh"'):
        assert line in script, line
    assert (job_dir / "command.sh").read_text() == "tps_env 'moqui_tps_1.in' > run.log 2>&1\n"
    assert fake_slurm.calls("sbatch") == [
        f"--parsable --job-name=mqi-case-000001-simulate-b1-a1 --output={job_dir}/output.log --open-mode=append "
        f"--chdir={job_dir} {job_dir}/job.sh"]


def test_no_timeout_and_no_gres_by_default(tmp_path, fake_slurm):
    fake_slurm.answer("sbatch", "7;cluster\n")
    ex = executor(tmp_path, fake_slurm, default_time="2-00:00:00")
    handle = ex.start(spec())
    script = (Path(handle.data["job_dir"]) / "job.sh").read_text()
    assert handle.data["job_id"] == "7" and "--gres" not in script and "timeout " not in script
    assert "#SBATCH --time=2-00:00:00" in script


def test_bad_env_name_is_refused(tmp_path, fake_slurm):
    with pytest.raises(ValueError, match="not valid in a shell"):
        executor(tmp_path, fake_slurm).start(spec(env={"A;rm": "x"}))


def test_start_twice_reattaches_and_never_submits_again(tmp_path, fake_slurm):
    fake_slurm.answer("sbatch", "4242\n")
    first = executor(tmp_path, fake_slurm).start(spec())
    again = executor(tmp_path, fake_slurm).start(spec())  # a new worker process after a restart
    assert again.data == first.data and len(fake_slurm.calls("sbatch")) == 1


def test_crash_between_sbatch_and_job_id_adopts_the_job_by_name(tmp_path, fake_slurm):
    fake_slurm.answer("sbatch", "4242\n")
    ex = executor(tmp_path, fake_slurm)
    handle = ex.start(spec())
    (Path(handle.data["job_dir"]) / "job_id").unlink()  # as if the worker died right after sbatch
    fake_slurm.answer("squeue", "4242\n")
    again = executor(tmp_path, fake_slurm).start(spec())
    assert again.data["job_id"] == "4242" and len(fake_slurm.calls("sbatch")) == 1
    assert "--name=mqi-case-000001-simulate-b1-a1" in fake_slurm.calls("squeue")[-1]


def test_sbatch_refusal_is_an_error_that_says_why(tmp_path, fake_slurm):
    fake_slurm.answer("sbatch", rc=1, stderr="sbatch: error: Batch job submission failed: Invalid account\n")
    with pytest.raises(RuntimeError, match="Invalid account"):
        executor(tmp_path, fake_slurm).start(spec())


def submit_three(tmp_path, fake_slurm, ids=("101", "103", "105"), **settings):
    ex = executor(tmp_path, fake_slurm, **settings)
    handles = []
    for n, job_id in enumerate(ids, start=1):
        fake_slurm.answer("sbatch", f"{job_id}\n")
        handles.append(ex.start(spec(key=f"case-000001-simulate-b{n}-a1")))
    return ex, handles


def test_one_squeue_call_polls_every_job(tmp_path, fake_slurm):
    ex, handles = submit_three(tmp_path, fake_slurm)
    fake_slurm.answer("squeue", (FIXTURES / "squeue_all_states.txt").read_text())
    Path(handles[2].data["job_dir"], "exit_code").write_text("0\n")
    statuses = [ex.poll(h) for h in handles]
    assert [s.state for s in statuses] == ["running", "running", "exited"]
    assert statuses[0].message == "PENDING (Resources)" and statuses[2].exit_code == 0
    calls = fake_slurm.calls("squeue")
    assert len(calls) == 3  # poll_interval 0: one call per poll here; each asks for all three jobs
    assert all("--jobs=101,103,105" in c and "--states=all" in c for c in calls)
    assert ex.progress(handles[0]) == (0.0, "pending in Slurm (Resources)")


def test_polling_is_rate_limited_across_jobs(tmp_path, fake_slurm):
    ex, handles = submit_three(tmp_path, fake_slurm, ids=("101", "103", "104"), poll_interval_seconds=30)
    fake_slurm.answer("squeue", (FIXTURES / "squeue_all_states.txt").read_text())
    for _ in range(5):  # five worker ticks within the interval
        assert [ex.poll(h).state for h in handles] == ["running", "running", "running"]
    assert len(fake_slurm.calls("squeue")) == 1


def test_jobs_squeue_forgot_are_asked_to_sacct_once(tmp_path, fake_slurm):
    ex = executor(tmp_path, fake_slurm)
    handles = []
    for n, job_id in enumerate(("202", "204", "206"), start=1):
        fake_slurm.answer("sbatch", f"{job_id}\n")
        handles.append(ex.start(spec(key=f"k{n}")))
    fake_slurm.answer("squeue", rc=1, stderr="slurm_load_jobs error: Invalid job id specified\n")
    fake_slurm.answer("sacct", (FIXTURES / "sacct_all_states.txt").read_text())
    failed = ex.poll(handles[0])
    assert (failed.state, failed.exit_code) == ("exited", 3)
    assert fake_slurm.calls("sacct")[-1].endswith("--jobs=202,204,206")
    cancelled = ex.poll(handles[1])
    assert (cancelled.state, cancelled.exit_code) == ("exited", 143) and "cancelled in Slurm" in cancelled.message
    oom = ex.poll(handles[2])
    assert oom.state == "exited" and "OUT_OF_MEMORY" in oom.message


def test_without_accounting_the_exit_code_file_decides(tmp_path, fake_slurm):
    ex, handles = submit_three(tmp_path, fake_slurm)
    fake_slurm.answer("squeue", rc=1, stderr="slurm_load_jobs error: Invalid job id specified\n")
    fake_slurm.answer("sacct", rc=1, stderr=(FIXTURES / "sacct_disabled.txt").read_text())
    Path(handles[0].data["job_dir"], "exit_code").write_text("0\n")
    Path(handles[1].data["job_dir"], "exit_code").write_text("124\n")
    Path(handles[1].data["job_dir"], "timed_out").write_text("")
    statuses = [ex.poll(h) for h in handles]
    assert [(s.state, s.exit_code, s.timed_out) for s in statuses] == [
        ("exited", 0, False), ("exited", 124, True), ("lost", None, False)]
    assert len(fake_slurm.calls("sacct")) == 1  # disabled accounting is remembered, not asked every tick


def test_controller_down_means_unknown_not_lost(tmp_path, fake_slurm):
    ex, handles = submit_three(tmp_path, fake_slurm)
    fake_slurm.answer("squeue", rc=1, stderr="slurm_load_jobs error: Unable to contact slurm controller\n")
    assert all(ex.poll(h).state == "running" for h in handles)


def test_kill_runs_scancel_and_waits_for_the_end(tmp_path, fake_slurm):
    ex, handles = submit_three(tmp_path, fake_slurm)
    fake_slurm.answer("squeue", "101|CANCELLED|None\n")
    started = time.monotonic()
    ex.kill(handles[0])
    assert fake_slurm.calls("scancel") == ["101"] and time.monotonic() - started < 5


def test_read_log_and_outputs(tmp_path, fake_slurm):
    fake_slurm.answer("sbatch", "1\n")
    ex = executor(tmp_path, fake_slurm)
    handle = ex.start(spec())
    Path(handle.data["job_dir"], "output.log").write_text("x" * 100 + "Time taken by MC engine\n")
    assert ex.read_log(handle, 24) == "Time taken by MC engine\n"
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "dose.raw").write_text("")
    assert ex.missing_outputs([str(tmp_path / "out" / "*.raw"), str(tmp_path / "none" / "*")]) == [
        str(tmp_path / "none" / "*")]


def test_check_names_what_is_wrong(tmp_path, fake_slurm):
    assert executor(tmp_path, fake_slurm).check() == []
    fake_slurm.answer("sbatch", rc=127, stderr="sbatch: not here\n")
    assert executor(tmp_path, fake_slurm).check()[0].startswith("sbatch locally does not run: exit code 127")
    missing = SlurmExecutor(SlurmSettings(bin_dir=str(tmp_path / "nowhere")), PluginContext(workspace=tmp_path))
    assert "command not found" in missing.check()[0]
    relative = SlurmExecutor(SlurmSettings(ssh={"hostname": "login1"}, jobs_dir="jobs"),
                             PluginContext(workspace=tmp_path))
    assert relative.check()[0].startswith("with ssh:, jobs_dir must be an absolute path")
    ssh = SlurmExecutor(SlurmSettings(ssh={"hostname": "login1"}, jobs_dir="/shared/jobs"),
                        PluginContext(workspace=tmp_path))
    try:
        import mqi_ssh.connection  # noqa: F401
    except ImportError:
        assert ssh.check()[0].startswith("`ssh:` needs the mqi-ssh plugin")


class ShellConnection:
    """Stands in for an mqi-ssh connection: runs the remote command with a local shell."""

    opened: list[dict] = []

    def __init__(self, settings: dict) -> None:
        ShellConnection.opened.append(settings)
        self.commands: list[str] = []

    def run(self, command: str, timeout: float):
        import subprocess

        self.commands.append(command)
        proc = subprocess.run(["sh", "-c", command], capture_output=True, text=True, timeout=timeout)
        return proc.returncode, proc.stdout, proc.stderr

    def close(self) -> None:
        pass


@pytest.fixture
def fake_mqi_ssh(monkeypatch):
    import sys
    import types

    package = types.ModuleType("mqi_ssh")
    connection = types.ModuleType("mqi_ssh.connection")
    connection.connect = ShellConnection  # type: ignore[attr-defined]
    package.connection = connection  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "mqi_ssh", package)
    monkeypatch.setitem(sys.modules, "mqi_ssh.connection", connection)
    ShellConnection.opened = []
    return ShellConnection


def test_ssh_mode_writes_and_reads_job_files_with_remote_commands(tmp_path, fake_slurm, fake_mqi_ssh):
    fake_slurm.answer("sbatch", "77\n")
    jobs = tmp_path / "remote jobs"  # a space: every path is quoted on the remote side
    ex = SlurmExecutor(SlurmSettings(ssh={"hostname": "login1", "user": "mqi"}, jobs_dir=str(jobs),
                                     bin_dir=str(fake_slurm.bin), poll_interval_seconds=0),
                       PluginContext(workspace=tmp_path))
    assert ex.check() == []
    handle = ex.start(spec(command="echo 'it''s'; exit 0"))
    job_dir = Path(handle.data["job_dir"])
    assert job_dir.parent == jobs and (job_dir / "job_id").read_text() == "77\n"
    assert (job_dir / "command.sh").read_text() == "echo 'it''s'; exit 0\n"
    assert (job_dir / "job.sh").stat().st_mode & 0o111
    assert fake_mqi_ssh.opened == [{"hostname": "login1", "user": "mqi"}]
    assert ex.start(spec(command="echo 'it''s'; exit 0")).data == handle.data  # re-attach over SSH too
    fake_slurm.answer("squeue", "77|COMPLETED|None\n")
    (job_dir / "exit_code").write_text("0\n")
    (job_dir / "output.log").write_text("log line\n")
    assert (ex.poll(handle).state, ex.poll(handle).exit_code) == ("exited", 0)
    assert ex.read_log(handle) == "log line\n"
    (tmp_path / "out dir").mkdir()
    (tmp_path / "out dir" / "dose.raw").write_text("")
    assert ex.missing_outputs([str(tmp_path / "out dir" / "*.raw"), str(tmp_path / "out dir" / "*.mhd")]) == [
        str(tmp_path / "out dir" / "*.mhd")]


def test_a_program_missing_where_jobs_are_submitted_is_found_by_check(tmp_path, fake_slurm):
    """Issue 19: `check` probed the simulator on local and SSH executors, not for Slurm."""
    ex = executor(tmp_path, fake_slurm)
    assert ex.program_problem("sh") is None
    problem = ex.program_problem("tps_env_not_installed_here")
    assert problem is not None and problem.startswith("tps_env_not_installed_here: command not found")
    assert ex.program_problem("$(touch /tmp/pwned-by-slurm-probe)") is not None  # data, not shell
    assert not Path("/tmp/pwned-by-slurm-probe").exists()
