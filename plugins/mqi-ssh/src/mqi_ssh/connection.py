"""One shared SSH connection per host and process (paramiko), used by every remote
operation of the host: commands of the ``ssh`` executor, SFTP sessions of the ``sftp``
transfer, ``nvidia-smi`` of mqi-gpu and Slurm commands of mqi-slurm.

* :func:`connect` returns a :class:`SshConnection` handle; handles to the same host
  (same address, user, key) share one paramiko ``Transport``, opened lazily and opened
  again after a drop. At most ``max_channels`` channels are open on it at once, and at
  most ``max_new_connections_per_minute`` connections are made to a host per minute
  (SSH servers refuse bursts of connections), process-wide.
* The TCP socket is made here with ``TCP_NODELAY`` (paramiko leaves Nagle on, which
  costs ~40 ms per command round trip) and the AES-GCM ciphers are preferred.
* Host keys are checked against ``known_hosts`` (:mod:`mqi_ssh.handshake`); an unknown or
  changed key is refused with :class:`HostKeyError`, whose message shows the SHA256
  fingerprint and how to trust it. Nothing is ever added to known_hosts automatically.
* Keepalives are on. Passwords and key passphrases are never logged or put in messages.
"""

from __future__ import annotations

import collections
import contextlib
import getpass
import logging
import os
import select
import socket
import threading
import time
from typing import Any, Iterator, Optional, Union

import paramiko

from mqi_framework.toolkit import CommandResult, waiting
from mqi_ssh.errors import AuthError, HostKeyError, SshCommandInterrupted, SshError, SshUnreachable
from mqi_ssh.handshake import authenticate, fingerprint, handshake
from mqi_ssh.settings import JumpHostSettings, SshHostSettings

log = logging.getLogger(__name__)

__all__ = ["AuthError", "CommandResult", "HostKeyError", "SshConnection", "SshError", "SshHostSettings",
           "SshUnreachable", "connect", "fingerprint"]




# --------------------------------------------------------------------------- rate limit


