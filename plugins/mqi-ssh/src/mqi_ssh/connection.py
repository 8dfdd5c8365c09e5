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
* Host keys are checked against ``known_hosts``; an unknown or changed key is refused
  with :class:`HostKeyError`, whose message shows the SHA256 fingerprint and how to trust
  it. Nothing is ever added to known_hosts automatically.
* Keepalives are on. Passwords and key passphrases are never logged or put in messages.
"""

from __future__ import annotations

import base64
import collections
import contextlib
import getpass
import hashlib
import logging
import os
import select
import socket
import threading
import time
from pathlib import Path
from typing import Any, Iterator, Optional, Union

import paramiko

from mqi_framework.toolkit import CommandResult
from mqi_ssh.settings import JumpHostSettings, SshHostSettings

log = logging.getLogger(__name__)

__all__ = ["AuthError", "CommandResult", "HostKeyError", "SshConnection", "SshError", "SshHostSettings",
           "SshUnreachable", "connect", "fingerprint"]

#: where keys are looked for when no key_file is set (as OpenSSH does)
DEFAULT_KEY_FILES = ("~/.ssh/id_ed25519", "~/.ssh/id_ecdsa", "~/.ssh/id_rsa")


class SshError(ConnectionError):
    """An SSH connection could not be made or used; the message says why, for people."""


class SshUnreachable(SshError):
    """The host (or the jump host) does not answer, or the connection dropped."""


class HostKeyError(SshError):
    """The server's host key is not in known_hosts, or differs from the one there."""


class AuthError(SshError):
    """The server refused every credential offered."""


def fingerprint(key: paramiko.PKey) -> str:
    """OpenSSH's ``SHA256:...`` fingerprint of a public key."""
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode("ascii").rstrip("=")


def _known_hosts_name(hostname: str, port: int) -> str:
    return hostname if port == 22 else f"[{hostname}]:{port}"


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
            time.sleep(min(wait, 5.0))


_BUDGET = _ConnectionBudget()


# --------------------------------------------------------------------------- shared transport


