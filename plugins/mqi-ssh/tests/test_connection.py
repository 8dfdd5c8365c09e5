"""The shared SSH connection against a real sshd: commands, host keys, authentication,
reconnects, limits."""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from pathlib import Path

import paramiko
import pytest

from mqi_framework.commands import CommandResult
from mqi_ssh import connection
from mqi_framework.protocols import PermanentError
from mqi_ssh.connection import AuthError, HostKeyError, SshUnreachable, connect


def test_command_exit_status_stdout_stderr_and_stdin(sshd_running):
    with connect(sshd_running.host_settings()) as conn:
        result = conn.run("echo out; echo err >&2; exit 3")
        assert (result.returncode, result.stdout, result.stderr) == (3, "out\n", "err\n")
        assert result == CommandResult(3, "out\n", "err\n")  # the framework's result type, as mqi-gpu/-slurm read it
        assert conn.run("cat", stdin=b"a\x00b").stdout == "a\x00b"


def test_handles_to_one_host_share_one_connection_with_nodelay(sshd_running):
    first, second = connect(sshd_running.host_settings()), connect(sshd_running.host_settings())
    try:
        assert first.transport() is second.transport()
        sock = first.transport().sock
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
        assert first.transport().remote_cipher == "aes128-gcm@openssh.com"
        first.close()
        assert second.run("true").returncode == 0  # the last handle keeps it open
    finally:
        second.close()


def test_unknown_host_key_is_refused_with_fingerprint_and_how_to_trust_it(sshd_running, tmp_path):
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    with connect(sshd_running.host_settings(known_hosts=str(empty))) as conn:
        with pytest.raises(HostKeyError) as info:
            conn.run("true")
    message = str(info.value)
    assert "unknown" in message and sshd_running.fingerprint() in message
    assert f"ssh-keyscan -p {sshd_running.port}" in message and str(empty) in message
    assert empty.read_text() == ""  # never added automatically
    assert isinstance(info.value, PermanentError)  # the step fails at once, not retried as "unreachable"


def test_changed_host_key_is_refused(sshd_running, tmp_path):
    other = tmp_path / "other_host_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    kind, blob = Path(f"{other}.pub").read_text().split()[:2]
    known = tmp_path / "known_hosts"
    known.write_text(f"[{sshd_running.host}]:{sshd_running.port} {kind} {blob}\n")
    with connect(sshd_running.host_settings(known_hosts=str(known))) as conn:
        with pytest.raises(HostKeyError, match="CHANGED") as info:
            conn.run("true")
    assert sshd_running.fingerprint() in str(info.value) and "ssh-keygen -R" in str(info.value)


def test_wrong_user_key_gives_a_clear_error(sshd_running):
    with connect(sshd_running.host_settings(key_file=str(sshd_running.other_key))) as conn:
        with pytest.raises(AuthError) as info:
            conn.run("true")
    message = str(info.value)
    assert "refused" in message and str(sshd_running.other_key) in message and "authorized_keys" in message


def test_missing_or_encrypted_key_file_is_named(sshd_running, tmp_path):
    with connect(sshd_running.host_settings(key_file=str(tmp_path / "nope"))) as conn:
        with pytest.raises(AuthError, match="does not exist"):
            conn.run("true")
    locked = tmp_path / "locked"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "s3cret-pass", "-f", str(locked)], check=True)
    with connect(sshd_running.host_settings(key_file=str(locked))) as conn:
        with pytest.raises(AuthError, match="key_passphrase") as info:
            conn.run("true")
    with connect(sshd_running.host_settings(key_file=str(locked), key_passphrase="wrong")) as conn:
        with pytest.raises(AuthError) as wrong:
            conn.run("true")
    assert "s3cret-pass" not in str(info.value) and "wrong" not in str(wrong.value).replace("wrong key_passphrase", "")


def test_a_server_that_goes_away_during_authentication_is_unreachable_not_a_refusal(sshd_running, tmp_path):
    """The fault campaign's finding: sshd stopped while a client authenticated; paramiko said
    "Authentication failed", the step failed at once as a permanent AuthError and its case
    failed. A real SSH server (paramiko's, on a loopback socket) that closes the link when the
    key arrives must read as unreachable (retried), not as a refused key."""
    host_key = paramiko.ECDSAKey.generate()
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]
    (tmp_path / "kh").write_text(f"[127.0.0.1]:{port} {host_key.get_name()} {host_key.get_base64()}\n")

    class GoesAwayAtAuth(paramiko.ServerInterface):
        def __init__(self, transport: paramiko.Transport) -> None:
            self.transport = transport

        def get_allowed_auths(self, username: str) -> str:
            return "publickey"

        def check_auth_publickey(self, username: str, key: paramiko.PKey) -> int:
            self.transport.close()  # the server is shut down mid-authentication
            return paramiko.AUTH_FAILED

    def serve() -> None:
        sock, _ = listener.accept()
        transport = paramiko.Transport(sock)
        transport.add_server_key(host_key)
        transport.start_server(server=GoesAwayAtAuth(transport))
        time.sleep(5)
        transport.close()

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    settings = sshd_running.host_settings(port=port, known_hosts=str(tmp_path / "kh"))
    try:
        with connect(settings) as conn:
            with pytest.raises(SshUnreachable, match="dropped during authentication") as info:
                conn.run("true")
        assert not isinstance(info.value, (AuthError, PermanentError))
    finally:
        listener.close()


