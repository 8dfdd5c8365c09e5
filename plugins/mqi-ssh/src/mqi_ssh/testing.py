"""A real OpenSSH ``sshd`` for tests (pytest plugin, loaded through the ``pytest11`` entry
point of mqi-ssh).

The session fixture ``sshd`` starts ``/usr/sbin/sshd -D`` on a free loopback port with a
throw-away host key, user key and ``authorized_keys`` in a temp dir, for the current user,
with the ``internal-sftp`` subsystem. Tests connect with :meth:`SshServer.host_settings`.
:meth:`SshServer.stop` / :meth:`SshServer.start` stop and start it again on the same port
with the same keys; :meth:`SshServer.drop_connections` kills the per-connection sshd
processes (a dropped network link) while the listener keeps running.

Where sshd is not installed the tests that use it are skipped, except under ``CI=true``,
where they fail: ``scripts/test`` installs the Debian package ``openssh-server``.
"""

from __future__ import annotations

import getpass
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any, Optional

import pytest

SSHD = "/usr/sbin/sshd"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _keygen(path: Path, kind: str = "ed25519") -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", kind, "-N", "", "-C", "mqi-test", "-f", str(path)], check=True,
                   stdin=subprocess.DEVNULL, capture_output=True)


class SshServer:
    """One sshd for a test session; see the module docstring."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.host = "127.0.0.1"
        self.port = free_port()
        self.user = getpass.getuser()
        self.host_key = folder / "ssh_host_ed25519_key"
        self.user_key = folder / "id_ed25519"
        self.other_key = folder / "id_other"  # a key the server does not know
        self.known_hosts = folder / "known_hosts"
        self.config = folder / "sshd_config"
        self.log = folder / "sshd.log"
        self.proc: Optional[subprocess.Popen] = None

    # ------------------------------------------------------------------ set-up

    def prepare(self) -> None:
        _keygen(self.host_key)
        _keygen(self.user_key)
        _keygen(self.other_key)
        (self.folder / "authorized_keys").write_text(Path(f"{self.user_key}.pub").read_text())
        (self.folder / "authorized_keys").chmod(0o600)
        pub = Path(f"{self.host_key}.pub").read_text().split()
        self.known_hosts.write_text(f"[{self.host}]:{self.port} {pub[0]} {pub[1]}\n")
        self.config.write_text("\n".join([
            f"Port {self.port}", f"ListenAddress {self.host}", f"HostKey {self.host_key}",
            f"PidFile {self.folder / 'sshd.pid'}", f"AuthorizedKeysFile {self.folder / 'authorized_keys'}",
            "PasswordAuthentication no", "KbdInteractiveAuthentication no", "PubkeyAuthentication yes",
            "PermitRootLogin prohibit-password", "StrictModes no", "UsePAM no", "PrintMotd no",
            "Subsystem sftp internal-sftp", "MaxStartups 100:30:200", "MaxSessions 32", "LogLevel INFO",
            "ClientAliveInterval 0", "",
        ]))
        Path("/run/sshd").mkdir(parents=True, exist_ok=True)  # privilege separation folder

    def start(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            return
        log = open(self.log, "ab")
        self.proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(self.config)], stdin=subprocess.DEVNULL,
                                     stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sshd exited with {self.proc.returncode}: {self.log_tail()}")
            try:
                with socket.create_connection((self.host, self.port), timeout=1) as s:
                    if s.recv(4).startswith(b"SSH-"):
                        return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"sshd did not answer on {self.host}:{self.port}: {self.log_tail()}")

    def _children(self) -> list[int]:
        """Per-connection sshd processes (children of the listener)."""
        if self.proc is None:
            return []
        out = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True).stdout
        return [int(x) for x in out.split()]

    def drop_connections(self) -> None:
        """Kill every open connection (their sshd processes); the listener keeps running.
        Jobs started detached through them keep running, as after a network outage."""
        for pid in self._children():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def stop(self) -> None:
        """Stop the listener and drop every connection (the server goes away)."""
        self.drop_connections()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.drop_connections()

    def restart(self) -> None:
        self.stop()
        self.start()

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    # ------------------------------------------------------------------ for tests

    def host_settings(self, **overrides: Any) -> dict:
        """The mqi-ssh host settings (YAML mapping) that reach this server."""
        settings = {"hostname": self.host, "port": self.port, "user": self.user, "key_file": str(self.user_key),
                    "known_hosts": str(self.known_hosts), "max_new_connections_per_minute": 600}
        settings.update(overrides)
        return settings

    def fingerprint(self) -> str:
        out = subprocess.run(["ssh-keygen", "-lf", f"{self.host_key}.pub", "-E", "sha256"], capture_output=True,
                             text=True, check=True).stdout
        return out.split()[1]

    def client_options(self, port_flag: str = "-p") -> list[str]:
        """OpenSSH client options reaching this server (``port_flag`` is ``-P`` for sftp and
        scp), for benchmarks and comparisons."""
        return ["-o", "BatchMode=yes", "-o", f"UserKnownHostsFile={self.known_hosts}", "-o",
                "StrictHostKeyChecking=yes", "-i", str(self.user_key), port_flag, str(self.port)]


def kill_remote_jobs(root: Path) -> None:
    """SIGKILL the supervisor and the process group of every job under ``root``."""
    for pid_file in Path(root).rglob(".mqi-jobs/*/pid"):
        try:
            spid, _, cpid = pid_file.read_text().split()[:3]
        except (OSError, ValueError):
            continue
        for kill, target in ((os.killpg, int(cpid)), (os.kill, int(spid))):
            try:
                if target > 0:
                    kill(target, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


def sshd_unavailable(message: str) -> None:
    """Skip – or fail under CI=true, where scripts/test installs openssh-server."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def start_test_server(folder: Path) -> SshServer:
    """Start an sshd in ``folder`` (for benchmarks and scripts outside pytest)."""
    if not os.path.exists(SSHD) or shutil.which("ssh-keygen") is None:
        raise RuntimeError(f"{SSHD} or ssh-keygen is missing: install the Debian package openssh-server")
    server = SshServer(folder)
    server.prepare()
    server.start()
    return server


@pytest.fixture(scope="session")
def sshd(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """A real sshd on a loopback port for the whole test session (see :class:`SshServer`)."""
    try:
        server = start_test_server(tmp_path_factory.mktemp("sshd"))
    except Exception as exc:
        sshd_unavailable(f"a test sshd could not start: {exc}")
    yield server
    server.stop()


@pytest.fixture
def sshd_running(sshd: SshServer) -> SshServer:
    """The session sshd, started again if an earlier test stopped it."""
    sshd.start()
    return sshd
