"""The example launcher executor with real detached jobs."""

import shlex

from mqi_framework.protocols import JobSpec, PluginContext
from mqi_framework.workspace import wait_until

from mqi_site_launcher import LauncherExecutor, LauncherSettings


def test_wraps_command_reports_progress_and_exit(tmp_path):
    ex = LauncherExecutor(LauncherSettings(site_label="clinic"), PluginContext(workspace=tmp_path))
    script = "for i in 1 2 3 4; do echo \"Generating particles for ($i of 4 batches)\"; sleep 0.3; done; exit 5"
    handle = ex.start(JobSpec(job_key="job 1; $(x)", command=f"sh -c {shlex.quote(script)}", workdir=str(tmp_path)))
    assert wait_until(lambda: ex.progress(handle) is not None, 10)
    assert wait_until(lambda: ex.poll(handle).state == "exited", 20)
    assert ex.poll(handle).exit_code == 5
    assert ex.progress(handle) == (1.0, "batch 4 of 4")
    log = ex.read_log(handle)
    assert "[clinic launcher] starting" in log and "exit code 5" in log


def test_progress_is_none_before_any_batch(tmp_path):
    ex = LauncherExecutor(None, PluginContext(workspace=tmp_path))
    handle = ex.start(JobSpec(job_key="quiet", command="sleep 0.2", workdir=str(tmp_path)))
    assert ex.progress(handle) is None
    assert wait_until(lambda: ex.poll(handle).state == "exited", 10)