class _ConnectionBudget:
    """At most ``per_minute`` new connections per host in any 60 s, process-wide."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._recent: dict[tuple, collections.deque] = {}

    def wait_turn(self, key: tuple, per_minute: int, label: str) -> None:
        while True:
            with self._lock:
                recent = self._recent.setdefault(key, collections.deque())
                now = time.monotonic()
                while recent and now - recent[0] >= 60.0:
                    recent.popleft()
                if len(recent) < per_minute:
                    recent.append(now)
                    return
                wait = 60.0 - (now - recent[0])
            log.warning("SSH %s: %d new connections in the last minute (the limit): waiting %.1fs", label,
                        per_minute, wait)
            with waiting(f"SSH connection limit of {label}"):
                time.sleep(min(wait, 5.0))


_BUDGET = _ConnectionBudget()


# --------------------------------------------------------------------------- shared transport


class _Shared:
    """The transport shared by every :class:`SshConnection` to one host."""

    def __init__(self, key: tuple, settings: SshHostSettings) -> None:
        self.key = key
        self.settings = settings
        self.lock = threading.RLock()
        self.channels = threading.BoundedSemaphore(settings.max_channels)
        self.transport: Optional[paramiko.Transport] = None
        self.jump: Optional[SshConnection] = None
        self.host_key: Optional[paramiko.PKey] = None
        self.refs = 0

    # -- connecting

    def get_transport(self) -> paramiko.Transport:
        with self.lock:
            t = self.transport
            if t is not None and t.is_active():
                return t
            if t is not None:
                log.info("SSH %s: connection lost; connecting again", self.settings.label())
                self._close_transport()
            self.transport = self._open()
            return self.transport

    def _open(self) -> paramiko.Transport:
        s = self.settings
        _BUDGET.wait_turn(self.key, s.max_new_connections_per_minute, s.label())
        sock: Union[socket.socket, paramiko.Channel]
        if s.jump_host is not None:
            sock = self._through_jump(s.jump_host)
        else:
            try:
                sock = socket.create_connection((s.hostname, s.port), timeout=s.connect_timeout_seconds)
            except OSError as exc:
                raise SshUnreachable(f"cannot reach {s.label()}: {exc}") from None
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            transport = handshake(sock, s.hostname, s.port, s.known_hosts, s.ciphers, s.connect_timeout_seconds)
            self.host_key = transport.get_remote_server_key()
            authenticate(transport, s.user or getpass.getuser(), s.key_file, s.key_passphrase, s.password,
                          s.allow_agent, s.label())
        except BaseException:
            with contextlib.suppress(Exception):
                sock.close()
            raise
        transport.set_keepalive(int(s.keepalive_seconds))
        log.info("SSH %s: connected (host key %s %s)", s.label(), self.host_key.get_name(),
                 fingerprint(self.host_key))
        return transport

    def _through_jump(self, jump: JumpHostSettings) -> paramiko.Channel:
        s = self.settings
        if self.jump is None:
            self.jump = connect(SshHostSettings(
                hostname=jump.hostname, port=jump.port, user=jump.user, key_file=jump.key_file,
                key_passphrase=jump.key_passphrase, password=jump.password, allow_agent=jump.allow_agent,
                known_hosts=jump.known_hosts,
                connect_timeout_seconds=s.connect_timeout_seconds, keepalive_seconds=s.keepalive_seconds,
                max_new_connections_per_minute=s.max_new_connections_per_minute, ciphers=list(s.ciphers)))
        try:
            return self.jump.transport().open_channel("direct-tcpip", (s.hostname, s.port), ("127.0.0.1", 0),
                                                      timeout=s.connect_timeout_seconds)
        except SshError:  # the jump host itself refused us (host key, authentication): say so as it is
            raise
        except paramiko.ChannelException as exc:
            raise SshUnreachable(f"the jump host {jump.hostname} cannot reach {s.label()}: {exc}") from None
        except (paramiko.SSHException, OSError, EOFError) as exc:
            raise SshUnreachable(f"cannot reach {s.label()} through the jump host {jump.hostname}: {exc}") from None

    def _close_transport(self) -> None:
        t, self.transport = self.transport, None
        if t is not None:
            with contextlib.suppress(Exception):
                t.close()

    def close(self) -> None:
        with self.lock:
            self._close_transport()
            if self.jump is not None:
                self.jump.close()
                self.jump = None


# --------------------------------------------------------------------------- pool


_POOL: dict[tuple, _Shared] = {}
_POOL_LOCK = threading.Lock()


def _pool_key(s: SshHostSettings) -> tuple:
    jump = (s.jump_host.hostname, s.jump_host.port, s.jump_host.user) if s.jump_host else None
    return (s.hostname, s.port, s.user or getpass.getuser(), s.key_file, os.path.expanduser(s.known_hosts), jump)


def connect(settings: Union[SshHostSettings, dict]) -> "SshConnection":
    """A handle on the shared connection to the host ``settings`` describes. Nothing is
    sent until it is used; call :meth:`SshConnection.close` when done."""
    if isinstance(settings, dict):
        from mqi_framework.toolkit import structure_settings

        settings = structure_settings(SshHostSettings, settings, path="ssh")
    key = _pool_key(settings)
    with _POOL_LOCK:
        shared = _POOL.get(key)
        if shared is None:
            shared = _POOL[key] = _Shared(key, settings)
        shared.refs += 1
    return SshConnection(shared)


class SshConnection:
    """A handle on the shared connection to one host (see :func:`connect`)."""

    def __init__(self, shared: _Shared) -> None:
        self._shared = shared
        self.settings = shared.settings
        self._closed = False

    @property
    def label(self) -> str:
        return self.settings.label()

    def transport(self) -> paramiko.Transport:
        """The connected transport (connecting, or connecting again, when needed)."""
        if self._closed:
            raise SshError(f"SSH connection handle for {self.label} was closed")
        return self._shared.get_transport()

    def host_key(self) -> paramiko.PKey:
        """The server's host key (connects if needed)."""
        self.transport()
        assert self._shared.host_key is not None
        return self._shared.host_key

    def known_key_line(self, name: str) -> str:
        """``host NAME (user@host:port): host key TYPE SHA256:... is known`` — what
        ``mqi-host check`` prints for a host it reached (connects if needed)."""
        key = self.host_key()
        return f"host {name} ({self.label}): host key {key.get_name()} {fingerprint(key)} is known"

    def drop(self) -> None:
        """Close the shared transport after an error; the next use connects again."""
        with self._shared.lock:
            self._shared._close_transport()

    @contextlib.contextmanager
    def channel_slot(self) -> Iterator[None]:
        """Hold one of the host's ``max_channels`` channel slots."""
        if not self._shared.channels.acquire(blocking=False):
            with waiting(f"a free SSH channel on {self.label}"):
                free = self._shared.channels.acquire(timeout=max(60.0, self.settings.command_timeout_seconds))
            if not free:
                raise SshError(f"SSH {self.label}: no free channel (max_channels={self.settings.max_channels} busy)")
        try:
            yield
        finally:
            self._shared.channels.release()

    def _open_session(self) -> paramiko.Channel:
        transport = self.transport()
        try:
            return transport.open_session(timeout=self.settings.connect_timeout_seconds)
        except (paramiko.SSHException, OSError, EOFError) as exc:
            self.drop()
            raise SshUnreachable(f"SSH {self.label}: cannot open a channel: {exc}") from None

    def run(self, command: str, timeout: Optional[float] = None, stdin: Optional[bytes] = None) -> CommandResult:
        """Run ``command`` (a shell command line: quote every value in it) and wait for it.

        Raises :class:`TimeoutError` after ``timeout`` seconds (default
        ``command_timeout_seconds``) and :class:`SshError` when the connection fails; a
        failing command is not an error (see ``returncode``: None when the server sent no exit
        status, e.g. for a command killed by a signal).
        """
        limit = self.settings.command_timeout_seconds if timeout is None else timeout
        with self.channel_slot(), waiting(f"a command on {self.label} (at most {limit:.0f}s)"):
            channel = self._open_session()
            try:
                return self._exec(channel, command, limit, stdin)
            finally:
                channel.close()

    def _exec(self, channel: paramiko.Channel, command: str, timeout: float, stdin: Optional[bytes]) -> CommandResult:
        deadline = time.monotonic() + timeout
        out: list[bytes] = []
        err: list[bytes] = []
        try:
            channel.exec_command(command)
            if stdin:
                channel.sendall(stdin)
            channel.shutdown_write()
            while True:
                while channel.recv_ready():
                    out.append(channel.recv(65536))
                while channel.recv_stderr_ready():
                    err.append(channel.recv_stderr(65536))
                drained = not channel.recv_ready() and not channel.recv_stderr_ready()
                if channel.exit_status_ready() and (channel.eof_received or channel.closed) and drained:
                    break
                if channel.closed and drained:  # its transport went away (another thread reconnected)
                    raise SshCommandInterrupted(f"SSH {self.label}: connection dropped while a command ran")
                if not self._shared.transport or not self._shared.transport.is_active():
                    raise SshCommandInterrupted(f"SSH {self.label}: connection dropped while a command ran")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"SSH {self.label}: command did not finish within {timeout:g}s")
                select.select([channel], [], [], min(left, 1.0))
        except (paramiko.SSHException, OSError, EOFError) as exc:
            if isinstance(exc, (TimeoutError, SshError)):
                raise
            self.drop()
            raise SshCommandInterrupted(f"SSH {self.label}: connection failed while a command ran: {exc}") from None
        status = channel.recv_exit_status() if channel.exit_status_ready() else None
        if status == -1 and not channel.get_transport().is_active():  # no exit status: the link went down
            self.drop()
            raise SshCommandInterrupted(f"SSH {self.label}: connection dropped while a command ran")
        return CommandResult(None if status == -1 else status, b"".join(out).decode("utf-8", "replace"),
                             b"".join(err).decode("utf-8", "replace"))

    @contextlib.contextmanager
    def sftp(self) -> Iterator[paramiko.SFTPClient]:
        """An SFTP session on the shared connection (one channel slot while open)."""
        with self.channel_slot():
            transport = self.transport()
            try:
                client = paramiko.SFTPClient.from_transport(transport)
            except (paramiko.SSHException, OSError, EOFError) as exc:
                self.drop()
                raise SshUnreachable(f"SSH {self.label}: cannot start SFTP: {exc}") from None
            if client is None:
                raise SshUnreachable(f"SSH {self.label}: the server refused the SFTP subsystem")
            try:
                yield client
            finally:
                with contextlib.suppress(Exception):
                    client.close()

    def close(self) -> None:
        """Release this handle; the shared connection closes with its last handle."""
        if self._closed:
            return
        self._closed = True
        with _POOL_LOCK:
            self._shared.refs -= 1
            last = self._shared.refs <= 0
            if last and _POOL.get(self._shared.key) is self._shared:
                del _POOL[self._shared.key]
        if last:
            self._shared.close()

    def __enter__(self) -> "SshConnection":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# --------------------------------------------------------------------------- SFTP request sizes


def sftp_limits(client: paramiko.SFTPClient) -> Optional[tuple[int, int]]:
    """(max read, max write) request lengths from OpenSSH's ``limits@openssh.com``
    extension, or None when the server does not offer it (then paramiko's 32 KiB stays).

    paramiko has no public API for SFTP extensions; this sends the extended request on
    the client's own request machinery and falls back quietly on any error.
    """
    from paramiko import sftp as proto

    try:
        kind, msg = client._request(proto.CMD_EXTENDED, "limits@openssh.com")
    except Exception:
        return None
    if kind != proto.CMD_EXTENDED_REPLY:
        return None
    try:
        msg.get_int64()  # max packet length
        read, write = msg.get_int64(), msg.get_int64()
    except Exception:
        return None
    return (read, write) if read > 0 and write > 0 else None
