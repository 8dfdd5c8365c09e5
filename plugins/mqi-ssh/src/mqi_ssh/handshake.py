"""Opening an SSH session on a connected socket: key exchange, the host-key check against
``known_hosts`` (an unknown or changed key is refused with the SHA256 fingerprint and how
to trust it; nothing is ever added automatically), and authentication with keys, the
agent or a password (never logged, never in a message).
"""

from __future__ import annotations

import base64
import hashlib
import os
from pathlib import Path
from typing import Any, Optional

import paramiko

from mqi_ssh.errors import AuthError, HostKeyError, SshUnreachable

__all__ = ["DEFAULT_KEY_FILES", "authenticate", "fingerprint", "handshake", "known_hosts_name"]

#: where keys are looked for when no key_file is set (as OpenSSH does)
DEFAULT_KEY_FILES = ("~/.ssh/id_ed25519", "~/.ssh/id_ecdsa", "~/.ssh/id_rsa")


def fingerprint(key: paramiko.PKey) -> str:
    """OpenSSH's ``SHA256:...`` fingerprint of a public key."""
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode("ascii").rstrip("=")


def known_hosts_name(hostname: str, port: int) -> str:
    return hostname if port == 22 else f"[{hostname}]:{port}"


def _key_types_for(known: Optional[dict], supported: list[str]) -> list[str]:
    """Host-key algorithms to offer: those known_hosts has for the host first (so the server
    presents a key we can check), then the rest of ``supported`` (paramiko's)."""
    if not known:
        return supported
    first: list[str] = []
    for name in known.keys():
        algs = ["rsa-sha2-512", "rsa-sha2-256", "ssh-rsa"] if name == "ssh-rsa" else [name]
        first += [a for a in algs if a in supported and a not in first]
    return first + [a for a in supported if a not in first]


def handshake(sock: Any, hostname: str, port: int, known_hosts: str, ciphers: list[str],
               timeout: float) -> paramiko.Transport:
    """Key exchange, then the host-key check against ``known_hosts``."""
    path = Path(os.path.expanduser(known_hosts))
    host_keys = paramiko.HostKeys()
    if path.exists():
        try:
            host_keys.load(str(path))
        except (OSError, paramiko.SSHException) as exc:
            raise HostKeyError(f"known_hosts file {path} cannot be read: {exc}") from None
    name = known_hosts_name(hostname, port)
    known = host_keys.lookup(name)
    transport = paramiko.Transport(sock)
    options = transport.get_security_options()
    available = list(options.ciphers)
    options.ciphers = tuple([c for c in ciphers if c in available] + [c for c in available if c not in ciphers])
    options.key_types = tuple(_key_types_for(known, list(options.key_types)))
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
                           f"If the change is expected, remove the old entry (ssh-keygen -R '{known_hosts_name(hostname, port)}' "
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


def authenticate(transport: paramiko.Transport, user: str, key_file: Optional[str], passphrase: Optional[str],
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
    refused = 0  # answers in which the server, still connected, said no
    for where, key in keys:
        try:
            transport.auth_publickey(user, key)
        except paramiko.AuthenticationException:
            if not transport.is_active() and not refused:
                # paramiko says "Authentication failed" for a link that died while it waited
                # (a server restarting): a refusal needs a server that answered
                transport.close()
                raise SshUnreachable(f"{label}: connection dropped during authentication") from None
            refused += 1
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
