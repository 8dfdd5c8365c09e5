"""Running one short command (``nvidia-smi``) on a GPU host: locally as a subprocess (no
shell, with a timeout), or over the shared SSH connection of the mqi-ssh plugin. The
running itself is :mod:`mqi_framework.commands`."""

from __future__ import annotations

import abc
import shlex
from typing import Any

from mqi_framework.toolkit import CommandResult, RemoteShell, as_result, run_local

__all__ = ["CommandResult", "CommandRunner", "LocalRunner", "RemoteUnavailable", "SshRunner", "as_result"]


class RemoteUnavailable(Exception):
    """A host is configured for SSH but the SSH connection module cannot be used."""


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
        self.settings = dict(settings)
        self._shell = RemoteShell(lambda: import_ssh_connection().connect(self.settings),
                                  f"SSH to {host}", fatal=(RemoteUnavailable,))

    def run(self, argv: list[str], timeout: float) -> CommandResult:
        return self._shell.run(shlex.join(argv), timeout)

    def close(self) -> None:
        self._shell.close()


# ----------------------------------------------------------------------------- mqi-ssh glue


def import_ssh_connection() -> Any:
    """The mqi-ssh connection module, or RemoteUnavailable saying how to get it."""
    try:
        import importlib

        return importlib.import_module("mqi_ssh.connection")
    except ImportError as exc:
        raise RemoteUnavailable(
            f"this host is read over SSH, which needs the mqi-ssh plugin (`pip install mqi-ssh`, in this repository "
            f"`pip install -e plugins/mqi-ssh`): {exc}") from None