def test_unreachable_host_is_named(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with connect({"hostname": "127.0.0.1", "port": port, "known_hosts": str(tmp_path / "kh")}) as conn:
        with pytest.raises(SshUnreachable, match=f"127.0.0.1:{port}"):
            conn.run("true")


def test_reconnects_after_the_connection_dropped(sshd_running):
    with connect(sshd_running.host_settings()) as conn:
        before = conn.transport()
        sshd_running.drop_connections()
        deadline = time.monotonic() + 10
        while before.is_active() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert conn.run("echo again").stdout == "again\n"
        assert conn.transport() is not before


def test_command_timeout_raises_timeout_error(sshd_running):
    with connect(sshd_running.host_settings()) as conn:
        with pytest.raises(TimeoutError):
            conn.run("sleep 5", timeout=0.5)
        assert conn.run("echo fine").stdout == "fine\n"


def test_channels_are_limited_per_host(sshd_running, tmp_path):
    known = tmp_path / "known_hosts"  # its own pool entry: max_channels belongs to the shared connection
    known.write_text(sshd_running.known_hosts.read_text())
    spans: list[tuple[int, int]] = []
    with connect(sshd_running.host_settings(max_channels=1, known_hosts=str(known))) as conn:
        def run() -> None:
            out = conn.run("date +%s%N; sleep 0.3; date +%s%N").stdout.split()
            spans.append((int(out[0]), int(out[1])))

        threads = [threading.Thread(target=run) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    spans.sort()
    assert len(spans) == 3
    assert all(earlier[1] <= later[0] for earlier, later in zip(spans, spans[1:])), spans  # one at a time


def test_new_connections_per_minute_are_limited(mocker):
    budget = connection._ConnectionBudget()
    now = [1000.0]
    slept: list[float] = []
    mocker.patch.object(connection.time, "monotonic", side_effect=lambda: now[0])

    def fake_sleep(seconds: float) -> None:
        slept.append(seconds)
        now[0] += seconds

    mocker.patch.object(connection.time, "sleep", side_effect=fake_sleep)
    for _ in range(3):
        budget.wait_turn(("h",), 3, "h")
    assert slept == []
    budget.wait_turn(("h",), 3, "h")  # the 4th within a minute waits for the oldest to age out
    assert sum(slept) == pytest.approx(60.0)
    budget.wait_turn(("other",), 3, "other")  # per host
    assert sum(slept) == pytest.approx(60.0)


def test_a_command_cut_off_by_a_dropped_connection_fails_fast(sshd_running):
    with connect(sshd_running.host_settings()) as conn:
        conn.run("true")
        threading.Timer(0.5, sshd_running.drop_connections).start()
        started = time.monotonic()
        with pytest.raises(SshUnreachable, match="dropped|failed"):
            conn.run("sleep 20", timeout=60)
        assert time.monotonic() - started < 10
        assert conn.run("echo back").stdout == "back\n"


def test_through_a_jump_host(sshd_running, tmp_path):
    """The server is its own bastion here: a connection to it, then direct-tcpip to it."""
    known = tmp_path / "known_hosts"  # its own pool entry
    known.write_text(sshd_running.known_hosts.read_text())
    jump = {"hostname": sshd_running.host, "port": sshd_running.port, "user": sshd_running.user,
            "key_file": str(sshd_running.user_key), "known_hosts": str(sshd_running.known_hosts)}
    with connect(sshd_running.host_settings(known_hosts=str(known), jump_host=jump)) as conn:
        assert conn.run("echo via jump").stdout == "via jump\n"
        assert isinstance(conn.transport().sock, paramiko.Channel)  # tunnelled, not a socket of its own
    bad_jump = dict(jump, known_hosts=str(tmp_path / "empty"))
    (tmp_path / "empty").write_text("")
    with connect(sshd_running.host_settings(known_hosts=str(known), jump_host=bad_jump)) as conn:
        with pytest.raises(HostKeyError, match="unknown"):  # the jump host's key is checked too
            conn.run("true")
