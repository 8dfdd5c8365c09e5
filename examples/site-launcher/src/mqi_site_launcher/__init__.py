"""``site.launcher``: an example executor a clinic writes itself.

Sites often start the simulator through their own launcher (to load modules, set
licences, account GPU time). This executor wraps every command in
``python -m mqi_site_launcher.launch``, which runs the command, passes its output through
and keeps a progress file up to date from the simulator's ``Generating particles for
(i of N batches)`` lines; :meth:`LauncherExecutor.progress` reads that file. Everything
else (detached jobs, re-attach, timeouts, kill) comes from the builtin local executor.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Optional

import attrs

from mqi_framework import hookimpl
from mqi_framework.protocols import JobHandle, JobSpec, PluginContext
from mqi_framework.toolkit import LocalExecutor


@attrs.frozen
class LauncherSettings:
    """Settings of ``site.launcher``."""

    site_label: str = "site"  # printed by the launcher at the top of every job log
    jobs_dir: Optional[str] = None  # default: <workspace>/jobs
    kill_grace_seconds: float = 5.0


class LauncherExecutor(LocalExecutor):
    """The local executor with every command wrapped in the site launcher."""

    name = "site.launcher"
    settings_class = LauncherSettings

    def __init__(self, settings: Optional[LauncherSettings], context: PluginContext) -> None:
        super().__init__(settings or LauncherSettings(), context)  # type: ignore[arg-type]

    def start(self, spec: JobSpec) -> JobHandle:
        progress_file = self.job_dir(spec.job_key) / "progress"
        wrapped = " ".join(shlex.quote(part) for part in [
            sys.executable, "-m", "mqi_site_launcher.launch", "--label", self.settings.site_label,
            "--progress-file", str(progress_file), "--", spec.command])
        return super().start(attrs.evolve(spec, command=wrapped))

    def progress(self, handle: JobHandle) -> Optional[tuple[float, str]]:
        try:
            done, total = (Path(handle.data["job_dir"]) / "progress").read_text().split()
            return int(done) / int(total), f"batch {done} of {total}"
        except (OSError, ValueError, ZeroDivisionError):
            return None


@hookimpl
def mqi_register_executors(register):  # type: ignore[no-untyped-def]
    register(LauncherExecutor)
