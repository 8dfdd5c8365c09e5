"""Settings of one SSH host, shared by the ``ssh`` executor, the ``sftp`` transfer, and the
SSH modes of mqi-gpu and mqi-slurm (their ``ssh:`` mappings are these settings).

Secrets (``password``, ``key_passphrase``) are written as ``${ENV_VAR}`` in the YAML and
are never logged or shown in messages.
"""

from __future__ import annotations

import posixpath
from typing import Optional

import attrs

#: preferred first; ``aes128-gcm`` is the fastest paramiko cipher on loopback and LAN links
DEFAULT_CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com", "aes128-ctr", "aes256-ctr")


def _positive(instance: object, attribute: attrs.Attribute, value: object) -> None:
    if value is not None and value <= 0:  # type: ignore[operator]
        raise ValueError(f"{attribute.name} must be > 0, got {value!r}")


@attrs.frozen
class JumpHostSettings:
    """A bastion the connection goes through (like OpenSSH's ``ProxyJump``)."""

    hostname: str  # DNS name or address of the bastion
    port: int = attrs.field(default=22, validator=_positive)  # SSH port of the bastion
    user: str = ""  # default: the user running the host
    key_file: Optional[str] = None  # private key; default: ~/.ssh/id_ed25519, id_ecdsa, id_rsa
    key_passphrase: Optional[str] = attrs.field(default=None, repr=False)  # write ${ENV_VAR}
    password: Optional[str] = attrs.field(default=None, repr=False)  # write ${ENV_VAR}; a key is better
    allow_agent: bool = False  # also offer keys of a running ssh-agent
    known_hosts: str = "~/.ssh/known_hosts"  # the jump host's key must be in it


@attrs.frozen
class SshHostSettings:
    """How to reach one SSH host and where the host's files live."""

    #: DNS name or address to connect to (also the name looked up in ``known_hosts``)
    hostname: str
    port: int = attrs.field(default=22, validator=_positive)  # SSH port
    user: str = ""  # default: the user running the host
    #: private key file (OpenSSH format); default: ~/.ssh/id_ed25519, id_ecdsa, id_rsa
    key_file: Optional[str] = None
    #: for an encrypted key: write ${ENV_VAR}; never shown (repr, logs, messages)
    key_passphrase: Optional[str] = attrs.field(default=None, repr=False)
    #: write ${ENV_VAR}; used only when no key is accepted; never shown
    password: Optional[str] = attrs.field(default=None, repr=False)
    allow_agent: bool = False  # also offer keys of a running ssh-agent
    #: host keys are checked against this file; unknown or changed keys are refused
    known_hosts: str = "~/.ssh/known_hosts"
    #: connect through this bastion (like OpenSSH's ``ProxyJump``); unset: connect directly
    jump_host: Optional[JumpHostSettings] = None
    #: absolute folder on this host: cases, results and job folders must lie inside it
    root: Optional[str] = None
    #: seconds each of the TCP connect, the SSH handshake and opening a channel may take;
    #: past it the host counts as unreachable
    connect_timeout_seconds: float = attrs.field(default=15.0, validator=_positive)
    #: an SSH keepalive is sent after this many seconds without traffic (keeps firewalls and
    #: NAT from dropping an idle connection)
    keepalive_seconds: int = attrs.field(default=15, validator=_positive)
    #: seconds a remote command may run when its caller sets no limit (then: TimeoutError)
    command_timeout_seconds: float = attrs.field(default=60.0, validator=_positive)
    #: channels (commands, SFTP sessions) open at once on the shared connection
    max_channels: int = attrs.field(default=8, validator=_positive)
    #: new connections to this host per minute (SSH servers drop bursts of connections)
    max_new_connections_per_minute: int = attrs.field(default=10, validator=_positive)
    #: ciphers offered first, in this order (names paramiko lacks are skipped); paramiko's
    #: other ciphers follow them
    ciphers: list[str] = attrs.field(factory=lambda: list(DEFAULT_CIPHERS))

    def label(self) -> str:
        """``user@host:port`` for messages (never a secret)."""
        user = f"{self.user}@" if self.user else ""
        return f"{user}{self.hostname}:{self.port}"

    def check_root(self) -> Optional[str]:
        if self.root is not None and not posixpath.isabs(self.root):
            return f"root must be an absolute path on {self.hostname}, got {self.root!r}"
        return None
