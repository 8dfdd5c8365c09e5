"""Running one short command (``nvidia-smi``) on a GPU host: locally as a subprocess (no
shell, with a timeout), or over the shared SSH connection of the mqi-ssh plugin."""

from __future__ import annotations

import abc
import os
import shlex
import signal
import subprocess
from typing import Any, Optional

import attrs


class RemoteUnavailable(Exception):
    """A host is configured for SSH but the SSH connection module cannot be used."""


@attrs.frozen
class CommandResult:
    returncode: Optional[int]  # None when the command timed out or could not start
    stdout: str
    stderr: str
    timed_out: bool = False

    def problem(self) -> str:
        """One line for people: why this result is not a clean exit 0."""
        if self.timed_out:
            return "timed out"
        text = (self.stderr.strip() or self.stdout.strip()).splitlines()
        first = text[0][:300] if text else ""
        if self.returncode is None:  # it never ran (SSH failed, mqi-ssh missing): the message says why
            return first or "did not run"
        return f"exit code {self.returncode}" + (f": {first}" if first else "")


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
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True, errors="replace", start_new_session=True)
        except FileNotFoundError:
            return CommandResult(127, "", f"{argv[0]}: command not found (is the NVIDIA driver installed? "
                                          f"is it on PATH? set `command:` to its full path)")
        except OSError as exc:
            return CommandResult(126, "", f"{argv[0]}: cannot run: {exc}")
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            try:  # its own session: kill whatever it started too, so no pipe stays open
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                out, err = proc.communicate(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, err = "", ""
            return CommandResult(None, out or "", err or "", timed_out=True)
        return CommandResult(proc.returncode, out, err)


def _text(value: Any) -> str:
    if value is None:
        return ""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


class SshRunner(CommandRunner):
    """Runs the command over the shared connection of :mod:`mqi_ssh.connection`."""

    def __init__(self, host: str, settings: dict) -> None:
        self.where = f"over SSH on {host}"
        self.host = host
        self.settings = dict(settings)
        self._connection: Any = None

    def _connect(self) -> Any:
        if self._connection is None:
            connection_module = import_ssh_connection()
            self._connection = open_ssh_connection(connection_module, self.settings)
        return self._connection

    def run(self, argv: list[str], timeout: float) -> CommandResult:
        try:
            conn = self._connect()
            return run_over_ssh(conn, shlex.join(argv), timeout)
        except RemoteUnavailable:
            raise
        except TimeoutError:
            self._drop()
            return CommandResult(None, "", "", timed_out=True)
        except Exception as exc:  # a dropped connection: reconnect next time
            self._drop()
            return CommandResult(None, "", f"SSH to {self.host} failed: {type(exc).__name__}: {exc}")

    def _drop(self) -> None:
        conn, self._connection = self._connection, None
        if conn is not None:
            try:
                conn.close()
            except Exception:
                pass

    def close(self) -> None:
        self._drop()


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


def open_ssh_connection(module: Any, settings: dict) -> Any:
    """Open a connection with mqi-ssh's settings class and connect function."""
    opener = getattr(module, "connect", None) or getattr(module, "open_connection", None)
    if opener is None:
        raise RemoteUnavailable(f"mqi_ssh.connection ({getattr(module, '__file__', '?')}) offers no connect(); "
                                f"this mqi-gpu does not know this version of mqi-ssh")
    settings_class = getattr(module, "SshHostSettings", None) or getattr(module, "HostSettings", None)
    if settings_class is not None:
        from mqi_framework import configload

        return opener(configload.structure(settings_class, settings, path="ssh"))
    return opener(**settings)


def run_over_ssh(conn: Any, command: str, timeout: float) -> CommandResult:
    result = conn.run(command, timeout=timeout)
    if isinstance(result, tuple):
        code, out, err = result[:3]
    else:
        code = next((getattr(result, a) for a in ("exit_status", "returncode", "exit_code") if hasattr(result, a)), None)
        out, err = getattr(result, "stdout", ""), getattr(result, "stderr", "")
    return CommandResult(code, _text(out), _text(err))
