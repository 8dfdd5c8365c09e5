"""Running one short command (``nvidia-smi``) on a GPU host: locally as a subprocess (no
shell, with a timeout), or over the shared SSH connection of the mqi-ssh plugin. The
running itself is :mod:`mqi_framework.commands`."""

from __future__ import annotations

import abc
import shlex

from mqi_framework.toolkit import CommandResult, PluginMissing, as_result, run_local, ssh_shell

__all__ = ["CommandResult", "CommandRunner", "LocalRunner", "PluginMissing", "SshRunner", "as_result"]


class CommandRunner(abc.ABC):
    """Runs an argv on one host."""

    #: where it runs, for messages ("locally", "over SSH on gpu1")
    where: str = ""

    @abc.abstractmethod
    def run(self, argv: list[str], timeout: float) -> CommandResult:
        """Run ``argv`` (never through a local shell); never raises for a failing command."""

    def close(self) -> None:
        pass


class LocalRunner(CommandRunner):
    where = "locally"

    def run(self, argv: list[str], timeout: float) -> CommandResult:
        return run_local(argv, timeout, not_found_hint="is the NVIDIA driver installed? is it on PATH? "
                                                      "set `command:` to its full path")


class SshRunner(CommandRunner):
    """Runs the command over the shared connection of :mod:`mqi_ssh.connection`."""

    def __init__(self, host: str, settings: dict) -> None:
        self.where = f"over SSH on {host}"
        self.host = host
        self._shell = ssh_shell(settings, f"SSH to {host}")

    def run(self, argv: list[str], timeout: float) -> CommandResult:
        return self._shell.run(shlex.join(argv), timeout)

    def close(self) -> None:
        self._shell.close()