def _key_types_for(known: Optional[dict]) -> list[str]:
    """Host-key algorithms to offer: those known_hosts has for the host first (so the server
    presents a key we can check), then the rest."""
    supported = list(paramiko.Transport._preferred_keys)
    if not known:
        return supported
    first: list[str] = []
    for name in known.keys():
        algs = ["rsa-sha2-512", "rsa-sha2-256", "ssh-rsa"] if name == "ssh-rsa" else [name]
        first += [a for a in algs if a in supported and a not in first]
    return first + [a for a in supported if a not in first]


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
            transport = _handshake(sock, s.hostname, s.port, s.known_hosts, s.ciphers, s.connect_timeout_seconds)
            self.host_key = transport.get_remote_server_key()
            _authenticate(transport, s.user or getpass.getuser(), s.key_file, s.key_passphrase, s.password,
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


def _handshake(sock: Any, hostname: str, port: int, known_hosts: str, ciphers: list[str],
               timeout: float) -> paramiko.Transport:
    """Key exchange, then the host-key check against ``known_hosts``."""
    path = Path(os.path.expanduser(known_hosts))
    host_keys = paramiko.HostKeys()
    if path.exists():
        try:
            host_keys.load(str(path))
        except (OSError, paramiko.SSHException) as exc:
            raise HostKeyError(f"known_hosts file {path} cannot be read: {exc}") from None
    name = _known_hosts_name(hostname, port)
    known = host_keys.lookup(name)
    transport = paramiko.Transport(sock)
    options = transport.get_security_options()
    available = list(options.ciphers)
    options.ciphers = tuple([c for c in ciphers if c in available] + [c for c in available if c not in ciphers])
    options.key_types = tuple(_key_types_for(known))
    try:
        transport.start_client(timeout=timeout)
    except (paramiko.SSHException, OSError, EOFError) as exc:
        transport.close()
        raise SshUnreachable(f"SSH handshake with {hostname}:{port} failed: {exc}") from None
    key = transport.get_remote_server_key()
    kind, fp = key.get_name(), fingerprint(key)
    trust = (f"Check it against the server's own key (on {hostname}: `ssh-keygen -lf "
             f"/etc/ssh/ssh_host_{kind.replace('ssh-', '').split('-')[0]}_key.pub`), then trust it with: "
             f"ssh-keyscan -p {port} -t {kind} {hostname} >> {path}")
    if not known:
        transport.close()
        raise HostKeyError(f"host key of {hostname}:{port} is unknown: it is not in {path}. The server offered "
                           f"{kind} {fp}. {trust}")
    if kind not in known or known[kind] != key:
        transport.close()
        known_fps = ", ".join(f"{k} {fingerprint(v)}" for k, v in known.items())
        raise HostKeyError(f"host key of {hostname}:{port} CHANGED: the server offered {kind} {fp}, but {path} "
                           f"has {known_fps}. This can be a reinstalled server or an attack; refusing to connect. "
                           f"If the change is expected, remove the old entry (ssh-keygen -R '{_known_hosts_name(hostname, port)}' "
                           f"-f {path}) and trust the new key as for an unknown one. {trust}")
    return transport


def _load_key(path: str, passphrase: Optional[str], label: str) -> paramiko.PKey:
    full = os.path.expanduser(path)
    try:
        return paramiko.PKey.from_path(full, passphrase)
    except FileNotFoundError:
        raise AuthError(f"{label}: key file {full} does not exist") from None
    except (paramiko.PasswordRequiredException, TypeError) as exc:
        if isinstance(exc, TypeError) and "password" not in str(exc).lower():
            raise AuthError(f"{label}: key file {full} cannot be used: {type(exc).__name__}") from None
        raise AuthError(f"{label}: key file {full} is encrypted: set key_passphrase (write ${{ENV_VAR}})") from None
    except (paramiko.SSHException, ValueError, OSError) as exc:
        raise AuthError(f"{label}: key file {full} cannot be used: {type(exc).__name__}"
                        f"{' (wrong key_passphrase?)' if passphrase else ''}") from None


def _authenticate(transport: paramiko.Transport, user: str, key_file: Optional[str], passphrase: Optional[str],
                  password: Optional[str], allow_agent: bool, label: str) -> None:
    tried: list[str] = []
    keys: list[tuple[str, paramiko.PKey]] = []
    if key_file:
        keys.append((os.path.expanduser(key_file), _load_key(key_file, passphrase, label)))
    else:
        for candidate in DEFAULT_KEY_FILES:
            full = os.path.expanduser(candidate)
            if os.path.exists(full):
                try:
                    keys.append((full, _load_key(full, passphrase, label)))
                except AuthError as exc:
                    tried.append(f"{full} (unusable: {exc})")
    if allow_agent:
        for agent_key in paramiko.Agent().get_keys():
            keys.append((f"agent key {fingerprint(agent_key)}", agent_key))
    for where, key in keys:
        try:
            transport.auth_publickey(user, key)
        except paramiko.AuthenticationException:
            tried.append(where)
            continue
        except (paramiko.SSHException, OSError, EOFError) as exc:
            transport.close()
            raise SshUnreachable(f"{label}: connection dropped during authentication: {exc}") from None
        if transport.is_authenticated():
            return
    if password is not None:
        try:
            transport.auth_password(user, password)
            if transport.is_authenticated():
                return
        except paramiko.AuthenticationException:
            pass
        tried.append("password")
    transport.close()
    offered = ", ".join(tried) if tried else "nothing (no key_file, no default key in ~/.ssh, no password)"
    raise AuthError(f"{label}: the server refused user {user!r} with {offered}. Put the public key in "
                    f"~{user}/.ssh/authorized_keys on the server, or set key_file to the right private key.")


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
        if not self._shared.channels.acquire(timeout=max(60.0, self.settings.command_timeout_seconds)):
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
        with self.channel_slot():
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
                    raise SshUnreachable(f"SSH {self.label}: connection dropped while a command ran")
                if not self._shared.transport or not self._shared.transport.is_active():
                    raise SshUnreachable(f"SSH {self.label}: connection dropped while a command ran")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"SSH {self.label}: command did not finish within {timeout:g}s")
                select.select([channel], [], [], min(left, 1.0))
        except (paramiko.SSHException, OSError, EOFError) as exc:
            if isinstance(exc, (TimeoutError, SshError)):
                raise
            self.drop()
            raise SshUnreachable(f"SSH {self.label}: connection failed while a command ran: {exc}") from None
        status = channel.recv_exit_status() if channel.exit_status_ready() else None
        if status == -1 and not channel.get_transport().is_active():  # no exit status: the link went down
            self.drop()
            raise SshUnreachable(f"SSH {self.label}: connection dropped while a command ran")
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
