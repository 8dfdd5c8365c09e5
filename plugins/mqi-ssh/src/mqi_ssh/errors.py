"""What can go wrong with an SSH connection, as exceptions whose messages are for people."""

from __future__ import annotations

from mqi_framework.protocols import PermanentError

__all__ = ["AuthError", "HostKeyError", "SshCommandInterrupted", "SshError", "SshUnreachable"]


class SshError(ConnectionError):
    """An SSH connection could not be made or used; the message says why, for people."""


class SshUnreachable(SshError):
    """The host (or the jump host) does not answer, or the connection dropped."""


class SshCommandInterrupted(SshUnreachable):
    """The connection dropped after a command was sent and before its exit status came: the
    command may have run, in part or whole, on the host."""


class HostKeyError(SshError, PermanentError):
    """The server's host key is not in known_hosts, or differs from the one there. Permanent:
    a step that meets it fails at once with this message (retrying cannot trust a key)."""


class AuthError(SshError, PermanentError):
    """The server refused every credential offered. Permanent, like :class:`HostKeyError`:
    someone must fix the key or the account, and the step says so at once."""
