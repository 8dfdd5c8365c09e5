"""mqi_framework.commands: local commands with a time limit, and shell commands over a
plugin's connection, with failures as results."""

from __future__ import annotations

import sys
import time

import pytest

from mqi_framework.commands import CommandResult, RemoteShell, as_result, run_local


def test_local_command_result_and_problem():
    result = run_local([sys.executable, "-c", "import sys; print('out'); print('bad thing', file=sys.stderr); sys.exit(3)"], 10)
    assert (result.returncode, result.stdout, result.stderr.strip()) == (3, "out\n", "bad thing")
    assert result.problem() == "exit code 3: bad thing"
    missing = run_local(["/nonexistent/tool"], 5, not_found_hint="set command:")
    assert missing.returncode == 127 and "set command:" in missing.problem()


def test_local_timeout_kills_the_whole_session():
    started = time.monotonic()
    result = run_local(["sh", "-c", "sleep 30 & sleep 30"], 0.5)
    assert result.timed_out and result.returncode is None and result.problem() == "timed out"
    assert time.monotonic() - started < 10  # the background sleep held no pipe open


class FlakyConnection:
    opened = 0

    def __init__(self) -> None:
        FlakyConnection.opened += 1
        self.closed = False

    def run(self, command: str, timeout: float):
        if command == "drop":
            raise ConnectionError("link down")
        if command == "slow":
            raise TimeoutError()
        return (0, b"ok\n", "")

    def close(self) -> None:
        self.closed = True


class Missing(Exception):
    pass


def test_remote_shell_reconnects_after_a_failure_and_reports_it():
    FlakyConnection.opened = 0
    shell = RemoteShell(FlakyConnection, "SSH to gpu1")
    assert shell.run("echo ok", 5) == CommandResult(0, "ok\n", "")
    failed = shell.run("drop", 5)
    assert failed.returncode is None and failed.problem() == "SSH to gpu1 failed: ConnectionError: link down"
    assert shell.run("slow", 5).timed_out
    assert shell.run("echo ok", 5).returncode == 0 and FlakyConnection.opened == 3


def test_remote_shell_lets_fatal_errors_through():
    def opener():
        raise Missing("install mqi-ssh")

    with pytest.raises(Missing):
        RemoteShell(opener, "SSH", fatal=(Missing,)).run("true", 1)
    assert "install mqi-ssh" in RemoteShell(opener, "SSH").run("true", 1).problem()


def test_as_result_reads_objects_and_tuples():
    class Answer:
        exit_status, stdout, stderr = 2, "o", b"e"

    assert as_result(Answer()) == CommandResult(2, "o", "e")
    assert as_result((1, None, "x")) == CommandResult(1, "", "x")
