"""Running one short command (``nvidia-smi``, ``sbatch``, ...) for a plugin: locally as a
subprocess (no shell, its own session, a timeout), or as a shell command line over a
connection object a plugin opens (mqi-ssh's shared SSH connection).

Failures of the command are results, never exceptions: :class:`CommandResult` says what
happened and :meth:`CommandResult.problem` says it in one line for people.
"""

from __future__ import annotations

import importlib
import os
import signal
import subprocess
from typing import Any, Callable, Optional

import attrs


@attrs.frozen
class CommandResult:
    """Exit code (None when the command timed out or could not run), output, and whether
    the time limit ended it."""

    returncode: Optional[int]
    stdout: str
    stderr: str
    timed_out: bool = False

    def problem(self) -> str:
        """One line for people: why this result is not a clean exit 0."""
        if self.timed_out:
            return "timed out"
        lines = (self.stderr.strip() or self.stdout.strip()).splitlines()
        first = lines[0][:300] if lines else ""
        if self.returncode is None:  # it never ran (SSH failed, a plugin missing): the message says why
            return first or "did not run"
        return f"exit code {self.returncode}" + (f": {first}" if first else "")


def run_local(argv: list[str], timeout: float, *, not_found_hint: str = "") -> CommandResult:
    """Run ``argv`` on this machine without a shell, in a session of its own; after
    ``timeout`` seconds the whole session is killed (so no pipe stays open)."""
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, errors="replace", start_new_session=True)
    except FileNotFoundError:
        return CommandResult(127, "", f"{argv[0]}: command not found" + (f" ({not_found_hint})" if not_found_hint else ""))
    except OSError as exc:
        return CommandResult(126, "", f"{argv[0]}: cannot run: {exc}")
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        try:
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


def as_result(raw: Any) -> CommandResult:
    """A connection's answer – a ``(code, stdout, stderr)`` tuple or an object with
    ``exit_status``/``returncode`` and ``stdout``/``stderr`` – as a :class:`CommandResult`."""
    if isinstance(raw, tuple):
        code, out, err = raw[:3]
    else:
        code = next((getattr(raw, a) for a in ("exit_status", "returncode", "exit_code") if hasattr(raw, a)), None)
        out, err = getattr(raw, "stdout", ""), getattr(raw, "stderr", "")
    return CommandResult(code, _text(out), _text(err))


class PluginMissing(Exception):
    """An optional plugin that this configuration needs is not installed; the message says
    which distribution to install."""


def optional_plugin(module: str, distribution: str, needed_for: str) -> Any:
    """Import ``module`` of the optional plugin ``distribution``, or raise
    :class:`PluginMissing` saying that ``needed_for`` needs it and how to install it. Plugins
    that build on another plugin (a GPU probe or a Slurm site reached over mqi-ssh's shared
    connection) use it so that a missing plugin reads the same everywhere."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise PluginMissing(
            f"{needed_for} needs the {distribution} plugin (`pip install {distribution}`, in the mqi-host "
            f"repository `pip install -e plugins/{distribution}`): {exc}") from None


def ssh_shell(settings: dict, label: str) -> "RemoteShell":
    """A :class:`RemoteShell` over the shared SSH connection of the mqi-ssh plugin, opened
    with ``settings`` (an ``ssh:`` block, validated by mqi-ssh) on first use. Raises
    :class:`PluginMissing` from :meth:`RemoteShell.run` when mqi-ssh is not installed."""
    settings = dict(settings)
    return RemoteShell(lambda: _ssh_connection_module().connect(settings), label, fatal=(PluginMissing,))


def require_ssh_plugin() -> None:
    """Raise :class:`PluginMissing` now (at check time) when mqi-ssh is not installed."""
    _ssh_connection_module()


def _ssh_connection_module() -> Any:
    return optional_plugin("mqi_ssh.connection", "mqi-ssh", "`ssh:`")


class RemoteShell:
    """Runs shell command lines over a connection opened on first use by ``opener`` (an
    object with ``run(command, timeout=...)`` and ``close()``), and opened again after a
    failure. Exceptions of types in ``fatal`` (e.g. "the SSH plugin is not installed")
    propagate; every other failure becomes a result whose message starts with ``label``."""

    def __init__(self, opener: Callable[[], Any], label: str, fatal: tuple[type[BaseException], ...] = ()) -> None:
        self.opener = opener
        self.label = label
        self.fatal = fatal
        self._connection: Any = None

    def run(self, command: str, timeout: float) -> CommandResult:
        """Run ``command`` (one shell line, values quoted) on the remote shell; a failing command does not raise."""
        try:
            if self._connection is None:
                self._connection = self.opener()
            return as_result(self._connection.run(command, timeout=timeout))
        except self.fatal:
            raise
        except TimeoutError:
            self.close()
            return CommandResult(None, "", "", timed_out=True)
        except Exception as exc:  # a dropped connection: connect again next time
            self.close()
            return CommandResult(None, "", f"{self.label} failed: {type(exc).__name__}: {exc}")

    def close(self) -> None:
        """Close the shell's connection (a later :meth:`run` opens a new one)."""
        conn, self._connection = self._connection, None
        if conn is not None:
            try:
                conn.close()
            except Exception:
                pass
